"""Room events in batches: one commit per batch, replays caught inside a batch, the cache
of inbound sessions dropped when the store changed hands."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest

from olmstead import Changes, LocalProtocolError, MemoryStore, OlmMachine
from olmstead.errors import MegolmDecryptionFailed, ReplayedMessage, UnknownRoomKey
from olmstead.olm.signing import verify_signed_json
from olmstead.sessions.group_sessions import DecryptedRoomEvent, RoomSettings
from olmstead.sessions.olm_sessions import DecryptedToDevice
from tests.conftest import FAST_LEASE, KEY, pause, record_commits
from tests.machine.pair import Peer, new_peer, open_session, send
from tests.machine.test_megolm import BOB, CAROL, ROOM, Timeline, deliver_room_keys, room_with


def count_commits(peer: Peer) -> list[Changes]:
    """Every ``Changes`` the peer's store commits from now on."""
    return record_commits(peer.machine.store)


async def test_a_batch_decrypts_in_order_with_one_commit() -> None:
    alice, (bob,) = await room_with(BOB)
    contents = [{"body": f"message {n}"} for n in range(5)]
    alice_commits = count_commits(alice)
    encrypted = await alice.machine.encrypt_room_events(
        ROOM, [("m.room.message", c) for c in contents]
    )
    assert len(alice_commits) == 1  # the five ratchet steps, committed once
    timeline = Timeline()
    events = [timeline.event(alice, content) for content in encrypted]

    bob_commits = count_commits(bob)
    results = await bob.machine.decrypt_room_events(ROOM, events)
    assert [r.content for r in results if isinstance(r, DecryptedRoomEvent)] == contents
    assert [r.message_index for r in results if isinstance(r, DecryptedRoomEvent)] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert len(bob_commits) == 1
    assert len(bob_commits[0].message_indices) == 5
    for event, index in zip(events, range(5), strict=True):  # recorded: a replay is refused
        seen = await bob.machine.store.get_message_index(encrypted[0]["session_id"], index)
        assert seen is not None
        assert seen.event_id == event["event_id"]


async def test_a_replay_inside_one_batch_is_refused_and_the_same_event_is_fine() -> None:
    alice, (bob,) = await room_with(BOB)
    timeline = Timeline()
    (content,) = await alice.machine.encrypt_room_events(ROOM, [("m.text", {"n": 1})])
    event = timeline.event(alice, content)
    replay = {**copy.deepcopy(event), "event_id": "$replayed"}
    unknown = timeline.event(alice, {**content, "session_id": "no such session"})

    first, again, replayed, missing = await bob.machine.decrypt_room_events(
        ROOM, [event, copy.deepcopy(event), replay, unknown]
    )
    assert isinstance(first, DecryptedRoomEvent)
    assert isinstance(again, DecryptedRoomEvent)  # the same event seen twice
    assert isinstance(replayed, ReplayedMessage)
    assert event["event_id"] in str(replayed)
    assert isinstance(missing, UnknownRoomKey)
    # and in a later batch, the record from this one holds
    (later,) = await bob.machine.decrypt_room_events(ROOM, [{**replay, "event_id": "$3"}])
    assert isinstance(later, ReplayedMessage)


async def test_a_batch_past_the_rotation_limit_is_refused_whole() -> None:
    alice, (bob,) = await room_with(BOB, settings=RoomSettings(rotation_period_msgs=3))
    with pytest.raises(LocalProtocolError, match="3 messages left"):
        await alice.machine.encrypt_room_events(ROOM, [("m.text", {})] * 4)
    # nothing was used up: three still fit, and they decrypt
    encrypted = await alice.machine.encrypt_room_events(ROOM, [("m.text", {})] * 3)
    timeline = Timeline()
    results = await bob.machine.decrypt_room_events(
        ROOM, [timeline.event(alice, c) for c in encrypted]
    )
    assert [r.message_index for r in results if isinstance(r, DecryptedRoomEvent)] == [0, 1, 2]
    with pytest.raises(LocalProtocolError, match="share_room_key"):
        await alice.machine.encrypt_room_event(ROOM, "m.text", {})


