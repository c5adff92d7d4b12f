"""Invites from a sync's ``rooms.invite``: who invited us, to which room, and what it is.

An invited room carries only stripped state (``invite_state.events``: type,
state_key, sender, content; spec "Stripped state"), so everything is read from
there and checked as it enters: a room whose state names no invite for us, or
whose fields have the wrong types, gives no ``Invite``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from olmstead.client.rooms import MAX_NAME_LENGTH, is_identifier

__all__ = ["Invite", "read_invites"]

#: stripped state events read per invited room; a hostile server may send more
MAX_STRIPPED_STATE = 200


@dataclass(frozen=True)
class Invite:
    """An invite to a room, as the application sees it (``Client.on_invite``).

    ``inviter`` is the sender of our ``m.room.member`` invite event; ``encrypted``
    says whether the stripped state names an ``m.room.encryption`` event (servers
    share it by default, but need not); ``name`` is the room's ``m.room.name``.
    ``state`` holds the stripped state events as they came (up to
    ``MAX_STRIPPED_STATE``, mappings only). Join with ``Client.join(room_id)``.
    """

    room_id: str
    inviter: str
    encrypted: bool
    name: str | None
    is_direct: bool
    state: tuple[Mapping[str, Any], ...]


def read_invites(section: Any, own_user_id: str) -> list[Invite]:
    """The invites in a sync's ``rooms.invite`` object, for ``own_user_id``."""
    if not isinstance(section, Mapping):
        return []
    invites = []
    for room_id, room in section.items():
        if not is_identifier(room_id, "!"):
            continue
        invite = _read_invite(room_id, room, own_user_id)
        if invite is not None:
            invites.append(invite)
    return invites


def _read_invite(room_id: str, room: Any, own_user_id: str) -> Invite | None:
    stripped = room.get("invite_state") if isinstance(room, Mapping) else None
    events = stripped.get("events") if isinstance(stripped, Mapping) else None
    if not isinstance(events, list):
        return None
    state = tuple(e for e in events[:MAX_STRIPPED_STATE] if isinstance(e, Mapping))
    inviter, is_direct, name, encrypted = None, False, None, False
    for event in state:
        kind, content, key = event.get("type"), event.get("content"), event.get("state_key")
        if not isinstance(content, Mapping) or not isinstance(key, str):
            continue
        if kind == "m.room.member" and key == own_user_id:
            sender = event.get("sender")
            if content.get("membership") == "invite" and isinstance(sender, str):
                inviter, is_direct = sender, content.get("is_direct") is True
        elif kind == "m.room.encryption" and isinstance(content.get("algorithm"), str):
            encrypted = True
        elif kind == "m.room.name" and key == "":
            value = content.get("name")
            name = value[:MAX_NAME_LENGTH] if isinstance(value, str) and value else None
    if inviter is None:
        return None
    return Invite(room_id, inviter, encrypted, name, is_direct, state)
