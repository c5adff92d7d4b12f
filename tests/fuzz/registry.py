"""Every kind of input from outside the fuzz suite feeds to olmstead: the one place to extend.

An ``Input`` has a name and an async ``build`` that makes, from real machines,
a ``Built``: one valid object, the victim's stored state to feed it to, and
three functions —

- ``feed(victim, obj)``: hand ``obj`` to the entry point it arrives through and
  say whether it was accepted, and if so whether what was accepted is forged
  (a sender, key or content other than the genuine one);
- ``genuine(victim)``: after a refusal, feed the genuine input (or its retry)
  and say whether it still works — a refusal must not have hidden it;
- ``pool``: real keys and IDs of other parties, for spoofing.

To add an event type or a server answer: write a ``build_…`` function and add
an ``Input`` to ``INPUTS``; ``test_properties.py`` runs every property on it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from olmstead import (
    DecryptedRoomEvent,
    DecryptedToDevice,
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    OlmsteadError,
    RemoteProtocolError,
)
from olmstead.requests import AccountDataRequest
from tests.cross_signing_keys import CrossSigningIdentity, KeysQueryAnswer
from tests.fuzz.world import LONG_LEASE, Snapshot, fuzz_peer
from tests.machine.pair import Peer, deliveries, learn_devices, open_session, send
from tests.machine.test_keys_upload import Clock, ok, pass_device_check

ALICE, BOB, MALLORY = "@alice:example.org", "@bob:example.org", "@mallory:example.org"
ROOM = "!room:example.org"


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    #: why the accepted input is a forgery (``None``: accepted as genuine, or refused)
    forged: str | None = None


@dataclass
class Built:
    valid: Any
    victim: Snapshot
    feed: Callable[[Peer, Any], Awaitable[Outcome]]
    genuine: Callable[[Peer], Awaitable[bool]]
    pool: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Input:
    name: str
    build: Callable[[], Awaitable[Built]]


async def _cast() -> tuple[Peer, Peer, Peer]:
    alice = await fuzz_peer(ALICE, "ALICEDEV")
    bob = await fuzz_peer(BOB, "BOBDEV")
    mallory = await fuzz_peer(MALLORY, "MALLORYDEV")
    return alice, bob, mallory


def _pool(*peers: Peer) -> list[str]:
    found = [ROOM, "$event", "BOBDEV", "ALICEDEV", "MALLORYDEV"]
    for peer in peers:
        found += [peer.user_id, *peer.machine.identity_keys.values()]
    return found


# --- to-device messages ------------------------------------------------------------------


async def _feed_to_device(
    victim: Peer, obj: Any, sender: Peer, event_type: str, content: dict[str, Any]
) -> Outcome:
    results = await victim.machine.receive_sync_changes(to_device_events=[obj])
    decrypted = [r for r in results if isinstance(r, DecryptedToDevice)]
    if not decrypted:
        return Outcome(False)
    (got,) = decrypted
    facts = (got.sender, got.sender_key, got.sender_ed25519, got.type, got.content)
    genuine = (
        sender.user_id,
        sender.machine.identity_keys["curve25519"],
        sender.machine.identity_keys["ed25519"],
        event_type,
        content,
    )
    return Outcome(True, None if facts == genuine else f"accepted {facts}, not {genuine}")


async def _to_device_still_works(victim: Peer, event: dict[str, Any]) -> bool:
    results = await victim.machine.receive_sync_changes(to_device_events=[event])
    return any(isinstance(r, DecryptedToDevice) for r in results)


async def build_olm_pre_key() -> Built:
    """A pre-key message (a new session, one of the victim's one-time keys)."""
    alice, bob, mallory = await _cast()
    await open_session(alice, bob)
    await learn_devices(bob, alice)
    content = {"n": 1}
    event = await send(alice, bob, "m.test", content)
    return _to_device_built(event, content, alice, bob, mallory)


def _to_device_built(
    event: dict[str, Any], content: dict[str, Any], alice: Peer, bob: Peer, mallory: Peer
) -> Built:
    """An ``m.test`` from alice to bob over Olm, fed to bob's machine."""
    return Built(
        event,
        Snapshot.of(bob),
        lambda victim, obj: _feed_to_device(victim, obj, alice, "m.test", content),
        lambda victim: _to_device_still_works(victim, event),
        _pool(alice, bob, mallory),
    )


async def build_olm_normal() -> Built:
    """A normal message in an established session."""
    alice, bob, mallory = await _cast()
    await open_session(alice, bob)
    await learn_devices(bob, alice)
    await bob.machine.receive_sync_changes(to_device_events=[await send(alice, bob, "m.a", {})])
    await alice.machine.receive_sync_changes(to_device_events=[await send(bob, alice, "m.b", {})])
    content = {"n": 2}
    event = await send(alice, bob, "m.test", content)
    return _to_device_built(event, content, alice, bob, mallory)


async def build_room_key() -> Built:
    """An ``m.room_key`` over Olm; accepted keys must decrypt the sharer's events."""
    alice, bob, mallory = await _cast()
    await open_session(alice, bob)
    await learn_devices(bob, alice)
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    event = deliveries(share, alice, bob)
    room_event = _room_event(await alice.machine.encrypt_room_event(ROOM, "m.text", {"b": 1}))

    async def feed(victim: Peer, obj: Any) -> Outcome:
        results = await victim.machine.receive_sync_changes(to_device_events=[obj])
        if not any(isinstance(r, DecryptedToDevice) for r in results):
            return Outcome(False)
        (got,) = await victim.machine.decrypt_room_events(ROOM, [room_event])
        if isinstance(got, DecryptedRoomEvent) and not (got.verified and got.sender == ALICE):
            return Outcome(True, f"a room key accepted for {got.sender}, verified={got.verified}")
        return Outcome(True)

    async def genuine(victim: Peer) -> bool:
        await victim.machine.receive_sync_changes(to_device_events=[event])
        (got,) = await victim.machine.decrypt_room_events(ROOM, [room_event])
        return isinstance(got, DecryptedRoomEvent)

    return Built(event, Snapshot.of(bob), feed, genuine, _pool(alice, bob, mallory))


async def _sealed_by(sender: Snapshot, recipient_curve: str, payload: Any) -> dict[str, Any]:
    """``payload`` (any JSON) Olm-encrypted by the sender's live session: what a malicious
    device with a real session can send."""
    peer = await sender.restore()
    try:
        (record, *_) = await peer.machine.olm.sessions_for(recipient_curve)
        message_type, body = record.session.encrypt(json.dumps(payload).encode()).to_parts()
        content = {
            "algorithm": "m.olm.v1.curve25519-aes-sha2",
            "sender_key": peer.machine.identity_keys["curve25519"],
            "ciphertext": {recipient_curve: {"type": message_type, "body": _b64(body)}},
        }
        return {"type": "m.room.encrypted", "sender": peer.user_id, "content": content}
    finally:
        await peer.machine.store.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


async def build_olm_payload() -> Built:
    """The decrypted payload of an Olm message, mutated before a real session encrypts
    it: a malicious device. Its ``m.room_key`` content is in reach of the mutations.
    The victim has not queried the sender's device yet, so the Ed25519 key the payload
    claims cannot be checked against one (``verified`` is then false)."""
    alice, bob, mallory = await _cast()
    await open_session(alice, bob)
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    outbound = await alice.machine._outbound_session(ROOM)
    assert outbound is not None
    own = alice.machine.identity_keys
    payload = {
        "type": "m.room_key",
        "content": alice.machine.megolm.room_key_content(outbound),
        "sender": ALICE,
        "sender_device": "ALICEDEV",
        "keys": {"ed25519": own["ed25519"]},
        "recipient": BOB,
        "recipient_keys": {"ed25519": bob.machine.identity_keys["ed25519"]},
    }
    sender = Snapshot.of(alice)
    bob_curve = bob.machine.identity_keys["curve25519"]

    async def feed(victim: Peer, obj: Any) -> Outcome:
        event = await _sealed_by(sender, bob_curve, obj)
        results = await victim.machine.receive_sync_changes(to_device_events=[event])
        decrypted = [r for r in results if isinstance(r, DecryptedToDevice)]
        if not decrypted:
            return Outcome(False)
        (got,) = decrypted
        if (got.sender, got.sender_key) != (ALICE, own["curve25519"]) or got.verified:
            return Outcome(True, f"accepted as {got}")
        return Outcome(True)

    async def genuine(victim: Peer) -> bool:
        event = await _sealed_by(sender, bob_curve, payload)
        return await _to_device_still_works(victim, event)

    del share
    return Built(payload, Snapshot.of(bob), feed, genuine, _pool(alice, bob, mallory))


async def build_withheld() -> Built:
    """An unencrypted ``m.room_key.withheld`` notice from the honest peer's device."""
    alice, bob, mallory = await _cast()
    await learn_devices(bob, alice)
    curve = alice.machine.identity_keys["curve25519"]
    event = {
        "type": "m.room_key.withheld",
        "sender": ALICE,
        "content": {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": ROOM,
            "session_id": "SESSIONID",
            "sender_key": curve,
            "code": "m.unverified",
            "reason": "not verified",
        },
    }

    async def feed(victim: Peer, obj: Any) -> Outcome:
        before = dict(victim.db.withheld)
        await victim.machine.receive_sync_changes(to_device_events=[obj])
        if victim.db.withheld == before:
            return Outcome(False)
        for (_room, _session, key), (sender, _code, _reason) in victim.db.withheld.items():
            if key == curve and sender != ALICE:
                return Outcome(True, f"{sender} withheld a key in the name of alice's device")
        return Outcome(True)

    async def genuine(victim: Peer) -> bool:
        await victim.machine.receive_sync_changes(to_device_events=[event])
        return ("!room:example.org", "SESSIONID", curve) in victim.db.withheld

    return Built(event, Snapshot.of(bob), feed, genuine, _pool(alice, bob, mallory))


# --- room events ---------------------------------------------------------------------------


def _room_event(content: dict[str, Any], event_id: str = "$event") -> dict[str, Any]:
    return {
        "type": "m.room.encrypted",
        "sender": ALICE,
        "event_id": event_id,
        "origin_server_ts": 1_700_000_000_000,
        "room_id": ROOM,
        "content": content,
    }


async def build_megolm_event() -> Built:
    """A Megolm room event whose room key the victim holds."""
    alice, bob, mallory = await _cast()
    await open_session(alice, bob)
    await learn_devices(bob, alice)
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    await bob.machine.receive_sync_changes(to_device_events=[deliveries(share, alice, bob)])
    event = _room_event(await alice.machine.encrypt_room_event(ROOM, "m.text", {"b": 1}))

    async def feed(victim: Peer, obj: Any) -> Outcome:
        (got,) = await victim.machine.decrypt_room_events(ROOM, [obj])
        if not isinstance(got, DecryptedRoomEvent):
            return Outcome(False)
        facts = (got.sender, got.type, got.content, got.verified)
        genuine = (ALICE, "m.text", {"b": 1}, True)
        return Outcome(True, None if facts == genuine else f"accepted {facts}")

    async def genuine(victim: Peer) -> bool:
        (got,) = await victim.machine.decrypt_room_events(ROOM, [event])
        return isinstance(got, DecryptedRoomEvent)

    return Built(event, Snapshot.of(bob), feed, genuine, _pool(alice, bob, mallory))


async def build_megolm_payload() -> Built:
    """The plaintext of a Megolm room event, mutated before the sharer's real session
    encrypts it: a malicious device in the room."""
    alice, bob, mallory = await _cast()
    await open_session(alice, bob)
    await learn_devices(bob, alice)
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    await bob.machine.receive_sync_changes(to_device_events=[deliveries(share, alice, bob)])
    payload = {"type": "m.text", "content": {"b": 1}, "room_id": ROOM}
    sender = Snapshot.of(alice)

    async def sealed(obj: Any) -> dict[str, Any]:
        peer = await sender.restore()
        try:
            record = await peer.machine._outbound_session(ROOM)
            assert record is not None
            content = peer.machine.megolm.encrypt_payload(
                record, json.dumps(obj).encode(), peer.machine.identity_keys, peer.device_id
            )
            return _room_event(content)
        finally:
            await peer.machine.store.close()

    async def feed(victim: Peer, obj: Any) -> Outcome:
        (got,) = await victim.machine.decrypt_room_events(ROOM, [await sealed(obj)])
        if not isinstance(got, DecryptedRoomEvent):
            return Outcome(False)
        facts = (got.sender, got.room_id, got.verified)
        return Outcome(True, None if facts == (ALICE, ROOM, True) else f"accepted {facts}")

    async def genuine(victim: Peer) -> bool:
        (got,) = await victim.machine.decrypt_room_events(ROOM, [await sealed(payload)])
        return isinstance(got, DecryptedRoomEvent)

    return Built(payload, Snapshot.of(bob), feed, genuine, _pool(alice, bob, mallory))


# --- server answers -----------------------------------------------------------------------


async def _query_request(victim: Peer) -> KeysQueryRequest:
    (query,) = [
        r for r in await victim.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)
    ]
    return query


