"""Room state as the client follows it: who gets the room key, and the room's settings."""

from __future__ import annotations

import pytest

from olmstead.client.rooms import MAX_NAME_LENGTH, RoomState
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
    assert room.algorithm == "m.megolm.v1.aes-sha2"


def test_members_names_and_encryption_are_read_and_kept_current() -> None:
    room = RoomState("!r:x")
    for event in (
        {"type": "m.room.name", "state_key": "", "content": {"name": "Ops"}},
        {
            "type": "m.room.member",
            "state_key": "@a:x",
            "content": {"membership": "join", "displayname": "Ann"},
        },
        {"type": "m.room.member", "state_key": "@b:x", "content": {"membership": "invite"}},
        {
            "type": "m.room.encryption",
            "state_key": "",
            "content": {"algorithm": "m.megolm.v1.aes-sha2", "rotation_period_ms": 60_000},
        },
    ):
        room.apply(event)
    seen = room.snapshot()
    assert (seen.name, seen.encrypted, seen.algorithm) == ("Ops", True, "m.megolm.v1.aes-sha2")
    assert seen.encryption == RoomSettings(rotation_period_ms=60_000)
    assert (seen.joined, seen.invited) == (frozenset({"@a:x"}), frozenset({"@b:x"}))
    assert (seen.display_name("@a:x"), seen.display_name("@b:x")) == ("Ann", "@b:x")

    room.apply(member("@a:x", "leave"))
    room.apply(member("@b:x", "join"))
    now = room.snapshot()
    assert (now.joined, now.invited, dict(now.display_names)) == (
        frozenset({"@b:x"}),
        frozenset(),
        {},
    )
    assert seen.joined == {"@a:x"}  # a snapshot does not change afterwards
    with pytest.raises(TypeError):
        seen.display_names["@c:x"] = "Cat"  # type: ignore[index]


def test_an_unknown_algorithm_still_counts_as_encrypted() -> None:
    room = RoomState("!r:x")
    room.apply({"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.new"}})
    assert room.encrypted
    assert room.encryption is None
    room.apply({"type": "m.room.encryption", "state_key": "", "content": {}})
    assert room.algorithm == "m.new"
    room.apply(
        {
            "type": "m.room.encryption",
            "state_key": "",
            "content": {"algorithm": "m.megolm.v1.aes-sha2"},
        }
    )
    assert room.encryption == RoomSettings()


@pytest.mark.parametrize(
    "event",
    [
        "not an event",
        None,
        {"type": "m.room.member", "state_key": 5, "content": {"membership": "join"}},
        {"type": "m.room.member", "state_key": "@z:x", "content": "join"},
        {"type": "m.room.member", "state_key": "@z:x", "content": {"membership": 1}},
        # not user IDs the spec allows: tracked users are stored, and these could not be
        {"type": "m.room.member", "state_key": "z:x", "content": {"membership": "join"}},
        {"type": "m.room.member", "state_key": "@" + "z" * 300, "content": {"membership": "join"}},
        {"type": "m.room.member", "state_key": "@\ud800:x", "content": {"membership": "join"}},
        {"type": "m.room.name", "state_key": "", "content": {"name": ["x"]}},
        {"type": "m.room.name", "state_key": "other", "content": {"name": "Evil"}},
        {
            "type": "m.room.history_visibility",
            "state_key": "x",
            "content": {"history_visibility": "joined"},
        },
        {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": 7}},
        {"type": "m.room.encryption", "content": {"algorithm": "m.megolm.v1.aes-sha2"}},
    ],
)
def test_malformed_state_changes_nothing(event: object) -> None:
    room = RoomState("!r:x")
    room.apply(member("@a:x", "join"))
    before = room.snapshot()
    room.apply(event)
    assert room.snapshot() == before


def test_names_are_cut_to_a_bound() -> None:
    room = RoomState("!r:x")
    room.apply(
        {
            "type": "m.room.member",
            "state_key": "@a:x",
            "content": {"membership": "join", "displayname": "A" * 100_000},
        }
    )
    assert len(room.snapshot().display_name("@a:x")) == MAX_NAME_LENGTH