async def test_the_session_cache_is_dropped_when_the_store_changed_hands() -> None:
    alice, (bob,) = await room_with(BOB)
    timeline = Timeline()
    first, second = await alice.machine.encrypt_room_events(ROOM, [("m.text", {})] * 2)
    (got,) = await bob.machine.decrypt_room_events(ROOM, [timeline.event(alice, first)])
    assert isinstance(got, DecryptedRoomEvent)  # the session is now in bob's cache
    assert got.signing_key == alice.machine.identity_keys["ed25519"]

    # bob's process freezes; another takes the store and replaces the session's record
    pause(bob.machine.store)
    lock = bob.db.lock
    assert lock is not None
    bob.db.lock = type(lock)(lock.holder, lock.acquired_at, 0.0, lock.generation)
    other = await MemoryStore.open(KEY, bob.db, lease=FAST_LEASE)
    stored = await other.get_inbound_group_session(ROOM, first["session_id"])
    assert stored is not None
    # what the store holds now differs from bob's cache (written straight into the
    # database: through save_changes a session keeps its first sharer's keys)
    pickle = bob.db.inbound_group[ROOM, first["session_id"]][2]
    bob.db.inbound_group[ROOM, first["session_id"]] = (
        "another curve25519 key",
        "another ed25519 key",
        pickle,
    )
    await other.close()
    await asyncio.sleep(FAST_LEASE.duration)  # bob's own view of his lease runs out too

    # bob resumes and takes the lease back under a new generation, so he reads the store's
    # record, not his cache (no write fails on the way: this is the reload, not a failure)
    (got,) = await bob.machine.decrypt_room_events(ROOM, [timeline.event(alice, second)])
    assert isinstance(got, DecryptedRoomEvent)
    assert got.signing_key == "another ed25519 key"


async def test_a_failed_commit_drops_the_session_cache() -> None:
    alice, (bob,) = await room_with(BOB)
    (content,) = await alice.machine.encrypt_room_events(ROOM, [("m.text", {})])
    await bob.machine.decrypt_room_events(ROOM, [Timeline().event(alice, content)])
    assert bob.machine.megolm._inbound  # cached

    store = bob.machine.store
    original = store.save_changes

    async def failing(changes: Any, *, generation: int | None = None) -> None:
        raise OSError("disk full")

    store.save_changes = failing  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        await bob.machine.decrypt_room_events(ROOM, [Timeline().event(alice, content)])
    store.save_changes = original  # type: ignore[method-assign]
    assert not bob.machine.megolm._inbound


async def test_a_device_listed_unchanged_is_not_checked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, (bob,) = await room_with(BOB)
    checks: list[str] = []

    def counted(obj: dict[str, Any], user_id: str, key_id: str, key: str) -> bool:
        checks.append(key_id)
        return verify_signed_json(obj, user_id, key_id, key)

    monkeypatch.setattr("olmstead.identities.device.verify_signed_json", counted)

    async def query_again(answer: dict[str, Any]) -> None:
        await alice.machine.receive_sync_changes(device_lists={"changed": [bob.user_id]})
        (query,) = await alice.machine.outgoing_requests()
        await alice.machine.mark_request_as_sent(query.request_id, answer)

    await query_again(bob.query_answer())  # alice knows bob since room_with: the same keys
    assert checks == []

    renamed = bob.query_answer()
    keys = renamed["device_keys"][bob.user_id][bob.device_id]
    keys["unsigned"] = {"device_display_name": "bob's phone"}
    await query_again(renamed)
    assert checks == [bob.device_id]  # another keys object: checked
    devices = await alice.machine.get_user_devices(bob.user_id)
    assert devices[bob.device_id].display_name == "bob's phone"


async def test_machine_opened_on_the_store_reads_batched_sessions(tmp_path: Any) -> None:
    """The batch APIs work on a reopened machine (nothing cached yet)."""
    alice, (bob,) = await room_with(BOB)
    encrypted = await alice.machine.encrypt_room_events(
        ROOM, [("m.text", {"n": n}) for n in range(3)]
    )
    await bob.machine.store.close()
    store = await MemoryStore.open(KEY, bob.db, lease=FAST_LEASE)
    machine = await OlmMachine.open(store, bob.user_id, bob.device_id, clock=bob.clock)
    timeline = Timeline()
    results = await machine.decrypt_room_events(ROOM, [timeline.event(alice, c) for c in encrypted])
    assert [r.content for r in results if isinstance(r, DecryptedRoomEvent)] == [
        {"n": n} for n in range(3)
    ]