async def build_keys_query() -> Built:
    """A ``/keys/query`` answer listing the honest peer's device."""
    alice, bob, mallory = await _cast()
    await bob.machine.update_tracked_users([ALICE])
    answer = alice.query_answer()
    real = alice.machine.identity_keys

    async def feed(victim: Peer, obj: Any) -> Outcome:
        query = await _query_request(victim)
        try:
            await victim.machine.mark_request_as_sent(query.request_id, obj)
        except RemoteProtocolError:
            return Outcome(False)
        for device in (await victim.machine.get_user_devices(ALICE)).values():
            if (device.ed25519, device.curve25519) != (real["ed25519"], real["curve25519"]):
                return Outcome(True, f"a device with forged keys was stored: {device}")
        return Outcome(True)

    async def genuine(victim: Peer) -> bool:
        victim.clock.now += 3600  # past any backoff
        query = await _query_request(victim)
        await victim.machine.mark_request_as_sent(query.request_id, answer)
        return "ALICEDEV" in await victim.machine.get_user_devices(ALICE)

    return Built(answer, Snapshot.of(bob), feed, genuine, _pool(alice, bob, mallory))


async def build_keys_query_identity() -> Built:
    """A ``/keys/query`` answer with the honest peer's cross-signing keys and signed device."""
    alice, bob, mallory = await _cast()
    await bob.machine.update_tracked_users([ALICE])
    identity = CrossSigningIdentity(ALICE)
    answer = (
        KeysQueryAnswer()
        .device(identity.sign_device(alice.machine.device_keys()))
        .identity(identity)
        .json()
    )

    async def feed(victim: Peer, obj: Any) -> Outcome:
        query = await _query_request(victim)
        try:
            await victim.machine.mark_request_as_sent(query.request_id, obj)
        except RemoteProtocolError:
            return Outcome(False)
        pinned = await victim.machine.get_user_identity(ALICE)
        if pinned is not None and (
            pinned.master_key != identity.master.public or pinned.changed_to is not None
        ):
            return Outcome(True, f"a forged master key was stored: {pinned}")
        if pinned is not None and pinned.self_signing.key != identity.self_signing.public:
            return Outcome(True, f"a forged self-signing key was stored: {pinned}")
        for device in (await victim.machine.get_user_devices(ALICE)).values():
            if device.ed25519 != alice.machine.identity_keys["ed25519"]:
                return Outcome(True, f"a device with forged keys was stored: {device}")
        return Outcome(True)

    async def genuine(victim: Peer) -> bool:
        victim.clock.now += 3600  # past any backoff
        query = await _query_request(victim)
        await victim.machine.mark_request_as_sent(query.request_id, answer)
        pinned = await victim.machine.get_user_identity(ALICE)
        return pinned is not None and pinned.master_key == identity.master.public

    pool = [*_pool(alice, bob, mallory), identity.self_signing.public, identity.master.public]
    return Built(answer, Snapshot.of(bob), feed, genuine, pool)


