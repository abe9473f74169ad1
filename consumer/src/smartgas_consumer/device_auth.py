"""Device identity with OSCORE (RFC 8613): one security context per meter, provisioned, loaded, refreshed.

Each meter shares one OSCORE security context with the consumer, in aiocoap's credential-directory format
(``settings.json`` with the Sender and Recipient IDs, ``secret.json`` with the Master Secret and Salt,
``sequence.json`` with the sequence number and replay window, ``lock``). Layout of the consumer's
credentials directory (``--device-credentials``)::

    <meter_id>/<kid>/settings.json, secret.json     one context; <kid> is the meter's Sender ID in hex

The meter's side is written to ``<meter credentials>/<meter_id>/`` (what the publisher's ``--credentials``
or a meter's firmware build takes). The meter's Sender ID (the OSCORE ``kid`` in every request) is six
random bytes, unique in the directory; the consumer's Sender ID is empty. Files are created 0600 and
directories 0700; nothing here logs a secret.

Rotation writes a new context under a new ``<kid>`` and then removes the old one; revocation removes the
meter's directory. Directories are renamed away before they are deleted, so that a running consumer
never writes its sequence file into a context that is being replaced. The running consumer notices
both without a restart: a request is checked against its context's directory (one ``stat``), and
``MeterContexts.refresh`` (every ``--device-credentials-refresh-s``) loads new contexts and lets go of
removed ones. aiocoap locks each context directory for one process (its ``lock`` file), so one
credentials directory serves one consumer process (docs/security.md).
"""

from __future__ import annotations

import binascii
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiocoap import error, oscore
from aiocoap.credentials import CredentialsMap
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

_LOG = logging.getLogger(__name__)

#: The consumer's Sender ID in every context (the meter's is its ``kid``): the two must differ.
CONSUMER_SENDER_ID = b""
#: Bytes in a meter's Sender ID: AES-CCM-16-64-128's 13-byte nonce allows at most 7.
KID_BYTES = 6
MASTER_SECRET_BYTES = 32
MASTER_SALT_BYTES = 8
SETTINGS_FILE = "settings.json"
SECRET_FILE = "secret.json"


class CredentialsError(Exception):
    """A credentials directory cannot be used as it is; the message names the path and the fix."""


@dataclass(frozen=True, slots=True)
class Provisioned:
    """What provisioning did for one meter (no secret in it: this is printed and logged)."""

    meter_id: str
    kid_hex: str
    created: bool  # False: the meter had a context and nothing was changed

    def describe(self) -> str:
        return f"{self.meter_id}: {'new context' if self.created else 'kept its context'}, kid {self.kid_hex}"


def _private_dir(path: Path) -> None:
    """Create ``path`` and any missing parent 0700 (mkdir's ``parents`` would make those with the umask)."""
    if path.is_dir():
        return
    _private_dir(path.parent)
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)


def _write_private(path: Path, document: dict[str, Any]) -> None:
    """Write a JSON file readable by its owner only, created 0600 (never widened, even for an instant)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(document, file)
        file.flush()
        os.fsync(file.fileno())


def write_context(directory: Path, *, sender_id: bytes, recipient_id: bytes, secret: bytes, salt: bytes) -> None:
    """One side of a security context, in aiocoap's credential-directory format."""
    _private_dir(directory)
    settings = {"sender-id_hex": sender_id.hex(), "recipient-id_hex": recipient_id.hex()}
    _write_private(directory / SETTINGS_FILE, settings)
    _write_private(directory / SECRET_FILE, {"secret_hex": secret.hex(), "salt_hex": salt.hex()})


def _remove_tree(path: Path) -> None:
    """Rename a directory away (atomically: a reader sees it or nothing), then delete it."""
    if not path.exists():
        return
    graveyard = path.with_name(f".removed-{path.name}-{secrets.token_hex(4)}")
    os.rename(path, graveyard)
    shutil.rmtree(graveyard, ignore_errors=True)


def context_dirs(credentials: Path) -> Iterable[tuple[str, Path]]:
    """(meter id, context directory) for every context in a consumer's credentials directory."""
    if not credentials.is_dir():
        return
    for meter_dir in sorted(credentials.iterdir()):
        if meter_dir.name.startswith(".") or not meter_dir.is_dir():
            continue
        for context_dir in sorted(meter_dir.iterdir()):
            if not context_dir.name.startswith(".") and (context_dir / SETTINGS_FILE).is_file():
                yield meter_dir.name, context_dir


def _meter_contexts(credentials: Path, meter_id: str) -> list[Path]:
    meter_dir = credentials / meter_id
    if not meter_dir.is_dir():
        return []
    return sorted(
        context
        for context in meter_dir.iterdir()
        if not context.name.startswith(".") and (context / SETTINGS_FILE).is_file()
    )


def provision_meter(
    credentials: Path, meter_credentials: Path, meter_id: str, *, rotate: bool = False, used: set[str] | None = None
) -> Provisioned:
    """Create a meter's context (both sides); with ``rotate``, replace the one it has. ``used``: the kids
    (hex) already in ``credentials``, when the caller provisions many meters (found here otherwise)."""
    existing = _meter_contexts(credentials, meter_id)
    if existing and not rotate:
        return Provisioned(meter_id, existing[-1].name, created=False)
    if used is None:
        used = {context.name for _, context in context_dirs(credentials)}
    kid = secrets.token_bytes(KID_BYTES)
    while kid.hex() in used:  # 2^48 ids: a collision is unlikely, and never accepted
        kid = secrets.token_bytes(KID_BYTES)
    used.add(kid.hex())
    secret, salt = secrets.token_bytes(MASTER_SECRET_BYTES), secrets.token_bytes(MASTER_SALT_BYTES)
    _private_dir(credentials)
    _private_dir(meter_credentials)
    # The meter's side first, written beside its old one and swapped in: the meter has one context at a time.
    staged = meter_credentials / f".new-{meter_id}-{kid.hex()}"
    write_context(staged, sender_id=kid, recipient_id=CONSUMER_SENDER_ID, secret=secret, salt=salt)
    _remove_tree(meter_credentials / meter_id)
    os.rename(staged, meter_credentials / meter_id)
    write_context(
        credentials / meter_id / kid.hex(), sender_id=CONSUMER_SENDER_ID, recipient_id=kid, secret=secret, salt=salt
    )
    for old in existing:
        _remove_tree(old)
    return Provisioned(meter_id, kid.hex(), created=True)


