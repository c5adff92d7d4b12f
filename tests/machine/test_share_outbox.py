"""Room key shares through the outbox: committed before they leave, settled on confirmation."""

from __future__ import annotations

import asyncio
import itertools

from olmstead import MatrixHttpError, MemoryStore, OlmMachine
from olmstead.requests import ToDeviceRequest
from olmstead.sessions.olm_sessions import DecryptedToDevice
from tests.conftest import FAST_LEASE, KEY, pause
from tests.machine.pair import Peer, deliveries, learn_devices, new_peer, open_session
from tests.machine.test_delivery_queue import reopen_with
from tests.machine.test_megolm import ALICE, BOB, CAROL, ROOM, Timeline


async def test_recipients_hold_the_key_only_once_the_share_is_confirmed() -> None:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    (entry,) = await alice.machine.store.get_outbox()
    assert (entry.request_id, entry.messages) == (share.request_id, share.messages)
    assert entry.recipients == {BOB: {"BOBDEV": 0}}
    stored = await alice.machine.store.get_outbound_group_session(ROOM)
    assert stored is not None
    assert stored.shared_with == {}  # not before the server has it
    assert await alice.machine.share_room_key(ROOM, [BOB]) == []  # on its way: not again

    await alice.machine.mark_request_as_sent(share.request_id, {})
    assert await alice.machine.store.get_outbox() == []
    stored = await alice.machine.store.get_outbound_group_session(ROOM)
    assert stored is not None
    assert stored.shared_with == {BOB: {"BOBDEV": 0}}
    assert await alice.machine.share_room_key(ROOM, [BOB]) == []


async def test_after_a_restart_the_share_goes_out_again_unchanged() -> None:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    content = await alice.machine.encrypt_room_event(ROOM, "m.text", {"body": "hi"})

    alice = await reopen_with(alice)  # the process died before the share was confirmed
    resent = [r for r in await alice.machine.outgoing_requests() if isinstance(r, ToDeviceRequest)]
    assert resent == [share]  # same transaction ID, same ciphertext
    assert await alice.machine.share_room_key(ROOM, [BOB]) == []
    await alice.machine.mark_request_as_sent(share.request_id, {})
    alice = await reopen_with(alice)
    assert [
        r for r in await alice.machine.outgoing_requests() if isinstance(r, ToDeviceRequest)
    ] == []

    (got,) = await bob.machine.receive_sync_changes(
        to_device_events=[deliveries(share, alice, bob)]
    )
    assert isinstance(got, DecryptedToDevice)
    event = await bob.machine.decrypt_room_event(ROOM, Timeline().event(alice, content))
    assert event.content == {"body": "hi"}


async def test_a_failed_share_goes_out_again_and_counts_only_when_confirmed() -> None:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    await alice.machine.mark_request_as_failed(
        share.request_id, MatrixHttpError("PUT", "/sendToDevice", 502, None, "Bad gateway")
    )
    assert await to_device(alice) == []  # not again in the same round: after a backoff
    alice.clock.now += 300
    (again,) = [
        r for r in await alice.machine.outgoing_requests() if isinstance(r, ToDeviceRequest)
    ]
    assert again == share
    await alice.machine.mark_request_as_sent(again.request_id, {})
    stored = await alice.machine.store.get_outbound_group_session(ROOM)
    assert stored is not None
    assert stored.shared_with == {BOB: {"BOBDEV": 0}}


async def test_withheld_notices_go_through_the_outbox_and_a_leaver_rotates_the_key() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    bob, carol = await new_peer(BOB, "BOBDEV"), await new_peer(CAROL, "CARDEV")
    await open_session(alice, bob)
    await learn_devices(alice, carol)  # no Olm session with carol: she is told m.no_olm
    requests = await alice.machine.share_room_key(ROOM, [BOB, CAROL])
    kinds = {r.event_type: r for r in requests}
    assert set(kinds) == {"m.room.encrypted", "m.room_key.withheld"}
    entries = {e.request_id: e for e in await alice.machine.store.get_outbox()}
    assert entries[kinds["m.room_key.withheld"].request_id].recipients == {CAROL: {"CARDEV": -1}}
    # bob leaves before his share is confirmed: the key he may hold must not be used again
    first = await alice.machine.store.get_outbound_group_session(ROOM)
    assert first is not None
    await alice.machine.share_room_key(ROOM, [CAROL])
    second = await alice.machine.store.get_outbound_group_session(ROOM)
    assert second is not None
    assert second.session.session_id != first.session.session_id