async def build_keys_claim() -> Built:
    """A ``/keys/claim`` answer with the honest peer's signed one-time key."""
    alice, bob, mallory = await _cast()
    await learn_devices(alice, bob)
    answer = bob.claim_answer()
    receiver = Snapshot.of(bob)

    async def claim(victim: Peer) -> KeysClaimRequest:
        request = await victim.machine.get_missing_sessions([BOB])
        assert request is not None
        return request

    async def session_reaches_bob(victim: Peer) -> bool:
        devices = (await victim.machine.get_user_devices(BOB)).values()
        request, _ = await victim.machine.encrypt_to_devices(devices, "m.test", {"x": 1})
        if request is None:
            return False
        bob_now = await receiver.restore()
        try:
            event = deliveries(request, victim, bob_now)
            return await _to_device_still_works(bob_now, event)
        finally:
            await bob_now.machine.store.close()

    async def feed(victim: Peer, obj: Any) -> Outcome:
        request = await claim(victim)
        try:
            await victim.machine.mark_request_as_sent(request.request_id, obj)
        except RemoteProtocolError:
            return Outcome(False)
        if await victim.machine.get_missing_sessions([BOB]) is not None:
            return Outcome(False)  # no session made: refused
        if not await session_reaches_bob(victim):
            return Outcome(True, "a session was made from a key that is not the device's")
        return Outcome(True)

    async def genuine(victim: Peer) -> bool:
        request = await claim(victim)
        await victim.machine.mark_request_as_sent(request.request_id, answer)
        return await session_reaches_bob(victim)

    return Built(answer, Snapshot.of(alice), feed, genuine, _pool(alice, bob, mallory))


