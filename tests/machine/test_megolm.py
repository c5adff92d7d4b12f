"""Megolm between machines, with no network: sharing, rotation, decryption, replay."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from olmstead import LocalProtocolError, MatrixHttpError
from olmstead.errors import (
    MegolmDecryptionFailed,
    ReplayedMessage,
    SenderMismatch,
    UnknownRoomKey,
)
from olmstead.requests import ToDeviceRequest
from olmstead.sessions.group_sessions import RoomSettings
from olmstead.sessions.olm_sessions import DecryptedToDevice
from tests.machine.pair import Peer, deliveries, learn_devices, new_peer, open_session, reopen

ALICE, BOB, CAROL = "@alice:example.org", "@bob:example.org", "@carol:example.org"
ROOM = "!room:example.org"


class Timeline:
    def __init__(self) -> None:
        self.count = 0

    def event(self, sender: Peer, content: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        return {
            "type": "m.room.encrypted",
            "event_id": f"$event{self.count}",
            "sender": sender.user_id,
            "origin_server_ts": 1_700_000_000_000 + self.count,
            "content": content,
        }


async def deliver_room_keys(requests: list[ToDeviceRequest], sender: Peer, *to: Peer) -> None:
    (keys,) = [r for r in requests if r.event_type == "m.room.encrypted"]
    for peer in to:
        (got,) = await peer.machine.receive_sync_changes(
            to_device_events=[deliveries(keys, sender, peer)]
        )
        assert isinstance(got, DecryptedToDevice)
        assert got.type == "m.room_key"


async def room_with(*others: str, settings: RoomSettings | None = None) -> tuple[Peer, list[Peer]]:
    alice = await new_peer(ALICE, "ALICEDEV")
    peers = [await new_peer(user, f"{user[1:4].upper()}DEV") for user in others]
    for peer in peers:
        await open_session(alice, peer)
    requests = await alice.machine.share_room_key(ROOM, others, settings)
    await deliver_room_keys(requests, alice, *peers)
    return alice, peers


async def test_room_events_reach_the_room_and_say_who_sent_them() -> None:
    alice, (bob,) = await room_with(BOB)
    timeline = Timeline()
    content = await alice.machine.encrypt_room_event(ROOM, "m.room.message", {"body": "hi"})
    event = timeline.event(alice, content)

    got = await bob.machine.decrypt_room_event(ROOM, event)
    assert (got.type, got.content) == ("m.room.message", {"body": "hi"})
    assert got.signing_key == alice.machine.identity_keys["ed25519"]
    assert not got.verified  # bob does not know alice's device yet
    await learn_devices(bob, alice)
    assert (await bob.machine.decrypt_room_event(ROOM, event)).verified

    own = await alice.machine.decrypt_room_event(ROOM, event)  # alice reads her own
    assert own.content == {"body": "hi"}


async def test_a_replayed_index_is_refused_but_the_same_event_is_fine() -> None:
    alice, (bob,) = await room_with(BOB)
    timeline = Timeline()
    event = timeline.event(alice, await alice.machine.encrypt_room_event(ROOM, "m.text", {}))
    await bob.machine.decrypt_room_event(ROOM, event)
    await bob.machine.decrypt_room_event(ROOM, copy.deepcopy(event))  # seen again: fine
    replay = {**copy.deepcopy(event), "event_id": "$other"}
    with pytest.raises(ReplayedMessage, match=r"\$event1"):
        await bob.machine.decrypt_room_event(ROOM, replay)
    await bob.machine.store.close()
    bob = await reopen(bob)  # the first use is remembered across restarts
    with pytest.raises(ReplayedMessage):
        await bob.machine.decrypt_room_event(ROOM, {**replay, "origin_server_ts": 1})


async def test_without_the_key_the_error_names_the_session() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    bob = await new_peer(BOB, "BOBDEV")
    await alice.machine.share_room_key(ROOM, [])
    content = await alice.machine.encrypt_room_event(ROOM, "m.text", {})
    with pytest.raises(UnknownRoomKey) as caught:
        await bob.machine.decrypt_room_event(ROOM, Timeline().event(alice, content))
    assert caught.value.session_id == content["session_id"]


async def test_tampered_and_misrouted_events_are_refused() -> None:
    alice, (bob,) = await room_with(BOB)
    timeline = Timeline()
    content = await alice.machine.encrypt_room_event(ROOM, "m.text", {})
    tampered = copy.deepcopy(content)
    text = tampered["ciphertext"]
    tampered["ciphertext"] = text[:30] + ("A" if text[30] != "A" else "B") + text[31:]
    with pytest.raises(MegolmDecryptionFailed):
        await bob.machine.decrypt_room_event(ROOM, timeline.event(alice, tampered))
    with pytest.raises(UnknownRoomKey):  # the key is this room's only
        await bob.machine.decrypt_room_event(
            "!elsewhere:example.org", timeline.event(alice, content)
        )


async def test_a_sender_that_did_not_share_the_key_is_refused() -> None:
    alice, (bob,) = await room_with(BOB)
    await learn_devices(bob, alice)
    content = await alice.machine.encrypt_room_event(ROOM, "m.text", {})
    forged = {**Timeline().event(alice, content), "sender": "@mallory:example.org"}
    with pytest.raises(SenderMismatch, match=r"@mallory:example\.org"):
        await bob.machine.decrypt_room_event(ROOM, forged)


async def test_sessions_rotate_after_the_room_s_message_count() -> None:
    alice, (bob,) = await room_with(BOB, settings=RoomSettings(rotation_period_msgs=2))
    first = await alice.machine.encrypt_room_event(ROOM, "m.text", {"n": 1})
    await alice.machine.encrypt_room_event(ROOM, "m.text", {"n": 2})
    with pytest.raises(LocalProtocolError, match="share_room_key"):
        await alice.machine.encrypt_room_event(ROOM, "m.text", {"n": 3})
    requests = await alice.machine.share_room_key(ROOM, [BOB], RoomSettings(rotation_period_msgs=2))
    await deliver_room_keys(requests, alice, bob)
    third = await alice.machine.encrypt_room_event(ROOM, "m.text", {"n": 3})
    assert third["session_id"] != first["session_id"]
    got = await bob.machine.decrypt_room_event(ROOM, Timeline().event(alice, third))
    assert got.content == {"n": 3}


async def test_a_member_leaving_rotates_the_session() -> None:
    alice, (bob, carol) = await room_with(BOB, CAROL)
    before = await alice.machine.encrypt_room_event(ROOM, "m.text", {})
    requests = await alice.machine.share_room_key(ROOM, [BOB])  # carol left
    (keys,) = requests
    assert set(keys.messages) == {BOB}
    await deliver_room_keys(requests, alice, bob)
    after = await alice.machine.encrypt_room_event(ROOM, "m.text", {"secret": True})
    assert after["session_id"] != before["session_id"]
    with pytest.raises(UnknownRoomKey):
        await carol.machine.decrypt_room_event(ROOM, Timeline().event(alice, after))


async def test_sharing_again_sends_nothing_new() -> None:
    alice, (_bob,) = await room_with(BOB)
    assert await alice.machine.share_room_key(ROOM, [BOB]) == []


async def test_devices_without_olm_sessions_are_told_the_key_is_withheld() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    bob = await new_peer(BOB, "BOBDEV")
    await learn_devices(alice, bob)  # known device, but no session claimed
    (withheld,) = await alice.machine.share_room_key(ROOM, [BOB])
    assert withheld.event_type == "m.room_key.withheld"
    notice = withheld.messages[BOB]["BOBDEV"]
    assert (notice["code"], notice["room_id"]) == ("m.no_olm", ROOM)
    assert await alice.machine.share_room_key(ROOM, [BOB]) == []  # told once
    # once a session exists, the key itself follows
    claim = await alice.machine.get_missing_sessions([BOB])
    assert claim is not None
    await alice.machine.mark_request_as_sent(claim.request_id, bob.claim_answer())
    requests = await alice.machine.share_room_key(ROOM, [BOB])
    await deliver_room_keys(requests, alice, bob)


async def test_both_sides_keep_working_after_a_restart() -> None:
    alice, (bob,) = await room_with(BOB)
    timeline = Timeline()
    first = await alice.machine.encrypt_room_event(ROOM, "m.text", {"n": 1})
    alice, bob = await reopen(alice), await reopen(bob)
    second = await alice.machine.encrypt_room_event(ROOM, "m.text", {"n": 2})
    assert second["session_id"] == first["session_id"]
    for content, n in ((first, 1), (second, 2)):
        got = await bob.machine.decrypt_room_event(ROOM, timeline.event(alice, content))
        assert got.content == {"n": n}
        assert got.message_index == n - 1


async def test_sessions_rotate_after_the_room_s_period() -> None:
    settings = RoomSettings(rotation_period_ms=60_000)
    alice, (bob,) = await room_with(BOB, settings=settings)
    first = await alice.machine.encrypt_room_event(ROOM, "m.text", {})
    alice.clock.now += 59.9
    await alice.machine.encrypt_room_event(ROOM, "m.text", {})  # still within the period
    alice.clock.now += 0.1
    with pytest.raises(LocalProtocolError):
        await alice.machine.encrypt_room_event(ROOM, "m.text", {})
    requests = await alice.machine.share_room_key(ROOM, [BOB], settings)
    await deliver_room_keys(requests, alice, bob)
    later = await alice.machine.encrypt_room_event(ROOM, "m.text", {})
    assert later["session_id"] != first["session_id"]


async def test_a_room_key_send_that_failed_goes_out_again_unchanged() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    bob = await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    (keys,) = await alice.machine.share_room_key(ROOM, [BOB])
    down = MatrixHttpError("PUT", "/sendToDevice", 502, None, "bad gateway")
    await alice.machine.mark_request_as_failed(keys.request_id, down)
    assert await alice.machine.share_room_key(ROOM, [BOB]) == []  # bob counts as served...
    assert await alice.machine.outgoing_requests() == []  # (not in the same round)
    alice.clock.now += 300
    (again,) = await alice.machine.outgoing_requests()  # ...so the very request comes back
    assert again == keys
    await deliver_room_keys([again], alice, bob)
    content = await alice.machine.encrypt_room_event(ROOM, "m.text", {"n": 1})
    got = await bob.machine.decrypt_room_event(ROOM, Timeline().event(alice, content))
    assert got.content == {"n": 1}


async def test_the_sync_token_commits_with_the_messages_it_brought() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    bob = await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    (keys,) = await alice.machine.share_room_key(ROOM, [BOB])
    event = deliveries(keys, alice, bob)
    session_id = await alice.machine.encrypt_room_event(ROOM, "m.text", {})

    # the commit fails: neither the room key nor the token may land
    store, original = bob.machine.store, bob.machine.store.save_changes

    async def failing(changes: Any, *, generation: int | None = None) -> None:
        raise OSError("disk full")

    store.save_changes = failing  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        await bob.machine.receive_sync_changes(to_device_events=[event], sync_token="s42")
    store.save_changes = original  # type: ignore[method-assign]
    assert await store.get_value("sync_token") is None
    assert await store.get_inbound_group_session(ROOM, session_id["session_id"]) is None

    await bob.machine.receive_sync_changes(to_device_events=[event], sync_token="s42")
    assert await store.get_value("sync_token") == "s42"
    assert await store.get_inbound_group_session(ROOM, session_id["session_id"]) is not None
