"""The key-state marker: how far our one-time keys got on the server, kept on the server.

vodozemac numbers one-time keys with a counter; a key ID is the counter's base64.
After every accepted upload the machine records in the user's account data (one
entry per device) the highest key number this identity published. A store
restored from an older copy has issued fewer keys than that: the keys in between
were published, and their private halves are gone, so every peer that claims one
opens a session that can never decrypt. Comparing the marker with the store finds
the rollback at start-up (the client) or on demand (``olmstead doctor``), before the
next upload happens to collide with a stale key — which may be hundreds of claims
later.

A marker lags behind when its write failed (it is best effort). A lagging marker
misses a rollback that came after it; and once a drain has cleared the server, the
marker it answered is recorded in the store (``DRAINED``), so that marker — still
on the server if the next write failed — is not taken for a second rollback.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import vodozemac

from olmstead import boundary

__all__ = [
    "DRAINED",
    "KeyStateMarker",
    "issued_through",
    "key_number",
    "keys_lost_to_rollback",
    "marker_content",
    "marker_type",
    "read_marker",
]

MARKER_PREFIX = "org.olmstead.key_state."
#: the store's named value: the marker whose stale keys a drain already cleared
DRAINED = "key_state_drained"


def marker_type(device_id: str) -> str:
    """The account data event type of ``device_id``'s marker: one per device, no races."""
    return MARKER_PREFIX + device_id


def key_number(key_id: str) -> int:
    """The counter behind a vodozemac key ID (unpadded base64 of a big-endian integer)."""
    raw = base64.b64decode(key_id + "=" * (-len(key_id) % 4))
    return int.from_bytes(raw, "big")


def issued_through(account: vodozemac.Account) -> int:
    """The number of the last one-time key ``account`` issued (-1: none yet).

    vodozemac does not expose its counter: a throwaway copy issues one more key,
    and the key that is new tells the number.
    """
    scratch_key = os.urandom(32)
    copy = vodozemac.Account.from_pickle(account.pickle(scratch_key), scratch_key)
    before = set(copy.one_time_keys)
    copy.generate_one_time_keys(1)
    (new,) = set(copy.one_time_keys) - before
    return key_number(new) - 1


@dataclass(frozen=True)
class KeyStateMarker:
    #: the identity that published the keys
    ed25519: str
    #: the number of the highest one-time key it published
    published_through: int
    #: when (seconds since the epoch)
    updated_at: float

    def token(self) -> str:
        """This marker, exactly, as the store records it once a drain answered it."""
        return json.dumps([self.ed25519, self.published_through, self.updated_at])


def marker_content(
    ed25519: str, published_through: int, now: float | None = None
) -> dict[str, Any]:
    return {
        "ed25519": ed25519,
        "published_through": published_through,
        "updated_at": int((time.time() if now is None else now) * 1000),
    }


def read_marker(content: Any) -> KeyStateMarker | None:
    """The marker in an account data event's content, or ``None`` if it is not one."""
    if not isinstance(content, Mapping):
        return None
    ed25519, through, updated = (
        content.get("ed25519"),
        content.get("published_through"),
        content.get("updated_at"),
    )
    if not isinstance(ed25519, str) or isinstance(through, bool) or not isinstance(through, int):
        return None
    # a hostile or broken value reads as "unknown", never as an error
    when = 0.0
    if isinstance(updated, int | float) and not isinstance(updated, bool):
        when = updated / 1000 if 0 <= updated <= boundary.MAX_INT else 0.0
    return KeyStateMarker(ed25519, through, when)


def keys_lost_to_rollback(
    marker: KeyStateMarker | None, account: vodozemac.Account, drained: str | None = None
) -> int:
    """How many published keys ``account`` never issued (0: no sign of a rollback).

    A marker of another identity says nothing about this store's keys, and the
    marker a drain already answered (``drained``, the store's record) nothing more: 0.
    """
    if marker is None or marker.ed25519 != account.ed25519_key.to_base64():
        return 0
    if marker.token() == drained:
        return 0
    return max(0, marker.published_through - issued_through(account))