async def build_keys_upload() -> Built:
    """A ``/keys/upload`` answer to a new device's first upload."""
    from olmstead import MemoryDatabase, MemoryStore, OlmMachine
    from tests.conftest import KEY

    db, clock = MemoryDatabase(), Clock()
    store = await MemoryStore.open(KEY, db, lease=LONG_LEASE)
    machine = await OlmMachine.open(store, BOB, "NEWDEV", clock=clock)
    await pass_device_check(machine, BOB, "NEWDEV")
    (upload,) = await machine.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    peer = Peer(machine, db, upload, clock)

    async def the_upload(victim: Peer) -> KeysUploadRequest:
        for _ in range(3):  # a restored new device checks its device ID again first
            requests = await victim.machine.outgoing_requests()
            for other in requests:
                if isinstance(other, AccountDataRequest):
                    await victim.machine.mark_request_as_sent(other.request_id, {})
                if isinstance(other, KeysQueryRequest):
                    await victim.machine.mark_request_as_sent(other.request_id, {"device_keys": {}})
            uploads = [r for r in requests if isinstance(r, KeysUploadRequest)]
            if uploads:
                return uploads[0]
        raise AssertionError("no upload was handed out")

    async def feed(victim: Peer, obj: Any) -> Outcome:
        request = await the_upload(victim)
        try:
            await victim.machine.mark_request_as_sent(request.request_id, obj)
        except RemoteProtocolError:
            return Outcome(False)
        return Outcome(True)

    async def genuine(victim: Peer) -> bool:
        victim.clock.now += 3600
        request = await the_upload(victim)
        assert request == upload  # the same keys, never regenerated
        await victim.machine.mark_request_as_sent(request.request_id, ok(50))
        return victim.machine.device_keys_shared

    return Built(ok(50), Snapshot.of(peer), feed, genuine, [BOB, "NEWDEV"])


