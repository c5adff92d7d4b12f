"""Invites read from a sync's ``rooms.invite`` stripped state, every field checked."""

from __future__ import annotations

from typing import Any

import pytest

from olmstead.client.invites import MAX_STRIPPED_STATE, read_invites

ME = "@bot:x"


def invited(*events: Any) -> dict[str, Any]:
    return {"invite_state": {"events": list(events)}}


def our_invite(sender: Any = "@alice:x", **content: Any) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": ME,
        "sender": sender,
        "content": {"membership": "invite", **content},
    }


ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "sender": "@alice:x",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}
NAME = {"type": "m.room.name", "state_key": "", "sender": "@alice:x", "content": {"name": "Ops"}}


def test_an_invite_names_the_inviter_the_room_and_its_encryption() -> None:
    (invite,) = read_invites({"!r:x": invited(NAME, ENCRYPTION, our_invite(is_direct=True))}, ME)
    assert (invite.room_id, invite.inviter, invite.encrypted) == ("!r:x", "@alice:x", True)
    assert (invite.name, invite.is_direct) == ("Ops", True)
    assert len(invite.state) == 3
    (plain,) = read_invites({"!p:x": invited(our_invite())}, ME)
    assert (plain.encrypted, plain.name, plain.is_direct) == (False, None, False)


@pytest.mark.parametrize(
    "section",
    [
        None,
        [],
        "rooms",
        {"!r:x": None},
        {"!r:x": {"invite_state": []}},
        {"!r:x": {"invite_state": {"events": "x"}}},
        {"!r:x": invited(NAME)},  # no invite for us
        {"!r:x": invited({**our_invite(), "state_key": "@someone:x"})},
        {"!r:x": invited(our_invite(sender=5))},
        {"!r:x": invited({**our_invite(), "content": {"membership": "join"}})},
        {"!r:x": invited({**our_invite(), "content": "invite"})},
        {"not a room id": invited(our_invite())},
    ],
)
def test_malformed_invites_give_nothing(section: Any) -> None:
    assert read_invites(section, ME) == []


def test_stripped_state_is_bounded_and_junk_skipped() -> None:
    junk: list[Any] = ["x", None, 3] + [NAME] * (MAX_STRIPPED_STATE * 3)
    (invite,) = read_invites({"!r:x": invited(our_invite(), *junk)}, ME)
    assert len(invite.state) <= MAX_STRIPPED_STATE
    assert all(isinstance(event, dict) for event in invite.state)
