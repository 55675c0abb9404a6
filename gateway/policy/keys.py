"""The pseudonym key ring: the secret keys that pseudonyms are keyed hashes with, and rotation.

The file (default DATA_DIR/pseudonym.key, mode 0600) is JSON:

    {"format": "fedgate-pseudonym-keys", "version": 1, "current": "k2",
     "keys": [{"id": "k2", "created": "2026-03-01T09:00:00Z", "key": "<64 hex>"},
              {"id": "k1", "created": "...", "retired": "2026-03-01T09:00:00Z", "key": "..."}]}

The current key makes every new pseudonym. Rotating adds a new current key and retires the old
one: from then on every pseudonym differs from before (a peer cannot link new pseudonyms to old
ones). Retired keys stay in the file so that the operator can recompute which value an old
pseudonym stood for (`fedgate policy pseudonym --key-id`); `--drop-retired` removes them for good,
after which nobody can match an old pseudonym to a value. A file of exactly 32 raw bytes (the
format before key ids) is read as key `k1`; the first rotation rewrites it as a ring.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import PolicyError

FORMAT = "fedgate-pseudonym-keys"
VERSION = 1
KEY_BYTES = 32
LEGACY_ID = "k1"
_KEY_ID = re.compile(r"k[1-9][0-9]{0,8}")


@dataclass(frozen=True)
class PseudonymKey:
    id: str
    key: bytes
    created: str
    retired: str | None = None


@dataclass(frozen=True)
class PseudonymKeyRing:
    """All keys of the file, the current one first."""

    keys: tuple[PseudonymKey, ...]

    @property
    def current(self) -> PseudonymKey:
        return self.keys[0]

    def get(self, key_id: str) -> PseudonymKey | None:
        return next((k for k in self.keys if k.id == key_id), None)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _broken(path: Path, what: str) -> PolicyError:
    return PolicyError(
        f"{path}: the pseudonym key file {what}: restore it from a backup (deleting it makes a "
        "new key, and every pseudonym changes)"
    )


def _parse(path: Path, data: bytes) -> PseudonymKeyRing:
    if len(data) == KEY_BYTES:  # the format before key ids: 32 raw bytes
        return PseudonymKeyRing((PseudonymKey(LEGACY_ID, data, created=""),))
    if not data.lstrip().startswith(b"{"):
        raise PolicyError(
            f"{path}: the pseudonym key must hold 32 bytes, it holds {len(data)}: restore it from "
            "a backup, or delete it to create a new one (pseudonyms then change)"
        )
    try:
        document = json.loads(data)
        if document.get("format") != FORMAT or document.get("version") != VERSION:
            raise _broken(path, f"is not {FORMAT} version {VERSION}")
        keys = []
        for entry in document["keys"]:
            key = bytes.fromhex(entry["key"])
            if len(key) != KEY_BYTES or not _KEY_ID.fullmatch(entry["id"]):
                raise _broken(path, f"holds a bad key {entry.get('id')!r}")
            keys.append(
                PseudonymKey(entry["id"], key, str(entry.get("created", "")), entry.get("retired"))
            )
        current = document["current"]
    except PolicyError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _broken(path, "is not valid") from None
    ordered = [k for k in keys if k.id == current] + [k for k in keys if k.id != current]
    if not ordered or ordered[0].id != current or len({k.id for k in keys}) != len(keys):
        raise _broken(path, f"names current key {current!r} that it does not hold once")
    return PseudonymKeyRing(tuple(ordered))


def _dump(ring: PseudonymKeyRing) -> bytes:
    document = {
        "format": FORMAT,
        "version": VERSION,
        "current": ring.current.id,
        "keys": [
            {
                "id": k.id,
                "created": k.created,
                **({"retired": k.retired} if k.retired else {}),
                "key": k.key.hex(),
            }
            for k in ring.keys
        ],
    }
    return (json.dumps(document, indent=2) + "\n").encode("ascii")


def _write(path: Path, data: bytes) -> None:
    """Replace the file atomically with a private one (0600), durable before it replaces."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer of the key file at a time (a lock that dies with the process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def load_pseudonym_keys(path: Path) -> PseudonymKeyRing:
    """The key ring in a file; raises PolicyError naming the file and the fix."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(
            f"{path}: no pseudonym key file: `fedgate init` creates one (or start the gateway once)"
        ) from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the pseudonym key: {exc.strerror}") from None
    return _parse(path, data)


def load_or_create_pseudonym_key(path: Path) -> bytes:
    """The current 32-byte pseudonym key, with a new ring (mode 0600) created if missing."""
    path = Path(path)
    if not path.exists():
        with _locked(path):
            if not path.exists():  # not created meanwhile by another process
                key = PseudonymKey(LEGACY_ID, secrets.token_bytes(KEY_BYTES), _now())
                _write(path, _dump(PseudonymKeyRing((key,))))
    return load_pseudonym_keys(path).current.key


def rotate_pseudonym_key(
    path: Path, *, drop_retired: bool = False
) -> tuple[PseudonymKey, tuple[PseudonymKey, ...]]:
    """Make a new current key and retire the old one (or, with drop_retired, delete every
    retired key); returns the new key and the keys removed."""
    path = Path(path)
    with _locked(path):
        ring = load_pseudonym_keys(path)
        now = _now()
        number = max(int(k.id[1:]) for k in ring.keys) + 1
        new = PseudonymKey(f"k{number}", secrets.token_bytes(KEY_BYTES), now)
        retired = tuple(
            k if k.retired else PseudonymKey(k.id, k.key, k.created, now) for k in ring.keys
        )
        kept = () if drop_retired else retired
        _write(path, _dump(PseudonymKeyRing((new, *kept))))
    return new, retired if drop_retired else ()
