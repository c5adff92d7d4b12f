"""What the client knows of rooms: encryption, members, names, history visibility, events.

Room state is read from the server when it is first needed and kept in memory,
refreshed whenever a sync's timeline or state carries an event that changes it,
so nothing here must survive a restart. Every field is checked as it enters:
a state event of the wrong shape changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from olmstead import boundary
from olmstead.identities.trust import TrustLevel
from olmstead.sessions.group_sessions import MEGOLM_ALGORITHM, RoomSettings

__all__ = ["Room", "RoomEvent", "RoomState"]

#: state events that change who gets a room key, or whether there is one
KEY_STATE_EVENTS = {"m.room.member", "m.room.encryption", "m.room.history_visibility"}
#: display names, room names and algorithm names are cut to this many characters
MAX_NAME_LENGTH = 1000
#: the spec's bound on a room or user ID, sigil and server name included (appendix
#: "Identifier Grammar"); longer ones could not be stored (PostgreSQL's index rows)
MAX_ID_BYTES = 255


def is_identifier(value: Any, sigil: str) -> bool:
    """Whether ``value`` is a string starting with ``sigil`` ("!" a room, "@" a user) that
    is valid UTF-8 of at most ``MAX_ID_BYTES`` bytes."""
    if not isinstance(value, str) or not value.startswith(sigil):
        return False
    # no NUL and no lone surrogate (boundary.is_identifier), and the spec's length
    return boundary.is_identifier(value) and len(value.encode()) <= MAX_ID_BYTES


@dataclass(frozen=True)
class Room:
    """A joined room as the application reads it (``Client.rooms``, ``Client.room``).

    A snapshot: taken when asked for, it does not change afterwards. ``joined`` and
    ``invited`` are user IDs; ``display_names`` maps a joined or invited member to the
    display name of their ``m.room.member`` event, where they set one. ``algorithm``
    is the room's ``m.room.encryption`` algorithm (``None``: not encrypted) and
    ``encryption`` its Megolm rotation settings (``None`` unless the algorithm is
    ``m.megolm.v1.aes-sha2``, the only one olmstead encrypts with). Spec: "Room
    membership", "m.room.encryption", "Calculating the display name for a user".
    """

    room_id: str
    name: str | None
    algorithm: str | None
    encryption: RoomSettings | None
    joined: frozenset[str]
    invited: frozenset[str]
    display_names: Mapping[str, str]
    history_visibility: str

    @property
    def encrypted(self) -> bool:
        return self.algorithm is not None

    def display_name(self, user_id: str) -> str:
        """The member's display name, or their user ID where they set none."""
        return self.display_names.get(user_id, user_id)


@dataclass
class RoomState:
    """What the client follows of one joined room; ``apply`` takes one state event."""

    room_id: str
    encryption: RoomSettings | None = None
    joined: set[str] = field(default_factory=set)
    invited: set[str] = field(default_factory=set)
    history_visibility: str = "shared"
    #: the ``m.room.encryption`` algorithm, also one olmstead cannot encrypt with
    algorithm: str | None = None
    name: str | None = None
    display_names: dict[str, str] = field(default_factory=dict)

    @property
    def encrypted(self) -> bool:
        return self.algorithm is not None

    def key_recipients(self) -> set[str]:
        """Who gets the room key: joined members, and invited ones unless history is joined-only."""
        if self.history_visibility == "joined":
            return set(self.joined)
        return self.joined | self.invited

    def apply(self, event: Any) -> None:
        """Take one state event into account; anything malformed is ignored.

        Encryption is never switched off: a later ``m.room.encryption`` without a
        known algorithm keeps the earlier settings (the spec forbids disabling it).
        """
        if not isinstance(event, Mapping):
            return
        kind, content, key = event.get("type"), event.get("content"), event.get("state_key")
        if not isinstance(content, Mapping) or not isinstance(key, str):
            return
        if kind == "m.room.encryption":
            algorithm = content.get("algorithm")
            if algorithm == MEGOLM_ALGORITHM:
                self.algorithm, self.encryption = algorithm, RoomSettings.from_content(content)
            elif isinstance(algorithm, str) and self.algorithm is None:
                self.algorithm = algorithm[:MAX_NAME_LENGTH]  # encrypted, in a way we can't
        elif kind == "m.room.history_visibility" and key == "":
            visibility = content.get("history_visibility")
            self.history_visibility = visibility if isinstance(visibility, str) else "shared"
        elif kind == "m.room.name" and key == "":
            name = content.get("name")
            self.name = name[:MAX_NAME_LENGTH] if isinstance(name, str) and name else None
        elif kind == "m.room.member" and is_identifier(key, "@"):  # tracked, so stored
            membership = content.get("membership")
            self.joined.discard(key)
            self.invited.discard(key)
            self.display_names.pop(key, None)
            if membership == "join":
                self.joined.add(key)
            elif membership == "invite":
                self.invited.add(key)
            else:
                return
            name = content.get("displayname")
            if isinstance(name, str) and name:
                self.display_names[key] = name[:MAX_NAME_LENGTH]

    def snapshot(self) -> Room:
        return Room(
            self.room_id,
            self.name,
            self.algorithm,
            self.encryption,
            frozenset(self.joined),
            frozenset(self.invited),
            MappingProxyType(dict(self.display_names)),
            self.history_visibility,
        )


@dataclass(frozen=True)
class RoomEvent:
    """A room event as the application sees it: decrypted where it was encrypted."""

    room_id: str
    event_id: str
    sender: str
    type: str
    content: dict[str, Any]
    encrypted: bool
    #: for encrypted events: the sending device is known and its keys match
    verified: bool
    raw: Mapping[str, Any]
    #: ``m.relates_to`` (a reply, thread, edit, reaction or reference) as the server
    #: sees it: from the clear part of an encrypted event, or ``None``
    relation: dict[str, Any] | None = None
    #: an encrypted event whose clear relation differs from the one the sender
    #: encrypted: the server or the sender changed it; trust neither
    relation_mismatch: bool = False
    #: for encrypted events: the sending device's trust level (``None``: not encrypted)
    trust: TrustLevel | None = None

    @property
    def rel_type(self) -> str | None:
        """``m.thread``, ``m.replace``, ``m.annotation``, ``m.reference``, or ``None``."""
        kind = self.relation.get("rel_type") if self.relation else None
        return kind if isinstance(kind, str) else None

    @property
    def relates_to_event(self) -> str | None:
        """The event this one relates to (for a plain reply: the one it answers)."""
        if not self.relation:
            return None
        target = self.relation.get("event_id")
        if not isinstance(target, str):
            reply = self.relation.get("m.in_reply_to")
            target = reply.get("event_id") if isinstance(reply, Mapping) else None
        return target if isinstance(target, str) else None
