"""API keys: who is asking, from the ``X-API-Key`` header.

Keys are configured per client in a YAML file (``--api-keys``) that holds only their SHA-256 digests,
never the keys themselves; ``smartgas-consumer hash-key`` makes a key and its line. A client sees only
its own meters; the client ``"*"`` is an administrator and sees every client. Keys are high-entropy
random strings, so a plain SHA-256 is the right tool (a slow password hash protects low-entropy secrets;
these are not). Keys are never logged.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ADMIN = "*"
_DIGEST_LENGTH = 64


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


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """Digest → principal. Empty: every request is refused."""

    principals: dict[str, Principal]

    @classmethod
    def load(cls, path: Path | None) -> ApiKeys:
        if path is None:
            return cls({})
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ApiKeysFileError(f"{path}: {err}") from err
        return cls.parse(document, source=str(path))

    @classmethod
    def parse(cls, document: Any, *, source: str = "API keys file") -> ApiKeys:
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
        return cls(principals)

    def with_admin_key(self, key: str | None) -> ApiKeys:
        """These keys plus one administrator key given in plain text (hashed here, kept only as a digest)."""
        if not key:
            return self
        return ApiKeys({**self.principals, digest(key): Principal(None)})

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
