"""Relations in encrypted rooms: in the clear for the server, checked against the payload."""

from __future__ import annotations

from typing import Any

import pytest

from olmstead import LocalProtocolError
from olmstead.relations import (
    edit_content,
    reaction_content,
    reply_content,
    thread_reply_content,
)
from tests.machine.test_megolm import BOB, ROOM, Timeline, room_with

THREAD = {
    "rel_type": "m.thread",
    "event_id": "$root",
    "is_falling_back": True,
    "m.in_reply_to": {"event_id": "$root"},
}


async def test_a_relation_travels_in_the_clear_and_reaches_the_receiver() -> None:
    alice, (bob,) = await room_with(BOB)
    content = thread_reply_content("$root", "in the thread")
    encrypted = await alice.machine.encrypt_room_event(ROOM, "m.room.message", content)
    assert encrypted["m.relates_to"] == THREAD  # the server can thread it
    assert "in the thread" not in str(encrypted)

    got = await bob.machine.decrypt_room_event(ROOM, Timeline().event(alice, encrypted))
    assert got.relation == THREAD
    assert not got.relation_mismatch
    assert got.content["m.relates_to"] == THREAD
    assert got.content["body"] == "in the thread"


async def test_events_without_relations_carry_none() -> None:
    alice, (bob,) = await room_with(BOB)
    encrypted = await alice.machine.encrypt_room_event(ROOM, "m.room.message", {"body": "x"})
    assert "m.relates_to" not in encrypted
    got = await bob.machine.decrypt_room_event(ROOM, Timeline().event(alice, encrypted))
    assert got.relation is None
    assert not got.relation_mismatch


@pytest.mark.parametrize(
    "clear",
    [
        {"rel_type": "m.replace", "event_id": "$someone-elses"},  # retargeted
        None,  # stripped
        {"rel_type": "m.thread", "event_id": "$other-thread"},
    ],
)
async def test_a_clear_relation_that_differs_from_the_encrypted_one_is_reported(
    clear: dict[str, Any] | None,
) -> None:
    alice, (bob,) = await room_with(BOB)
    content = edit_content("$mine", "fixed")
    encrypted = await alice.machine.encrypt_room_event(ROOM, "m.room.message", content)
    if clear is None:
        encrypted.pop("m.relates_to")
    else:
        encrypted["m.relates_to"] = clear  # the server rewrites what it can see

    got = await bob.machine.decrypt_room_event(ROOM, Timeline().event(alice, encrypted))
    assert got.relation_mismatch
    assert got.relation == clear
    # the content keeps what the sender encrypted
    assert got.content["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$mine"}


async def test_a_relation_only_in_the_clear_is_the_event_s_relation() -> None:
    # senders may leave m.relates_to out of the payload; the clear one is then the relation
    alice, (bob,) = await room_with(BOB)
    encrypted = await alice.machine.encrypt_room_event(ROOM, "m.reaction", {})
    encrypted["m.relates_to"] = {"rel_type": "m.annotation", "event_id": "$x", "key": "👍"}
    got = await bob.machine.decrypt_room_event(ROOM, Timeline().event(alice, encrypted))
    assert not got.relation_mismatch
    assert got.relation == encrypted["m.relates_to"]
    assert got.content == {"m.relates_to": encrypted["m.relates_to"]}


@pytest.mark.parametrize("junk", ["$string", 5, ["list"], None])
async def test_a_malformed_clear_relation_is_no_relation(junk: Any) -> None:
    alice, (bob,) = await room_with(BOB)
    encrypted = await alice.machine.encrypt_room_event(ROOM, "m.room.message", {"body": "x"})
    encrypted["m.relates_to"] = junk
    got = await bob.machine.decrypt_room_event(ROOM, Timeline().event(alice, encrypted))
    assert got.relation is None
    assert not got.relation_mismatch
    assert "m.relates_to" not in got.content


def test_the_helpers_make_the_spec_s_shapes() -> None:
    assert reply_content("$a", "hi") == {
        "msgtype": "m.text",
        "body": "hi",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$a"}},
    }
    thread = thread_reply_content("$root", {"msgtype": "m.notice", "body": "n"}, latest_event="$b")
    assert thread["m.relates_to"]["m.in_reply_to"] == {"event_id": "$b"}
    assert thread["msgtype"] == "m.notice"
    edit = edit_content("$a", {"msgtype": "m.text", "body": "new", "m.relates_to": {"x": 1}})
    assert edit == {
        "msgtype": "m.text",
        "body": "* new",
        "m.new_content": {"msgtype": "m.text", "body": "new"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$a"},
    }
    assert reaction_content("$a", "👍") == {
        "m.relates_to": {"rel_type": "m.annotation", "event_id": "$a", "key": "👍"}
    }
    with pytest.raises(LocalProtocolError):
        reply_content("not-an-id", "x")
    with pytest.raises(LocalProtocolError):
        reaction_content("$a", "")
