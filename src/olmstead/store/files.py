"""Making a file appear whole: build it beside its place, link it in, fsync the directory."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["link_into_place"]


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
