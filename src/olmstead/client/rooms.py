"""What the client knows of rooms: encryption, members, history visibility, and events.

Room state is read from the server when it is first needed and kept in memory,
refreshed whenever a sync's timeline or state carries an event that changes it,
so nothing here must survive a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from olmstead.sessions.group_sessions import RoomSettings

__all__ = ["RoomEvent", "RoomState"]

#: state events that change who gets a room key, or whether there is one
KEY_STATE_EVENTS = {"m.room.member", "m.room.encryption", "m.room.history_visibility"}


@dataclass
class RoomState:
    room_id: str
    encryption: RoomSettings | None = None
    joined: set[str] = field(default_factory=set)
    invited: set[str] = field(default_factory=set)
    history_visibility: str = "shared"

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    def key_recipients(self) -> set[str]:
        """Who gets the room key: joined members, and invited ones unless history is joined-only."""
        if self.history_visibility == "joined":
            return set(self.joined)
        return self.joined | self.invited

    def apply(self, event: Mapping[str, Any]) -> None:
        """Take one state event into account."""
        kind, content, key = event.get("type"), event.get("content"), event.get("state_key")
        if not isinstance(content, Mapping):
            return
        if kind == "m.room.encryption" and content.get("algorithm") == "m.megolm.v1.aes-sha2":
            self.encryption = RoomSettings.from_content(content)
        elif kind == "m.room.history_visibility":
            self.history_visibility = str(content.get("history_visibility", "shared"))
        elif kind == "m.room.member" and isinstance(key, str):
            membership = content.get("membership")
            self.joined.discard(key)
            self.invited.discard(key)
            if membership == "join":
                self.joined.add(key)
            elif membership == "invite":
                self.invited.add(key)


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