# --- sync sections -------------------------------------------------------------------------


async def build_sync() -> Built:
    """A ``/sync`` answer's key sections and a to-device event, fed as the machine takes
    them (strict: a bad section refuses the call and changes nothing)."""
    alice, bob, mallory = await _cast()
    await open_session(alice, bob)
    await learn_devices(bob, alice)
    await bob.machine.receive_sync_changes(unused_fallback_key_types=[])  # supports fallback
    event = await send(alice, bob, "m.test", {"n": 1})
    answer = {
        "next_batch": "s72_1",
        "device_one_time_keys_count": {"signed_curve25519": 10},
        "device_unused_fallback_key_types": ["signed_curve25519"],
        "device_lists": {"changed": [ALICE], "left": [MALLORY]},
        "to_device": {"events": [event]},
    }

    async def feed(victim: Peer, obj: Any) -> Outcome:
        if not isinstance(obj, dict):
            obj = {"to_device": obj}
        to_device = obj.get("to_device")
        events: Any = to_device.get("events") if isinstance(to_device, dict) else []
        try:
            await victim.machine.receive_sync_changes(
                one_time_key_counts=obj.get("device_one_time_keys_count"),
                unused_fallback_key_types=obj.get("device_unused_fallback_key_types"),
                device_lists=obj.get("device_lists"),
                to_device_events=events,
                sync_token=obj.get("next_batch"),
            )
        except RemoteProtocolError:
            return Outcome(False)
        return Outcome(True)

    async def genuine(victim: Peer) -> bool:
        from olmstead.boundary import SyncSections

        sections = SyncSections.read(answer)
        results = await victim.machine.receive_sync_changes(
            one_time_key_counts=sections.one_time_key_counts,
            unused_fallback_key_types=sections.unused_fallback_key_types,
            device_lists=sections.device_lists,
            to_device_events=sections.to_device_events,
            sync_token=sections.next_batch,
        )
        return any(isinstance(r, DecryptedToDevice) for r in results)

    return Built(answer, Snapshot.of(bob), feed, genuine, _pool(alice, bob, mallory))


