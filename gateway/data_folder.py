"""The gateway's data folder: private to its owner, and held by one running gateway at a time.

The folder holds the store of the audit log and the task table (SQLite and its WAL files), the
token and pseudonym keys and the token ledger. It is created 0700, the files in it 0600, and a
gateway refuses to start on a folder that other users can enter or read, or that another user
owns.

A running gateway holds an exclusive lock (flock) on `fedgate.lock` in the folder for its
lifetime. The kernel drops the lock when the process ends, however it ends, so a second gateway
on the same folder refuses to start, and a crashed one leaves nothing to clean up: a stale pid
file names no holder. Only the holder writes `fedgate.pid` (for `fedgate policy reload`), and it
removes it before it lets the lock go.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import make_url

from gateway.errors import ConfigError

LOCK_FILE = "fedgate.lock"
PID_FILE = "fedgate.pid"
# A command that asks whether a gateway runs (`running_gateway`) holds a shared lock for a few
# microseconds; a gateway starting at that moment tries again within this long before it refuses.
_ACQUIRE_PATIENCE_SECONDS = 0.5


def private_secret(path: Path, make: Callable[[], bytes], what: str) -> bytes:
    """The bytes of a secret file in the data folder (a key), created by `make()` when missing.

    Created 0600, written whole under a temporary name and then linked into place, so a crash
    never leaves half a secret and two processes creating it at once end up with the same one.
    Refused (ConfigError, the fix named) when it cannot be read or others may read it.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the data folder: private
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        try:
            with os.fdopen(descriptor, "wb") as handle:  # mkstemp creates it 0600
                handle.write(make())
                handle.flush()
                os.fsync(handle.fileno())
            # link() never replaces: if another process created the secret meanwhile, keep it.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: the {what} is accessible to other users (mode {stat.S_IMODE(mode):o}): "
            f"run `chmod 600 {path}`"
        )
    return data


def ensure_private_folder(path: Path) -> Path:
    """Create `path` (mode 0700) if it is missing; refuse one that others can read or enter."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_folder(path)
    return path


def check_private_folder(path: Path) -> None:
    """ConfigError naming the folder and the fix if anyone but its owner (us) may use it."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the data folder: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path}: the data folder is not a folder: set [gateway] data_dir")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{path}: the data folder belongs to uid {info.st_uid}, not to the user running the "
            f"gateway (uid {os.geteuid()}): run the gateway as its owner, or `chown` it"
        )
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: the data folder is accessible to other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}): run `chmod 700 {path}`"
        )


def create_private_file(path: Path) -> None:
    """Create `path` empty and 0600 if it does not exist (its parent must exist).

    Used for SQLite databases before they are opened: SQLite creates the WAL and shared-memory
    files with the mode of the database file, so they are 0600 too.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL, or None (another database, or in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database)


class DataFolderLock:
    """The exclusive hold of one gateway on its data folder (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        self._wrote_pid_file = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the folder, or raise ConfigError naming the gateway that holds it."""
        if self._fd is not None:
            return
        path = self.folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot open the lock file: {exc.strerror}") from None
        deadline = time.monotonic() + _ACQUIRE_PATIENCE_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                holder = _read_pid(path)
                os.close(fd)
                who = f"another gateway (pid {holder})" if holder else "another gateway"
                raise ConfigError(
                    f"{self.folder}: the data folder is in use by {who}: stop it first, or give "
                    "this gateway its own [gateway] data_dir"
                ) from None
        # Only the holder writes here: the pid that `fedgate.lock` belongs to, for the refusal.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def write_pid_file(self) -> Path:
        """Write `fedgate.pid` (only the holder may): how `fedgate policy reload` finds us."""
        if self._fd is None:
            raise RuntimeError("write_pid_file before acquire")
        path = self.folder / PID_FILE
        temporary = path.with_name(f".{PID_FILE}.{os.getpid()}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        os.replace(temporary, path)
        self._wrote_pid_file = True
        return path

    def release(self) -> None:
        """Remove our pid file, then let the folder go."""
        if self._fd is None:
            return
        if self._wrote_pid_file:
            with contextlib.suppress(OSError):
                os.unlink(self.folder / PID_FILE)
            self._wrote_pid_file = False
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = None


def running_gateway(folder: Path) -> int | None:
    """The pid in `fedgate.pid` of the `fedgate serve` process that holds `folder`, or None.

    None when no process holds the folder (a pid file left by a crash is ignored, so a stale
    pid is never signalled). ConfigError when the folder is held but no pid file names the
    holder: a gateway run inside another program, which must reload its policy itself.
    """
    folder = Path(folder)
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{folder / LOCK_FILE}: cannot open: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a gateway runs
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
    finally:
        os.close(fd)
    pid = _read_pid(folder / PID_FILE)
    if pid is None:
        raise ConfigError(
            f"{folder}: a gateway holds this data folder but has written no {PID_FILE} (it is "
            "still starting, or runs inside another program): try again, or reload its policy there"
        )
    return pid


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None
