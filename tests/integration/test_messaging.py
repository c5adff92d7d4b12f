"""Encrypted rooms against the real Synapse: olmstead with olmstead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from olmstead import Client, UnknownRoomKey
from olmstead.client.rooms import RoomEvent
from tests.conftest import record_commits
from tests.integration.harness import close_client, open_client, session_of


async def crypto_client(
    url: str, path: Path, user: dict[str, Any]
) -> tuple[Client, list[RoomEvent]]:
    client = await open_client(url, path, session_of(url, user))
    await client.init_crypto()
    seen: list[RoomEvent] = []
    client.on_room_event(seen.append)
    client.on_decryption_failure(lambda room, event, error: seen.append(error))  # type: ignore[arg-type]
    await client.sync_once()
    return client, seen


def messages(seen: list[Any]) -> list[tuple[str, str, bool]]:
    return [
        (e.sender, e.content["body"], e.encrypted)
        for e in seen
        if isinstance(e, RoomEvent) and e.type == "m.room.message"
    ]


Seen = tuple[Client, list[Any]]


async def two_in_a_room(
    url: str, tmp_path: Path, a_user: dict[str, Any], b_user: dict[str, Any]
) -> tuple[Seen, Seen, str]:
    """Alice and Bob, each an olmstead client, joined to an encrypted room Alice made."""
    alice = await crypto_client(url, tmp_path / "alice.db", a_user)
    bob = await crypto_client(url, tmp_path / "bob.db", b_user)
    room = await alice[0].create_room(invite=[b_user["user_id"]])
    await bob[0].sync_once()
    await bob[0].join(room)
    await alice[0].sync_once()
    return alice, bob, room


async def test_two_olmstead_clients_talk_in_an_encrypted_room(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    a_user, b_user = new_user(), new_user()
    (alice, alice_seen), (bob, bob_seen), room = await two_in_a_room(
        homeserver.base_url, tmp_path, a_user, b_user
    )

    await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "hello bob"})
    await bob.sync_once()
    assert (a_user["user_id"], "hello bob", True) in messages(bob_seen)

    await bob.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "hello alice"})
    await alice.sync_once()
    assert (b_user["user_id"], "hello alice", True) in messages(alice_seen)
    assert [e for e in alice_seen + bob_seen if not isinstance(e, RoomEvent)] == []

    # by now each knows the other's device: later messages are verified
    await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "again"})
    await bob.sync_once()
    last = [e for e in bob_seen if isinstance(e, RoomEvent) and e.type == "m.room.message"][-1]
    assert last.content["body"] == "again"
    assert last.verified
    await close_client(alice)
    await close_client(bob)


async def test_an_event_waits_for_its_late_room_key(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    a_user, b_user = new_user(), new_user()
    (alice, _), (bob, bob_seen), room = await two_in_a_room(
        homeserver.base_url, tmp_path, a_user, b_user
    )

    # alice prepares the key for bob but holds it back while the event goes out
    machine = alice.machine
    assert machine is not None
    members = [a_user["user_id"], b_user["user_id"]]
    await machine.update_tracked_users(members)
    await alice.process_outgoing()
    claim = await machine.get_missing_sessions(members)
    assert claim is not None
    await machine.mark_request_as_sent(claim.request_id, await alice.http.send(claim))
    held_back = await machine.share_room_key(room, members)
    content = await machine.encrypt_room_event(room, "m.room.message", {"body": "early bird"})
    await alice.http.request(
        "PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.encrypted/late-key-1", content
    )

    await bob.sync_once()
    assert messages(bob_seen) == []  # kept, and told at once: the key may still come
    (waiting,) = [e for e in bob_seen if not isinstance(e, RoomEvent)]
    assert isinstance(waiting, UnknownRoomKey)
    assert waiting.final is False

    for request in held_back:
        await machine.mark_request_as_sent(request.request_id, await alice.http.send(request))
    await bob.sync_once()
    assert messages(bob_seen) == [(a_user["user_id"], "early bird", True)]
    await close_client(alice)
    await close_client(bob)


async def test_events_are_delivered_again_if_the_application_did_not_finish(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    a_user, b_user = new_user(), new_user()
    (alice, _), (bob, _), room = await two_in_a_room(homeserver.base_url, tmp_path, a_user, b_user)
    await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "important"})

    def crash(event: RoomEvent) -> None:
        if event.type == "m.room.message":
            raise RuntimeError("the application died handling it")

    bob._room_callbacks.clear()
    bob.on_room_event(crash)
    with pytest.raises(RuntimeError):
        await bob.sync_once()

    got: list[RoomEvent] = []
    bob._room_callbacks.clear()
    bob.on_room_event(got.append)
    await bob.sync_once()  # the token was not saved: the same batch comes again
    assert [e.content["body"] for e in got if e.type == "m.room.message"] == ["important"]
    await close_client(alice)
    await close_client(bob)


async def test_a_sync_s_room_events_are_decrypted_in_one_commit(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    a_user, b_user = new_user(), new_user()
    (alice, _alice_seen), (bob, bob_seen), room = await two_in_a_room(
        homeserver.base_url, tmp_path, a_user, b_user
    )
    for n in range(5):
        await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"m{n}"})
    assert bob.store is not None
    committed = record_commits(bob.store)
    await bob.sync_once()
    commits = [len(c.message_indices) for c in committed if c.message_indices]
    assert [body for _s, body, _e in messages(bob_seen)][-5:] == [f"m{n}" for n in range(5)]
    assert commits == [5]  # one commit for the sync's five events, before any reached us
    await close_client(alice)
    await close_client(bob)