def provision_meters(
    credentials: Path, meter_credentials: Path, meter_ids: Iterable[str], *, rotate: bool = False
) -> list[Provisioned]:
    """``provision_meter`` for many meters, reading the directory's kids once."""
    used = {context.name for _, context in context_dirs(credentials)}
    return [
        provision_meter(credentials, meter_credentials, meter_id, rotate=rotate, used=used) for meter_id in meter_ids
    ]


def revoke_meter(credentials: Path, meter_id: str) -> bool:
    """Remove every context of a meter from the consumer's side; False if it had none."""
    meter_dir = credentials / meter_id
    if not meter_dir.is_dir():
        return False
    _remove_tree(meter_dir)
    return True


class MeterContext(oscore.FilesystemSecurityContext):  # type: ignore[misc]
    """aiocoap's file-backed context, which knows its meter and tolerates its directory being removed."""

    def __init__(self, meter_id: str, basedir: Path) -> None:
        self.meter_id = meter_id
        super().__init__(str(basedir))

    @property
    def revoked(self) -> bool:
        return not os.path.isfile(os.path.join(self.basedir, SETTINGS_FILE))

    def _store(self) -> None:
        # A rotated or revoked context keeps no state: its directory is gone (or going), and a sequence
        # file written there could land in a directory that is being deleted.
        if self.revoked:
            return
        try:
            super()._store()
        except FileNotFoundError:
            return

    def claim_window(self) -> None:
        """Mark the persisted replay window as in use ("unknown" until a clean release writes it back), now
        rather than at this meter's first request: aiocoap does it then, with an fsync on the event loop."""
        self._replay_window_changed()

    def release(self) -> None:
        """Persist the sequence number and replay window (if the context still exists) and unlock it."""
        lock: Any = self.__dict__.get("lockfile")  # aiocoap's filelock.FileLock, None once released
        if lock is None:
            return
        if self.revoked:
            lock.release()
            self.lockfile = None
        else:
            self._destroy()


class MeterContexts(CredentialsMap):  # type: ignore[misc]
    """The consumer's contexts, found by the request's ``kid`` in one dictionary look-up."""

    def __init__(self, credentials: Path) -> None:
        super().__init__()
        self.credentials = credentials
        self._by_kid: dict[bytes, MeterContext] = {}

    def find_oscore(self, unprotected: dict[Any, Any]) -> Any:
        kid = unprotected.get(oscore.COSE_KID)
        context = self._by_kid.get(kid) if isinstance(kid, bytes) else None
        if context is None or context.revoked:
            raise KeyError(kid)
        found = context.get_oscore_context_for(unprotected)
        if found is None:
            raise KeyError(kid)
        return found

    def find_all_used_contextless_oscore_kid(self) -> set[bytes]:
        return set(self._by_kid)

    def __len__(self) -> int:
        return len(self._by_kid)

    def refresh(self) -> tuple[int, int]:
        """Load contexts new on disk, let go of removed ones; (loaded, dropped). A broken one is skipped."""
        on_disk: dict[bytes, tuple[str, Path]] = {}
        for meter_id, context_dir in context_dirs(self.credentials):
            try:
                on_disk[binascii.unhexlify(context_dir.name)] = (meter_id, context_dir)
            except (binascii.Error, ValueError):
                _LOG.warning("device credentials: %s is not named by a hex kid; skipped", context_dir)
        dropped = 0
        for kid in [kid for kid in self._by_kid if kid not in on_disk]:
            self._by_kid.pop(kid).release()
            dropped += 1
        loaded = 0
        for kid, (meter_id, context_dir) in on_disk.items():
            if kid in self._by_kid:
                continue
            try:
                context = MeterContext(meter_id, context_dir)
            except Exception as err:  # a half-written, damaged or foreign-locked context: the others still load
                _LOG.warning("device credentials: cannot load %s: %s", context_dir, err)
                continue
            if context.recipient_id != kid:
                context.release()
                _LOG.warning("device credentials: %s holds another kid than its name; skipped", context_dir)
                continue
            context.claim_window()
            self._by_kid[kid] = context
            loaded += 1
        return loaded, dropped

    def close(self) -> None:
        """Persist every context's state and unlock it (a clean stop: no Echo round after restart)."""
        for context in self._by_kid.values():
            context.release()
        self._by_kid.clear()


class GuardedOscoreSite(OscoreSiteWrapper):  # type: ignore[misc]
    """aiocoap's OSCORE wrapper, with an OSCORE option it cannot parse answered 4.02 (aiocoap lets the
    IndexError or ValueError of its parser fly, which would be a 5.00 and a traceback per datagram)."""

    async def render_to_pipe(self, pipe: Any) -> None:
        try:
            oscore.verify_start(pipe.request)
        except oscore.NotAProtectedMessage:
            pass  # plain CoAP: the wrapper hands it to the site
        except Exception as err:  # any parse failure of the peer's option is the peer's fault
            raise error.BadOption(f"the OSCORE option cannot be decoded ({type(err).__name__})") from None
        await super().render_to_pipe(pipe)
