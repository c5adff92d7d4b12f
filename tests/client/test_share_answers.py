"""A room key share whose answer is not what a server should send: it goes out again.

httpx's mock transport answers ``/sendToDevice`` with what Synapse never would; the
two devices are real machines (tests/machine/pair.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from olmstead import Client, MatrixHttpError, RemoteProtocolError, Session
from olmstead.http import RetryPolicy
from tests.machine.pair import Peer, new_peer, open_session
from tests.machine.test_megolm import ALICE, BOB, ROOM

HS = "https://hs.example"


def state_event(event_type: str, state_key: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"type": event_type, "state_key": state_key, "sender": ALICE, "content": content}


async def client_for(
    alice: Peer, bob: Peer, send_to_device: Callable[[int], httpx.Response]
) -> tuple[Client, list[str]]:
    """Alice's client in an encrypted room with Bob; ``send_to_device(n)`` answers the
    n-th ``/sendToDevice`` (from 1)."""
    to_device: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/state"):
            return httpx.Response(
                200,
                json=[
                    state_event("m.room.encryption", "", {"algorithm": "m.megolm.v1.aes-sha2"}),
                    state_event("m.room.member", ALICE, {"membership": "join"}),
                    state_event("m.room.member", BOB, {"membership": "join"}),
                ],
            )
        if path.endswith("/keys/query"):
            keys = {**alice.query_answer()["device_keys"], **bob.query_answer()["device_keys"]}
            return httpx.Response(200, json={"device_keys": keys, "failures": {}})
        if "/sendToDevice/" in path:
            to_device.append(path)
            return send_to_device(len(to_device))
        return httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "no"})

    client = Client(
        HS,
        store=alice.machine.store,
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(attempts=1),
    )
    client.restore(Session(HS, ALICE, "ALICEDEV", "token"))
    client.machine = alice.machine
    return client, to_device


async def test_a_share_whose_answer_is_not_json_goes_out_again_and_then_counts() -> None:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    # the first answer is not a JSON object (the server may still have the request)
    client, to_device = await client_for(
        alice, bob, lambda n: httpx.Response(200, content=b"[]" if n == 1 else b"{}")
    )
    with pytest.raises(RemoteProtocolError):
        await client.room_send(ROOM, "m.room.message", {"body": "hi"})
    assert len(to_device) == 1
    alice.clock.now += 300  # past the backoff
    await client.process_outgoing()
    assert to_device == [to_device[0]] * 2  # the same request: the same transaction ID
    assert await alice.machine.store.get_outbox() == []
    stored = await alice.machine.store.get_outbound_group_session(ROOM)
    assert stored is not None
    assert stored.shared_with == {BOB: {"BOBDEV": 0}}
    await client.http.close()


async def test_a_share_the_server_refuses_is_not_sent_again_in_the_same_round() -> None:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    forbidden = httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "no"})
    client, to_device = await client_for(alice, bob, lambda n: forbidden)
    with pytest.raises(MatrixHttpError):
        await client.room_send(ROOM, "m.room.message", {"body": "hi"})
    for _ in range(3):
        await client.process_outgoing()
    assert len(to_device) == 1  # not a storm: the round ends
    alice.clock.now += 300
    await client.process_outgoing()
    assert len(to_device) == 2  # after its backoff, once
    await client.http.close()