async def build_sync_sections() -> Built:
    """The same answer as the client takes it: sorted by ``SyncSections`` first, so a
    bad section is left out and the rest (the to-device event) still goes in."""
    built = await build_sync()
    strict = built.feed

    async def feed(victim: Peer, obj: Any) -> Outcome:
        from olmstead.boundary import SyncSections

        sections = SyncSections.read(obj if isinstance(obj, dict) else {"to_device": obj})
        await victim.machine.receive_sync_changes(
            one_time_key_counts=sections.one_time_key_counts,
            unused_fallback_key_types=sections.unused_fallback_key_types,
            device_lists=sections.device_lists,
            to_device_events=sections.to_device_events,
            sync_token=sections.next_batch,
        )
        return Outcome(True)

    del strict
    return Built(built.valid, built.victim, feed, built.genuine, built.pool)


INPUTS: list[Input] = [
    Input("to_device_olm_pre_key", build_olm_pre_key),
    Input("to_device_olm_normal", build_olm_normal),
    Input("to_device_room_key", build_room_key),
    Input("olm_payload_from_a_malicious_device", build_olm_payload),
    Input("to_device_withheld", build_withheld),
    Input("room_event_megolm", build_megolm_event),
    Input("megolm_payload_from_a_malicious_device", build_megolm_payload),
    Input("keys_query_answer", build_keys_query),
    Input("keys_query_answer_with_cross_signing_keys", build_keys_query_identity),
    Input("keys_claim_answer", build_keys_claim),
    Input("keys_upload_answer", build_keys_upload),
    Input("sync_sections_strict", build_sync),
    Input("sync_sections_as_the_client_reads_them", build_sync_sections),
]

__all__ = ["INPUTS", "Built", "Input", "OlmsteadError", "Outcome"]
