"""Canonical JSON as the Matrix spec defines it for signing.

Keys sorted, no insignificant white space, UTF-8 rather than ``\\u`` escapes,
and no floats: a float has no single canonical form, so it is refused.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json", "nested_within"]


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` as canonical JSON bytes."""
    _refuse_floats(value)
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    ).encode("utf-8")


def nested_within(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays at most ``limit`` levels deep.

    A loop, not recursion: objects from the server are checked with it before they
    are kept, since ``json.dumps`` of one nested thousands deep raises ``RecursionError``.
    """
    level: list[Any] = [value]
    for _ in range(limit + 1):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return True
    return False


def _refuse_floats(value: Any) -> None:
    # a loop over a stack, not recursion: this runs on every signature check
    stack = [value]
    containers: set[int] = set()
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is int or kind is bool or item is None:
            continue
        if id(item) in containers:  # walked once: a cycle ends here, json.dumps refuses it
            continue
        containers.add(id(item))
        if kind is dict:
            stack.extend(item.values())
        elif kind is list or kind is tuple:
            stack.extend(item)
        elif isinstance(item, float):
            raise ValueError("canonical JSON has no floats; use integers")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
