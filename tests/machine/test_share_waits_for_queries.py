"""A share never races device tracking: it waits for the query in flight, then its own."""

from __future__ import annotations

import asyncio

import pytest

from olmstead import KeysQueryRequest, MatrixHttpError, RemoteProtocolError
from tests.machine.pair import deliveries, learn_devices, new_peer
from tests.machine.test_megolm import ALICE, BOB, CAROL, ROOM

DOWN = MatrixHttpError("POST", "/keys/query", 502, None, "down")


async def test_a_member_who_joins_while_a_query_is_in_flight_gets_the_key() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    bob, carol = await new_peer(BOB, "BOBDEV"), await new_peer(CAROL, "CAROLDEV")
    await learn_devices(alice, bob)
    machine = alice.machine

    # the sync loop queries bob's changed devices; carol joins while that is in flight
    await machine.receive_sync_changes(device_lists={"changed": [BOB]})
    (in_flight,) = [r for r in await machine.outgoing_requests() if isinstance(r, KeysQueryRequest)]
    await machine.update_tracked_users([BOB, CAROL])
    assert machine.key_query_in_flight
    assert machine.outdated_users([BOB, CAROL]) == {BOB, CAROL}
    assert await machine.outgoing_requests() == []  # one query at a time

    waiting = asyncio.create_task(machine.wait_for_key_query())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # a share must not go on yet
    await machine.mark_request_as_sent(in_flight.request_id, bob.query_answer())
    await asyncio.wait_for(waiting, 5)
    # carol was not in that query: she is still outdated, and queried next
    assert machine.outdated_users([BOB, CAROL]) == {CAROL}
    (own,) = [r for r in await machine.outgoing_requests() if isinstance(r, KeysQueryRequest)]
    assert list(own.device_keys) == [CAROL]
    await machine.mark_request_as_sent(own.request_id, carol.query_answer())
    assert machine.outdated_users([BOB, CAROL]) == set()

    claim = await machine.get_missing_sessions([BOB, CAROL])
    assert claim is not None
    answer = {"one_time_keys": {**bob.claim_answer()["one_time_keys"]}}
    answer["one_time_keys"].update(carol.claim_answer()["one_time_keys"])
    await machine.mark_request_as_sent(claim.request_id, answer)
    (keys,) = await machine.share_room_key(ROOM, [BOB, CAROL])
    assert set(keys.messages) == {BOB, CAROL}
    (got,) = await carol.machine.receive_sync_changes(
        to_device_events=[deliveries(keys, alice, carol)]
    )
    assert getattr(got, "type", None) == "m.room_key"


async def test_a_failed_query_ends_the_wait() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    machine = alice.machine
    await asyncio.wait_for(machine.wait_for_key_query(), 0.01)  # nothing in flight
    await machine.update_tracked_users([BOB])
    (query,) = [r for r in await machine.outgoing_requests() if isinstance(r, KeysQueryRequest)]
    with pytest.raises(TimeoutError):  # it waits for the answer
        await asyncio.wait_for(machine.wait_for_key_query(), 0.05)
    waiting = asyncio.create_task(machine.wait_for_key_query())
    await asyncio.sleep(0.01)
    await machine.mark_request_as_failed(query.request_id, DOWN)
    await asyncio.wait_for(waiting, 5)
    assert machine.outdated_users([BOB]) == {BOB}  # still outdated: asked again later


async def test_a_hostile_query_answer_still_ends_the_wait() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    machine = alice.machine
    await machine.update_tracked_users([BOB])
    (query,) = [r for r in await machine.outgoing_requests() if isinstance(r, KeysQueryRequest)]
    waiting = asyncio.create_task(machine.wait_for_key_query())
    await asyncio.sleep(0.01)
    with pytest.raises(RemoteProtocolError):
        await machine.mark_request_as_sent(query.request_id, {"device_keys": "nonsense"})
    await asyncio.wait_for(waiting, 5)
    assert not machine.key_query_in_flight
