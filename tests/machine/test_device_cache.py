"""The machine's cache of other users' devices: it follows our commits, and is dropped when
the store changed hands; one Olm payload serialised for many devices."""

from __future__ import annotations

import asyncio
import json

import vodozemac

from olmstead import Changes, Device, MemoryStore
from olmstead.olm import account as own
from olmstead.requests import KeysQueryRequest
from olmstead.sessions.olm_sessions import OlmPayload
from tests.conftest import FAST_LEASE, KEY, pause
from tests.machine.test_megolm import BOB, ROOM, room_with


async def test_a_device_added_by_another_process_is_seen_after_the_reload() -> None:
    alice, _ = await room_with(BOB)
    assert await alice.machine.share_room_key(ROOM, [BOB]) == []  # bob's devices cached

    # alice's process freezes; another takes the store and learns of a second device of bob
    pause(alice.machine.store)
    lock = alice.db.lock
    assert lock is not None
    alice.db.lock = type(lock)(lock.holder, lock.acquired_at, 0.0, lock.generation)
    other = await MemoryStore.open(KEY, alice.db, lease=FAST_LEASE)
    phone = Device.from_keys(BOB, "BOBPHONE", own.device_keys(vodozemac.Account(), BOB, "BOBPHONE"))
    await other.save_changes(Changes(devices=[phone]))
    await other.close()
    await asyncio.sleep(FAST_LEASE.duration)

    # alice resumes under a new lease generation: the store's devices, not her cache
    (withheld,) = await alice.machine.share_room_key(ROOM, [BOB])
    assert withheld.event_type == "m.room_key.withheld"
    assert list(withheld.messages[BOB]) == ["BOBPHONE"]


async def test_the_cache_follows_a_query_answer() -> None:
    alice, (bob,) = await room_with(BOB)
    assert await alice.machine.share_room_key(ROOM, [BOB]) == []  # bob has the key

    # the server now lists bob with no devices: the cached device is flagged deleted
    await alice.machine.receive_sync_changes(device_lists={"changed": [BOB]})
    (query,) = await alice.machine.outgoing_requests()
    assert isinstance(query, KeysQueryRequest)
    await alice.machine.mark_request_as_sent(query.request_id, {"device_keys": {BOB: {}}})
    assert await alice.machine.get_user_devices(BOB) == {}
    assert await alice.machine.share_room_key(ROOM, [BOB]) == []  # rotated, to nobody

    # and listed again, he is back, and gets the new key
    await alice.machine.receive_sync_changes(device_lists={"changed": [BOB]})
    (query,) = await alice.machine.outgoing_requests()
    await alice.machine.mark_request_as_sent(query.request_id, bob.query_answer())
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    assert list(share.messages[BOB]) == [bob.device_id]


async def test_one_payload_reads_as_each_device_s_own() -> None:
    alice, _ = await room_with(BOB)
    (device,) = (await alice.machine.get_user_devices(BOB)).values()
    shared = {"type": "m.dummy", "content": {"text": "é \\" + '"'}, "sender": "@a:x"}
    payload = json.loads(OlmPayload(shared).for_device(device))
    assert payload == {
        **shared,
        "recipient": BOB,
        "recipient_keys": {"ed25519": device.ed25519},
    }
