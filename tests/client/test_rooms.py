"""Room state as the client follows it: who gets the room key, and the room's settings."""

from __future__ import annotations

import pytest

from olmstead.client.rooms import RoomState
from olmstead.sessions.group_sessions import RoomSettings


def member(user: str, membership: str) -> dict[str, object]:
    return {"type": "m.room.member", "state_key": user, "content": {"membership": membership}}


@pytest.mark.parametrize(
    ("visibility", "expected"),
    [
        ("shared", {"@a:x", "@b:x"}),
        ("invited", {"@a:x", "@b:x"}),
        ("world_readable", {"@a:x", "@b:x"}),
        ("joined", {"@a:x"}),
    ],
)
def test_invited_members_get_keys_unless_history_is_joined_only(
    visibility: str, expected: set[str]
) -> None:
    room = RoomState("!r:x")
    for event in (
        member("@a:x", "join"),
        member("@b:x", "invite"),
        member("@c:x", "join"),
        member("@c:x", "leave"),
        member("@d:x", "ban"),
        {
            "type": "m.room.history_visibility",
            "state_key": "",
            "content": {"history_visibility": visibility},
        },
    ):
        room.apply(event)
    assert room.key_recipients() == expected


def test_encryption_settings_come_from_the_state_event() -> None:
    room = RoomState("!r:x")
    assert not room.encrypted
    room.apply(
        {
            "type": "m.room.encryption",
            "state_key": "",
            "content": {"algorithm": "m.megolm.v1.aes-sha2", "rotation_period_msgs": 10},
        }
    )
    assert room.encryption == RoomSettings(rotation_period_msgs=10)
    room.apply({"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "x"}})
    assert room.encryption == RoomSettings(rotation_period_msgs=10)  # unknown: ignored
