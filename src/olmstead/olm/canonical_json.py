"""Canonical JSON as the Matrix spec defines it for signing.

Keys sorted, no insignificant white space, UTF-8 rather than ``\\u`` escapes,
and no floats: a float has no single canonical form, so it is refused.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json"]


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` as canonical JSON bytes."""
    _refuse_floats(value)
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    ).encode("utf-8")


def _refuse_floats(value: Any) -> None:
    if isinstance(value, float):
        raise ValueError("canonical JSON has no floats; use integers")
    if isinstance(value, dict):
        for item in value.values():
            _refuse_floats(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_floats(item)
