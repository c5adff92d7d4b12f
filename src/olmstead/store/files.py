"""Store files: built beside their place and linked in whole; opened read-only by URI.

Every file that holds keys (a store, its -wal and -shm files, the copies repair and
rekey keep, a key export) is the owner's alone: created 0600 whatever the umask.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

__all__ = [
    "PRIVATE_FILE",
    "create_private",
    "link_into_place",
    "open_to_others",
    "read_only_uri",
    "sqlite_files",
    "write_private",
]

#: the mode of every file olmstead creates that holds keys
PRIVATE_FILE = 0o600


def create_private(path: str | Path) -> None:
    """Create ``path`` empty with mode 0600 (whatever the umask); ``FileExistsError`` if it is
    there. SQLite takes an empty file as a new database and gives its -wal and -shm
    files the database file's mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # the umask may have taken bits from os.open's mode
    finally:
        os.close(fd)


def write_private(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600), whole or not at all: built beside it, fsynced,
    renamed over it. A reader never sees a half-written file, nor one others could read."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    create_private(tmp)
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(target.parent)


def open_to_others(path: str | Path) -> int:
    """The permission bits of ``path`` that let users other than its owner in (0: none)."""
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077


def sqlite_files(path: str | Path) -> list[Path]:
    """An SQLite store and those of its -wal and -shm files that exist."""
    base = Path(path)
    found = [base]
    for suffix in ("-wal", "-shm"):
        extra = base.with_name(base.name + suffix)
        if extra.exists():
            found.append(extra)
    return found


def link_into_place(built: Path, target: Path) -> None:
    """Give ``built`` the name ``target`` unless ``target`` exists, and make that durable.

    A link, not a rename: if another process put its own file at ``target`` first,
    theirs stays and ours is dropped. ``built`` is removed either way.
    """
    try:
        os.link(built, target)
    except FileExistsError:
        pass
    finally:
        built.unlink()
    _sync_directory(target.parent)


def _sync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_only_uri(path: str | Path) -> str:
    """An SQLite URI that opens ``path`` read-only (quoted: any file name is safe)."""
    return f"{Path(path).absolute().as_uri()}?mode=ro"
