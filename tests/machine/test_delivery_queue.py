"""The queue of room events waiting for their key: kept in the store, delivered once, or
reported as final when the wait ends."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from olmstead import LocalProtocolError, MemoryStore, OlmMachine
from olmstead.delivery import DeliverySettings, WaitingResult
from olmstead.errors import DecryptionError, OlmSessionError, UnknownRoomKey
from olmstead.machine import UndecryptableToDevice
from olmstead.requests import KeysClaimRequest, KeysQueryRequest, ToDeviceRequest
from olmstead.sessions.olm_sessions import DecryptedToDevice
from tests.conftest import FAST_LEASE, KEY, Backend
from tests.machine.pair import Peer, deliveries, learn_devices, new_peer, send
from tests.machine.test_keys_upload import open_machine
from tests.machine.test_megolm import ALICE, BOB, ROOM, Timeline
from tests.machine.test_withheld import held_back


async def reopen_with(peer: Peer, delivery: DeliverySettings | None = None) -> Peer:
    """The device restarted on the same store (a new process would see the same)."""
    await peer.machine.store.close()
    store = await MemoryStore.open(KEY, peer.db, lease=FAST_LEASE)
    machine = await OlmMachine.open(
        store, peer.user_id, peer.device_id, clock=peer.clock, delivery=delivery
    )
    return Peer(machine, peer.db, peer.published, peer.clock)


async def keep(peer: Peer, *events: dict[str, Any], token: str | None = None) -> None:
    results = await peer.machine.decrypt_room_events(ROOM, list(events))
    assert all(isinstance(r, UnknownRoomKey) for r in results)
    await peer.machine.commit_deliveries(keep=[(ROOM, e) for e in events], sync_token=token)


async def settle(peer: Peer, outcomes: list[WaitingResult]) -> None:
    await peer.machine.commit_deliveries(
        settled=[(o.room_id, o.event_id) for o in outcomes if o.settles]
    )


async def test_an_event_kept_across_a_restart_is_delivered_once_when_its_key_comes() -> None:
    alice, bob, requests, event = await held_back()
    await keep(bob, event, token="s1")
    assert await bob.machine.store.get_value("sync_token") == "s1"  # with the token

    bob = await reopen_with(bob)
    assert await bob.machine.retry_waiting_events() == []  # still waiting, already told
    for request in requests:
        await bob.machine.receive_sync_changes(to_device_events=[deliveries(request, alice, bob)])
    (outcome,) = await bob.machine.retry_waiting_events()
    assert not isinstance(outcome.result, Exception)
    assert outcome.result.content == {"body": "secret"}
    await settle(bob, [outcome])

    assert await bob.machine.retry_waiting_events() == []
    bob = await reopen_with(bob)
    assert await bob.machine.retry_waiting_events() == []  # delivered exactly once


async def test_a_crash_before_the_delivery_is_committed_delivers_again() -> None:
    alice, bob, requests, event = await held_back()
    await keep(bob, event)
    for request in requests:
        await bob.machine.receive_sync_changes(to_device_events=[deliveries(request, alice, bob)])
    (first,) = await bob.machine.retry_waiting_events()
    assert first.settles
    bob = await reopen_with(bob)  # the application never confirmed it: not lost
    (again,) = await bob.machine.retry_waiting_events()
    assert again.result == first.result


async def test_the_wait_ends_with_a_final_report() -> None:
    _alice, bob, _requests, event = await held_back()
    bob = await reopen_with(bob, DeliverySettings(key_wait=60.0))
    await keep(bob, event)
    bob.clock.now += 59
    assert await bob.machine.retry_waiting_events() == []
    bob.clock.now += 1
    (gave_up,) = await bob.machine.retry_waiting_events()
    assert isinstance(gave_up.result, UnknownRoomKey)
    assert gave_up.result.final
    assert "gave up after waiting 60 s" in str(gave_up.result)
    await settle(bob, [gave_up])
    bob.clock.now += 3600
    assert await bob.machine.retry_waiting_events() == []
    assert await bob.machine.store.count_waiting_events() == 0


async def test_the_wait_is_counted_from_the_first_arrival_across_restarts() -> None:
    _alice, bob, _requests, event = await held_back()
    bob = await reopen_with(bob, DeliverySettings(key_wait=60.0))
    await keep(bob, event)
    bob.clock.now += 40
    await keep(bob, event)  # the same sync again, after a crash: the first record stays
    bob = await reopen_with(bob, DeliverySettings(key_wait=60.0))
    bob.clock.now += 20
    (gave_up,) = await bob.machine.retry_waiting_events()
    assert gave_up.settles


async def test_past_the_bound_the_oldest_are_reported_first() -> None:
    alice, bob, _requests, _event = await held_back()
    bob = await reopen_with(bob, DeliverySettings(max_waiting=2))
    timeline = Timeline()
    events = [
        timeline.event(alice, await alice.machine.encrypt_room_event(ROOM, "m.text", {"n": n}))
        for n in range(3)
    ]
    await keep(bob, *events)
    (oldest,) = await bob.machine.retry_waiting_events()
    assert oldest.event_id == events[0]["event_id"]
    assert isinstance(oldest.result, UnknownRoomKey)
    assert oldest.result.final
    await settle(bob, [oldest])
    assert [w.event_id for w in await bob.machine.store.get_waiting_events()] == [
        e["event_id"] for e in events[1:]
    ]


async def test_a_key_that_does_not_decrypt_the_event_ends_the_wait_at_once() -> None:
    alice, bob, requests, event = await held_back()
    await keep(bob, event)
    tampered = copy.deepcopy(event)
    tampered["content"]["ciphertext"] = event["content"]["ciphertext"][:-8] + "AAAAAAAA"
    tampered["event_id"] = "$tampered"
    await keep(bob, tampered)
    for request in requests:
        await bob.machine.receive_sync_changes(to_device_events=[deliveries(request, alice, bob)])
    outcomes = await bob.machine.retry_waiting_events()
    assert [o.event_id for o in outcomes] == [event["event_id"], "$tampered"]
    assert not isinstance(outcomes[0].result, Exception)
    assert isinstance(outcomes[1].result, Exception)
    assert all(o.settles for o in outcomes)


async def test_keys_from_an_import_release_waiting_events() -> None:
    alice, bob, _requests, event = await held_back()
    await keep(bob, event)
    exported = await alice.machine.export_room_keys("pass", rounds=1000)
    await bob.machine.import_room_keys(exported, "pass")
    (outcome,) = await bob.machine.retry_waiting_events()
    assert not isinstance(outcome.result, Exception)


def test_settings_are_checked() -> None:
    with pytest.raises(LocalProtocolError):
        DeliverySettings(max_waiting=0)
    with pytest.raises(LocalProtocolError):
        DeliverySettings(key_wait=-1)


async def test_a_rolled_back_store_reports_the_events_it_cannot_read() -> None:
    """Issue 13, case 7: after a restore from an older copy, peers' Olm sessions with us
    are newer than the store; their room keys cannot be read, so the events that need
    them are reported (at once, and as final when the wait ends), and the session with
    the peer is repaired."""
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    old_copy = copy.deepcopy(bob.db)  # the backup, before any session with alice
    old_copy.lock = None
    await learn_devices(alice, bob)
    await learn_devices(bob, alice)
    claim = await alice.machine.get_missing_sessions([BOB])
    assert claim is not None
    await alice.machine.mark_request_as_sent(claim.request_id, bob.claim_answer())
    first = await send(alice, bob, "m.test", {})
    (got,) = await bob.machine.receive_sync_changes(to_device_events=[first])
    assert isinstance(got, DecryptedToDevice)
    await send(bob, alice, "m.test", {})  # bob answers: alice's session leaves pre-key mode
    reply = await send(bob, alice, "m.test", {})
    await alice.machine.receive_sync_changes(to_device_events=[reply])

    await bob.machine.store.close()
    bob.db = old_copy  # the store is restored from the backup
    bob = await reopen_with(bob, DeliverySettings(key_wait=300.0))

    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    assert isinstance(share, ToDeviceRequest)
    (lost,) = await bob.machine.receive_sync_changes(
        to_device_events=[deliveries(share, alice, bob)]
    )
    assert isinstance(lost, UndecryptableToDevice)
    assert isinstance(lost.error, OlmSessionError)
    content = await alice.machine.encrypt_room_event(ROOM, "m.text", {"body": "unreadable"})
    event = Timeline().event(alice, content)
    await keep(bob, event)  # told at once (the client reports it, not final) and kept

    # the repair: the restored store does not know alice's device; bob asks for it ...
    (query,) = await bob.machine.outgoing_requests()
    assert isinstance(query, KeysQueryRequest)
    assert query.device_keys == {ALICE: []}
    await bob.machine.mark_request_as_sent(query.request_id, alice.query_answer())
    # ... and claims a new session with it
    claims = [r for r in await bob.machine.outgoing_requests() if isinstance(r, KeysClaimRequest)]
    assert [c.one_time_keys for c in claims] == [{ALICE: {"ALICEDEV": "signed_curve25519"}}]

    bob.clock.now += 300
    (final,) = await bob.machine.retry_waiting_events()
    assert isinstance(final.result, UnknownRoomKey)
    assert final.result.final
    assert final.event_id == event["event_id"]


@pytest.mark.parametrize(
    "change",
    [
        {"session_id": "a\x00b"},  # any room member writes the content; PostgreSQL refuses NUL
        {"session_id": "\ud800"},  # a lone surrogate is valid JSON, not UTF-8
        {"event_id": "$e\x00"},
        {"event_id": "$e\udc00"},
    ],
)
async def test_an_event_with_an_id_no_store_can_keep_fails_for_good_and_the_sync_commits(
    backend: Backend, change: dict[str, str]
) -> None:
    bob = await open_machine(backend)
    event: dict[str, Any] = {
        "type": "m.room.encrypted",
        "event_id": "$e",
        "sender": ALICE,
        "origin_server_ts": 1,
        "content": {"algorithm": "m.megolm.v1.aes-sha2", "session_id": "s", "ciphertext": "AAAA"},
    }
    if "session_id" in change:
        event["content"]["session_id"] = change["session_id"]
    else:
        event["event_id"] = change["event_id"]
    (result,) = await bob.decrypt_room_events(ROOM, [event])
    assert isinstance(result, DecryptionError)
    assert not isinstance(result, UnknownRoomKey)  # reported once, as final; never kept
    assert result.final
    await bob.commit_deliveries(sync_token="s1")
    assert await bob.store.get_value("sync_token") == "s1"
    assert await bob.store.get_waiting_events() == []
