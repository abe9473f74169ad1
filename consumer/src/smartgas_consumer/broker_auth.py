"""Device identity over MQTT: each meter's broker user, and the Mosquitto files that enforce it.

Provisioning (``provision-meter``, ``provision-meters``, beside the OSCORE contexts of ``device_auth.py``)
gives every meter a broker user named by its meter id with a random password, and the consumer a user of
its own. Layout::

    <meter credentials>/<meter_id>/mqtt.json      {"username": meter_id, "password": ...}: the meter's side
    <device credentials>/mosquitto/password_file  Mosquitto's password file: user:$7$ PBKDF2-SHA512 hashes
                                                  (``--broker-files DIR`` puts these three elsewhere)
    <device credentials>/mosquitto/acl_file       Mosquitto's ACL: each meter writes its own reading topic
                                                  and reads its own answer topic; the consumer reads every
                                                  reading topic and writes every answer topic
    <device credentials>/mosquitto/consumer.json  the consumer's user (its --mqtt-credentials)

Mosquitto reads the password and ACL files at start and on SIGHUP. The broker then authenticates every
meter and lets it publish under its own topic only, which is why the consumer trusts the meter id in a
reading's topic (docs/security.md). Passwords are 32 random bytes (URL-safe base64); the password file
holds only their hashes, in Mosquitto's own format (``$7$``: PBKDF2-HMAC-SHA512, 101 iterations, a 12-byte
salt, as ``mosquitto_passwd`` writes them), so no Mosquitto tool is needed to provision. Files are created
0600 in 0700 directories (the broker runs as the user that provisions, see docs/deployment.md) and
replaced atomically (written beside, then renamed); nothing here prints or logs a password.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from smartgas_common.mqtt_contract import ANSWER_FILTER, READING_FILTER

BROKER_DIR = "mosquitto"
PASSWORD_FILE = "password_file"
ACL_FILE = "acl_file"
CONSUMER_FILE = "consumer.json"
METER_FILE = "mqtt.json"
#: The consumer's broker user; no meter may be called this (nor ``BROKER_DIR``, the broker files' folder).
CONSUMER_USER = "smartgas-consumer"
RESERVED_METER_IDS = (CONSUMER_USER, BROKER_DIR)
PASSWORD_BYTES = 32
#: Mosquitto 2.0's password hash (mosquitto_passwd): PBKDF2-HMAC-SHA512, this many iterations, this salt.
HASH_ITERATIONS = 101
SALT_BYTES = 12

ACL_TEMPLATE = f"""\
# Written by `smartgas-consumer provision-meters`: do not edit, it is rewritten (docs/security.md).
# Mosquitto reads it at start and on SIGHUP.

# The consumer: reads every meter's readings (plainly or through a shared subscription), writes the answers,
# and reads the broker's uptime (the compose healthcheck logs in as the consumer).
user {CONSUMER_USER}
topic read {READING_FILTER}
topic write {ANSWER_FILTER}
topic read $SYS/broker/uptime

# Every meter logs in with its meter id as user name: it writes its own readings, reads its own answers.
pattern write smartgas/meters/%u/reading
pattern read smartgas/meters/%u/answer
"""


class BrokerCredentialsError(Exception):
    """The broker's files cannot be written or read as they are; the message names the path and the fix."""


@dataclass(frozen=True, slots=True)
class BrokerProvisioned:
    """What broker provisioning did (no password in it: this is printed)."""

    created: int  # meter users given a new password
    kept: int
    directory: Path

    def describe(self) -> str:
        return f"broker users: {self.created} created, {self.kept} kept; Mosquitto's files in {self.directory}"


