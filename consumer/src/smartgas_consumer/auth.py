"""API keys: who is asking, from the ``X-API-Key`` header.

Keys are configured per client in a YAML file (``--api-keys``) that holds only their SHA-256 digests,
never the keys themselves; ``smartgas-consumer hash-key`` makes a key and its line. A client sees only
its own meters; the client ``"*"`` is an administrator and sees every client. Keys are high-entropy
random strings, so a plain SHA-256 is the right tool (a slow password hash protects low-entropy secrets;
these are not). Keys are never logged.

Wrong keys are throttled per client address (``FailedKeyThrottle``): an address that sends too many is
answered 429 with ``Retry-After`` until it slows down, whatever key it sends, so guessing keys is slow even
from one busy address; other addresses are unaffected.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ADMIN = "*"
_DIGEST_LENGTH = 64
_LOG = logging.getLogger(__name__)
#: Wrong keys an address may send in a burst; after that, one more each FAILED_KEY_REFILL_S (10 a minute;
#: ``--wrong-keys-per-minute`` changes both).
FAILED_KEY_BURST = 10
FAILED_KEY_REFILL_S = 6.0
#: Addresses whose failures are remembered at once; beyond it the least recently failing one is forgotten.
FAILED_KEY_ADDRESSES = 4096


class ApiKeysFileError(ValueError):
    """The API keys file cannot be used; the message names the entry."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: a client, or an administrator (``client_id`` None)."""

    client_id: str | None

    @property
    def is_admin(self) -> bool:
        return self.client_id is None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key: 256 bits, URL-safe."""
    return secrets.token_urlsafe(32)


def client_network(address: str | None) -> str:
    """The unit a throttle counts: an IPv4 address, or an IPv6 /64 (one host usually holds a whole /64, so
    counting single IPv6 addresses would give an attacker 2^64 fresh starts)."""
    if address is None:
        return "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at_s: float
    reported: bool = False


class FailedKeyThrottle:
    """Wrong-key attempts per client network, as a token bucket: ``burst`` attempts at once, then one per
    ``refill_s``. Memory is bounded by ``max_addresses`` buckets; a bucket that has refilled is dropped."""

    def __init__(
        self,
        *,
        burst: int = FAILED_KEY_BURST,
        refill_s: float = FAILED_KEY_REFILL_S,
        max_addresses: int = FAILED_KEY_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.refill_s = refill_s
        self.max_addresses = max_addresses
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @classmethod
    def per_minute(cls, wrong_keys: int) -> FailedKeyThrottle:
        """``wrong_keys`` at once, then that many a minute."""
        return cls(burst=wrong_keys, refill_s=60.0 / wrong_keys)

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after_s(self, address: str | None) -> float:
        """Seconds until ``address`` may present a key again; 0 when it may now."""
        bucket = self._buckets.get(client_network(address))
        if bucket is None:
            return 0.0
        tokens = self._refill(bucket)
        return 0.0 if tokens >= 1 else (1 - tokens) * self.refill_s

    def failed(self, address: str | None) -> None:
        """Count one wrong key from ``address``; the first time it runs out, say so in one log line."""
        network = client_network(address)
        bucket = self._buckets.get(network)
        if bucket is None:
            self._make_room()
            bucket = self._buckets[network] = _Bucket(float(self.burst), self._clock())
        else:
            self._buckets.move_to_end(network)
            if self._refill(bucket) >= self.burst:
                bucket.reported = False  # quiet long enough: a new episode gets a new line
        bucket.tokens = self._refill(bucket) - 1
        bucket.at_s = self._clock()
        if bucket.tokens < 1 and not bucket.reported:
            bucket.reported = True
            _LOG.warning(
                "%d wrong X-API-Key attempts from %s: its requests get 429 until it slows to one per %g s",
                self.burst,
                network,
                self.refill_s,
            )

    def _refill(self, bucket: _Bucket) -> float:
        return min(float(self.burst), bucket.tokens + (self._clock() - bucket.at_s) / self.refill_s)

    def _make_room(self) -> None:
        # Oldest first: drop buckets that have refilled (they hold nothing), then, if still full, the least
        # recently failing one.
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if self._refill(oldest) < self.burst and len(self._buckets) < self.max_addresses:
                return
            self._buckets.popitem(last=False)


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """Digest → principal, and the throttle of wrong keys shared by every route. Empty: every request is
    refused."""

    principals: dict[str, Principal]
    throttle: FailedKeyThrottle = field(default_factory=FailedKeyThrottle, compare=False, repr=False)

    @classmethod
    def load(cls, path: Path | None, throttle: FailedKeyThrottle | None = None) -> ApiKeys:
        throttle = throttle if throttle is not None else FailedKeyThrottle()
        if path is None:
            return cls({}, throttle)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ApiKeysFileError(f"{path}: {err}") from err
        return cls.parse(document, source=str(path), throttle=throttle)

    @classmethod
    def parse(
        cls, document: Any, *, source: str = "API keys file", throttle: FailedKeyThrottle | None = None
    ) -> ApiKeys:
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ApiKeysFileError(f"{source}: expected a mapping with a 'keys' list")
        principals: dict[str, Principal] = {}
        for index, entry in enumerate(entries):
            where = f"{source}: keys[{index}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("client"), str):
                raise ApiKeysFileError(f"{where}: needs 'client' (a client id, or \"*\" for an administrator)")
            value = str(entry.get("sha256", "")).lower()
            if len(value) != _DIGEST_LENGTH or any(c not in "0123456789abcdef" for c in value):
                raise ApiKeysFileError(f"{where}: 'sha256' must be 64 hex digits (smartgas-consumer hash-key)")
            if value in principals:
                raise ApiKeysFileError(f"{where}: the same key is listed twice")
            client = entry["client"]
            principals[value] = Principal(None if client == ADMIN else client)
        return cls(principals, throttle if throttle is not None else FailedKeyThrottle())

    def with_admin_key(self, key: str | None) -> ApiKeys:
        """These keys plus one administrator key given in plain text (hashed here, kept only as a digest)."""
        if not key:
            return self
        return ApiKeys({**self.principals, digest(key): Principal(None)}, self.throttle)

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal for a presented key, or None. The lookup is by digest, so timing reveals nothing
        about any configured key."""
        if not key:
            return None
        return self.principals.get(digest(key))

    def clients(self) -> set[str]:
        return {p.client_id for p in self.principals.values() if p.client_id is not None}


def key_file_line(client: str, key: str) -> str:
    """The YAML entry for a key, as ``hash-key`` prints it."""
    return f'  - {{client: "{client}", sha256: {digest(key)}}}'