async def test_an_answer_from_before_a_reload_still_settles_the_share() -> None:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    alice = await reopen_with(alice)
    await alice.machine.mark_request_as_sent(share.request_id, {})  # the server had it
    assert await alice.machine.store.get_outbox() == []
    assert [
        r for r in await alice.machine.outgoing_requests() if isinstance(r, ToDeviceRequest)
    ] == []


async def to_device(peer: Peer) -> list[ToDeviceRequest]:
    return [r for r in await peer.machine.outgoing_requests() if isinstance(r, ToDeviceRequest)]


async def test_a_share_the_server_refuses_goes_out_again_only_after_a_growing_backoff() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    bob, carol = await new_peer(BOB, "BOBDEV"), await new_peer(CAROL, "CARDEV")
    await open_session(alice, bob)
    await open_session(alice, carol)
    (refused,) = await alice.machine.share_room_key(ROOM, [BOB])
    forbidden = MatrixHttpError("PUT", "/sendToDevice", 403, "M_FORBIDDEN", "no")
    await alice.machine.mark_request_as_failed(refused.request_id, forbidden)
    sent_at = [alice.clock.now]
    for _ in range(200):  # what Client.process_outgoing does: ask, send, report, ask again
        for request in await to_device(alice):
            assert request == refused  # unchanged every time
            sent_at.append(alice.clock.now)
            await alice.machine.mark_request_as_failed(request.request_id, forbidden)
        alice.clock.now += 1
    assert 5 <= len(sent_at) <= 12  # 2 s doubling to 5 minutes: no storm
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert gaps[-1] > gaps[0]
    # a later share (carol joins) is not held back by the refused one
    (later,) = await alice.machine.share_room_key(ROOM, [BOB, CAROL])
    assert set(later.messages) == {CAROL}
    await alice.machine.mark_request_as_sent(later.request_id, {})


async def test_a_rate_limited_share_waits_as_long_as_the_server_asked() -> None:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    rated = MatrixHttpError("PUT", "/sendToDevice", 429, "M_LIMIT_EXCEEDED", "slow", 120.0)
    await alice.machine.mark_request_as_failed(share.request_id, rated)
    alice.clock.now += 100
    assert await to_device(alice) == []  # the server asked for 120 s
    alice.clock.now += 21
    assert await to_device(alice) == [share]


async def test_after_another_holder_had_the_store_the_outbox_is_read_again() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    bob, carol = await new_peer(BOB, "BOBDEV"), await new_peer(CAROL, "CARDEV")
    await open_session(alice, bob)
    await learn_devices(alice, carol)
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    down = MatrixHttpError("PUT", "/sendToDevice", 502, None, "Bad gateway")
    await alice.machine.mark_request_as_failed(share.request_id, down)  # to go out again

    # alice's process freezes; another takes the store, sends her share and confirms
    # it, then makes a share of its own (an m.no_olm to carol) and dies before sending it
    pause(alice.machine.store)
    lock = alice.db.lock
    assert lock is not None
    alice.db.lock = type(lock)(lock.holder, lock.acquired_at, 0.0, lock.generation)
    other = await OlmMachine.open(
        await MemoryStore.open(KEY, alice.db, lease=FAST_LEASE),
        ALICE,
        "ALICEDEV",
        clock=alice.clock,
    )
    (resent,) = await to_device(Peer(other, alice.db, alice.published, alice.clock))
    assert resent == share
    await other.mark_request_as_sent(resent.request_id, {})
    (notice,) = await other.share_room_key(ROOM, [BOB, CAROL])
    assert notice.event_type == "m.room_key.withheld"
    await other.store.close()
    await asyncio.sleep(FAST_LEASE.duration)

    # alice resumes: the store's outbox, not what she had in memory
    alice.clock.now += 600
    assert await to_device(alice) == [notice]  # hers was confirmed: not sent again
    stored = await alice.machine.store.get_outbound_group_session(ROOM)
    assert stored is not None
    assert stored.shared_with == {BOB: {"BOBDEV": 0}}