def broker_dir(credentials: Path) -> Path:
    """Where the broker's files go by default: beside the OSCORE contexts (``--broker-files`` moves them)."""
    return credentials / BROKER_DIR


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Mosquitto's ``$7$`` hash of ``password``, as a password file holds it after ``user:``."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, HASH_ITERATIONS)
    return f"$7${HASH_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """Whether ``hashed`` (a ``$7$`` entry) is the hash of ``password``."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        computed = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return secrets.compare_digest(computed, base64.b64decode(digest))


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _replace_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, 0600 from the start (a reader sees the old file or the new)."""
    staged = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staged, path)


def _read_user_file(path: Path) -> tuple[str, str] | None:
    """(username, password) of a ``mqtt.json`` / ``consumer.json``, or None if it is missing or unusable."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    username, password = document.get("username"), document.get("password")
    if isinstance(username, str) and isinstance(password, str) and username and password:
        return username, password
    return None


def _write_user_file(path: Path, username: str) -> str:
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    _private_dir(path.parent)
    _replace_private(path, json.dumps({"username": username, "password": password}) + "\n")
    return password


def read_password_file(path: Path) -> dict[str, str]:
    """user → hash of a Mosquitto password file (empty if there is none yet)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise BrokerCredentialsError(f"{path}: {err.strerror or err}") from err
    users: dict[str, str] = {}
    for line in lines:
        user, separator, hashed = line.strip().partition(":")
        if separator and user and not user.startswith("#"):
            users[user] = hashed
    return users


def _write_password_file(path: Path, users: dict[str, str]) -> None:
    _replace_private(path, "".join(f"{user}:{hashed}\n" for user, hashed in sorted(users.items())))


def _ensure_user(users: dict[str, str], user_file: Path, username: str, *, rotate: bool) -> bool:
    """Give ``username`` a password (new when rotating or when it has none); True if a new one was made.

    A user whose side is there but whose hash is not (the broker's files were lost) keeps its password:
    its hash is written again, so that the meter goes on logging in."""
    existing = None if rotate else _read_user_file(user_file)
    if existing is not None and existing[0] == username:
        if username not in users or not check_password(existing[1], users[username]):
            users[username] = hash_password(existing[1])
        return False
    users[username] = hash_password(_write_user_file(user_file, username))
    return True


def check_meter_id_for_broker(meter_id: str) -> None:
    if meter_id in RESERVED_METER_IDS:
        raise BrokerCredentialsError(
            f"meter id {meter_id!r} is reserved for the broker's files and the consumer's user: choose another"
        )


def provision_broker(
    directory: Path, meter_credentials: Path, meter_ids: Iterable[str], *, rotate: bool = False
) -> BrokerProvisioned:
    """Broker users for ``meter_ids`` and the consumer, then the password file and the ACL, rewritten whole.

    Run after the OSCORE contexts (``device_auth.provision_meters``): rotating a meter's context replaces
    its directory on the meter side, ``mqtt.json`` with it, and a new broker password is made here.
    ``directory``: the broker's files (``broker_dir(device credentials)`` unless told otherwise)."""
    _private_dir(directory)
    password_file = directory / PASSWORD_FILE
    users = read_password_file(password_file)
    created = kept = 0
    for meter_id in meter_ids:
        check_meter_id_for_broker(meter_id)
        if _ensure_user(users, meter_credentials / meter_id / METER_FILE, meter_id, rotate=rotate):
            created += 1
        else:
            kept += 1
    _ensure_user(users, directory / CONSUMER_FILE, CONSUMER_USER, rotate=False)
    _write_password_file(password_file, users)
    _replace_private(directory / ACL_FILE, ACL_TEMPLATE)
    return BrokerProvisioned(created, kept, directory)


def revoke_broker_user(directory: Path, meter_id: str) -> bool:
    """Remove the meter's user from the password file in ``directory`` (the broker refuses it, and closes its
    connection, once it re-read the file: SIGHUP); False if it had none."""
    password_file = directory / PASSWORD_FILE
    users = read_password_file(password_file)
    if meter_id in RESERVED_METER_IDS or meter_id not in users:
        return False
    del users[meter_id]
    _write_password_file(password_file, users)
    return True