async def test_a_lone_surrogate_in_content_is_carried_both_ways() -> None:
    """Text cut in the middle of an emoji is valid JSON from the network: it must encrypt
    (as a JSON escape) and come back as it was, over Megolm and over Olm."""
    alice, (bob,) = await room_with(BOB)
    cut = json.loads('"half an emoji: \\ud83d"')
    (content,) = await alice.machine.encrypt_room_events(ROOM, [("m.room.message", {"body": cut})])
    (got,) = await bob.machine.decrypt_room_events(ROOM, [Timeline().event(alice, content)])
    assert isinstance(got, DecryptedRoomEvent)
    assert got.content == {"body": cut}
    (to_bob,) = await bob.machine.receive_sync_changes(
        to_device_events=[await send(alice, bob, "m.custom", {"text": cut})]
    )
    assert isinstance(to_bob, DecryptedToDevice)
    assert to_bob.content == {"text": cut}


async def test_a_batch_that_cannot_be_serialised_steps_no_ratchet() -> None:
    alice, (bob,) = await room_with(BOB)
    with pytest.raises(LocalProtocolError):
        await alice.machine.encrypt_room_events(
            ROOM, [("m.text", {"n": 1}), ("m.text", {"n": 2}), ("m.text", {"bad": object()})]
        )
    stored = await alice.machine.store.get_outbound_group_session(ROOM)
    assert stored is not None
    assert stored.session.message_index == 0  # nothing committed: nothing stepped
    (content,) = await alice.machine.encrypt_room_events(ROOM, [("m.text", {"n": 3})])
    (got,) = await bob.machine.decrypt_room_events(ROOM, [Timeline().event(alice, content)])
    assert isinstance(got, DecryptedRoomEvent)
    assert got.message_index == 0  # memory did not run ahead of the store either


async def test_a_payload_nested_thousands_deep_fails_alone() -> None:
    alice, (bob,) = await room_with(BOB)
    good, spare = await alice.machine.encrypt_room_events(ROOM, [("m.text", {"n": 1})] * 2)
    outbound = await alice.machine.store.get_outbound_group_session(ROOM)
    assert outbound is not None  # a copy at the next index: a valid ciphertext of our own
    deep = outbound.session.encrypt(b"[" * 50_000 + b"]" * 50_000)
    crafted = {**spare, "ciphertext": deep.to_base64()}
    timeline = Timeline()
    results = await bob.machine.decrypt_room_events(
        ROOM, [timeline.event(alice, good), timeline.event(alice, crafted)]
    )
    assert isinstance(results[0], DecryptedRoomEvent)
    assert isinstance(results[1], MegolmDecryptionFailed)


async def test_a_room_key_shared_again_by_another_device_is_ignored() -> None:
    alice, (carol,) = await room_with(CAROL)
    (early,) = await alice.machine.encrypt_room_events(ROOM, [("m.text", {"n": 0})])
    bob = await new_peer(BOB, "BOBDEV")  # joins later: the key reaches him at index 1
    await open_session(alice, bob)
    await deliver_room_keys(await alice.machine.share_room_key(ROOM, [CAROL, BOB]), alice, bob)
    session_id = early["session_id"]
    mine = await bob.machine.store.get_inbound_group_session(ROOM, session_id)
    assert mine is not None
    assert mine.session.first_known_index == 1

    # carol, who holds the session from index 0, passes it on to bob as if it were hers
    held = await carol.machine.store.get_inbound_group_session(ROOM, session_id)
    assert held is not None
    key = held.session.export_at(0)
    assert key is not None
    await open_session(carol, bob)
    resent = await send(
        carol,
        bob,
        "m.room_key",
        {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": ROOM,
            "session_id": session_id,
            "session_key": key.to_base64(),
        },
    )
    await bob.machine.receive_sync_changes(to_device_events=[resent])
    stored = await bob.machine.store.get_inbound_group_session(ROOM, session_id)
    assert stored is not None
    assert stored.session.first_known_index == 1  # not taken: another device offered it
    assert stored.sender_key == alice.machine.identity_keys["curve25519"]
    (got,) = await bob.machine.decrypt_room_events(ROOM, [Timeline().event(alice, early)])
    assert isinstance(got, UnknownRoomKey | MegolmDecryptionFailed)  # index 0 stays out
