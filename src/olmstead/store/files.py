"""Store files: built beside their place and linked in whole; opened read-only by URI."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["link_into_place", "read_only_uri"]


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
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_only_uri(path: str | Path) -> str:
    """An SQLite URI that opens ``path`` read-only (quoted: any file name is safe)."""
    return f"{Path(path).absolute().as_uri()}?mode=ro"
