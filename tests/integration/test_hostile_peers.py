"""Issue 12 through the real client and the real Synapse: a hostile user and a homeserver
answer that stopped olmstead before, and the victim syncing and decrypting on.

Mallory is a user of the same homeserver with nothing but raw HTTP: she uploads
device keys with a 33-byte Ed25519 key (vodozemac 0.10 panics on it), joins the
victim's room so that the victim queries them, and sends the victim to-device
messages that are poisoned in every way Synapse relays. Alice is an honest
olmstead peer whose messages must keep arriving.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import httpx

from olmstead import DecryptionError, MalformedEvent
from tests.integration.harness import Wire, close_client, open_client, session_of
from tests.integration.test_messaging import crypto_client, messages

UPLOAD = "/_matrix/client/v3/keys/upload"


def b64_of(size: int) -> str:
    return base64.b64encode(b"\x01" * size).decode().rstrip("=")


class Mallory:
    """A user who speaks raw HTTP to the homeserver."""

    def __init__(self, url: str, user: dict[str, Any]) -> None:
        self.user_id, self.device_id = user["user_id"], user["device_id"]
        self.http = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {user['access_token']}"}, timeout=30
        )

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        answer = await self.http.request(method, path, content=_json(body))
        answer.raise_for_status()
        return answer.json()

    async def upload_poisoned_device_keys(self) -> None:
        keys = {
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                f"ed25519:{self.device_id}": b64_of(33),  # vodozemac 0.10 panics on it
                f"curve25519:{self.device_id}": b64_of(32),
            },
            "signatures": {self.user_id: {f"ed25519:{self.device_id}": b64_of(64)}},
        }
        await self.call("POST", UPLOAD, {"device_keys": keys})

    async def send_to_device(self, user_id: str, device_id: str, content: Any) -> None:
        path = f"/_matrix/client/v3/sendToDevice/m.room.encrypted/{uuid.uuid4().hex}"
        await self.call("PUT", path, {"messages": {user_id: {device_id: content}}})


def _json(body: Any) -> bytes | None:
    # json.dumps writes 2**64 as it is; Synapse relays it (it refuses NaN and Infinity)
    return None if body is None else json.dumps(body).encode()


def poisoned_olm(victim_curve: str, part: Any, sender_key: Any = None) -> dict[str, Any]:
    return {
        "algorithm": "m.olm.v1.curve25519-aes-sha2",
        "sender_key": sender_key if sender_key is not None else b64_of(32),
        "ciphertext": {victim_curve: part},
    }


async def test_a_hostile_user_never_stops_the_victim_syncing_and_decrypting(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    a_user, b_user, m_user = new_user(), new_user(), new_user()
    alice, _ = await crypto_client(url, tmp_path / "alice.db", a_user)
    bob, bob_seen = await crypto_client(url, tmp_path / "bob.db", b_user)
    failures: list[tuple[str | None, Any, DecryptionError]] = []
    bob.on_decryption_failure(lambda room, event, error: failures.append((room, event, error)))
    mallory = Mallory(url, m_user)
    assert bob.machine is not None

    # item 2: poisoned device keys, then into the room so that bob queries them
    await mallory.upload_poisoned_device_keys()
    room = await alice.create_room(invite=[b_user["user_id"], m_user["user_id"]])
    await bob.sync_once()
    await bob.join(room)
    await mallory.call("POST", f"/_matrix/client/v3/rooms/{room}/join", {})
    await alice.sync_once()
    await bob.sync_once()  # tracks mallory, queries her keys: refused, no panic

    # item 1 and its kind: to-device messages bob's olmstead cannot use
    curve = bob.machine.identity_keys["curve25519"]
    poisons: list[Any] = [
        poisoned_olm(curve, {"type": -1, "body": "AAAA"}),
        poisoned_olm(curve, {"type": 2**64, "body": "AAAA"}),
        poisoned_olm(curve, {"type": 0, "body": "not base64!"}),
        poisoned_olm(curve, {"type": 0, "body": b64_of(40)}),
        poisoned_olm(curve, {"type": 1, "body": b64_of(200)}),
        poisoned_olm(curve, "a string", sender_key=b64_of(33)),
        poisoned_olm(curve, {"type": 0, "body": "AAAA"}, sender_key=b64_of(33)),
        {"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": 5, "ciphertext": []},
    ]
    for poison in poisons:
        await mallory.send_to_device(b_user["user_id"], b_user["device_id"], poison)
    # and room events of the same kind, into the room they share
    room_poisons: list[Any] = [
        {"algorithm": "m.megolm.v1.aes-sha2", "session_id": 5, "ciphertext": "AAAA"},
        {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": ["x"], "sender_key": b64_of(33)},
    ]
    for n, poison in enumerate(room_poisons):
        path = f"/_matrix/client/v3/rooms/{room}/send/m.room.encrypted/poison{n}"
        await mallory.call("PUT", path, poison)

    await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "one"})
    await bob.sync_once()
    await bob.sync_once()
    assert (a_user["user_id"], "one", True) in messages(bob_seen)
    to_device_failures = [f for f in failures if f[0] is None]
    assert len(to_device_failures) == len(poisons)  # each reported once, then gone
    assert all(isinstance(f[2], DecryptionError) for f in to_device_failures)
    assert sum(isinstance(f[2], MalformedEvent) for f in to_device_failures) >= 6
    assert await bob.machine.get_user_devices(m_user["user_id"]) == {}
    room_failures = [f for f in failures if f[0] == room]
    assert len(room_failures) == len(room_poisons)
    assert all(isinstance(f[2], MalformedEvent) for f in room_failures)
    failures[:] = [f for f in failures if f[0] is None]

    # the sync token moved on: the poison does not come back, and bob goes on decrypting
    await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "two"})
    await bob.sync_once()
    assert (a_user["user_id"], "two", True) in messages(bob_seen)
    assert len([f for f in failures if f[0] is None]) == len(poisons)
    assert [f for f in failures if f[0] is not None] == []  # every room event decrypted
    await mallory.http.aclose()
    await close_client(alice)
    await close_client(bob)


async def test_an_upload_answered_200_empty_is_a_success_and_refills_go_on(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    """Item 6: a server answering ``/keys/upload`` with ``200 {}`` (older Dendrite did, for
    a fallback key alone). Synapse stores the keys; only its answer is rewritten."""
    url = homeserver.base_url
    user = new_user()

    def empty_answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={})

    wire = Wire(faults_after=[empty_answer] * 20)  # every upload, after Synapse took it
    client = await open_client(url, tmp_path / "bot.db", session_of(url, user), wire=wire)
    machine = await client.init_crypto()  # no exception: the first upload is a success
    assert machine.device_keys_shared
    await client.sync_once()  # Synapse reports the count, and fallback key support
    await client.sync_once()  # the fallback key alone goes up, answered {} again
    fallback_only = [body for _t, body, _s in wire.uploads if set(body) == {"fallback_keys"}]
    assert fallback_only, wire.uploads
    assert machine.server_key_count == 50

    # claims use keys up: the refill still goes out (nothing stayed stuck as pending)
    claimer = httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {new_user()['access_token']}"}
    )
    for _ in range(30):
        answer = await claimer.post(
            "/_matrix/client/v3/keys/claim",
            json={"one_time_keys": {user["user_id"]: {user["device_id"]: "signed_curve25519"}}},
        )
        answer.raise_for_status()
    await claimer.aclose()
    uploads_before = len(wire.uploads)
    await client.sync_once()
    refills = [body for _t, body, _s in wire.uploads[uploads_before:] if "one_time_keys" in body]
    assert len(refills) == 1
    assert len(refills[0]["one_time_keys"]) == 30
    await client.sync_once()
    assert machine.server_key_count == 50
    assert machine.key_problem is None
    await close_client(client)
