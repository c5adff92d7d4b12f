"""Issue 12 through the machine: each numbered input, refused alone, changing nothing.

And issue 13, item 3: an Olm pre-key message delivered twice is dropped, never
rebuilds the live session, and never starts an unwedging.
"""

from __future__ import annotations

import base64
import copy
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import vodozemac

from olmstead import (
    DecryptedRoomEvent,
    DecryptedToDevice,
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    LocalProtocolError,
    MalformedEvent,
    RemoteProtocolError,
    ReplayedMessage,
    SenderMismatch,
    ToDeviceRequest,
    UndecryptableToDevice,
)
from olmstead.boundary import SyncSections
from olmstead.olm import checked
from olmstead.requests import AccountDataRequest
from tests.cross_signing_keys import CrossSigningIdentity, KeysQueryAnswer
from tests.fuzz.world import dump
from tests.machine.pair import Peer, deliveries, learn_devices, new_peer, open_session, send
from tests.machine.test_keys_upload import ok

ALICE, BOB, MALLORY = "@alice:example.org", "@bob:example.org", "@mallory:example.org"
ROOM = "!room:example.org"


async def pair() -> tuple[Peer, Peer]:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    await learn_devices(bob, alice)
    return alice, bob


async def receive(peer: Peer, event: Any) -> list[Any]:
    return await peer.machine.receive_sync_changes(to_device_events=[event])


async def claims(peer: Peer) -> list[KeysClaimRequest]:
    return [r for r in await peer.machine.outgoing_requests() if isinstance(r, KeysClaimRequest)]


def b64_of(size: int) -> str:
    return base64.b64encode(b"\x01" * size).decode().rstrip("=")


# --- 1. an Olm message type out of range -----------------------------------------------------


@pytest.mark.parametrize("bad_type", [-1, 2**64, -math.inf, 2, True, "0", None])
async def test_an_olm_message_type_out_of_range_fails_alone(bad_type: Any) -> None:
    alice, bob = await pair()
    event = await send(alice, bob, "m.test", {"n": 1})
    poisoned = copy.deepcopy(event)
    poisoned["content"]["ciphertext"][bob.machine.identity_keys["curve25519"]]["type"] = bad_type
    before = dump(bob.db)

    got, plain = await bob.machine.receive_sync_changes(
        to_device_events=[poisoned, {"type": "m.plain", "sender": ALICE, "content": {}}]
    )
    assert isinstance(got, UndecryptableToDevice)
    assert isinstance(got.error, MalformedEvent)
    assert got.error.field is not None
    assert got.error.field.endswith(".type")
    assert isinstance(plain, dict)
    assert plain["type"] == "m.plain"  # the rest of the batch went on
    assert dump(bob.db) == before
    assert await claims(bob) == []  # a malformed message is no broken session
    (ok_event,) = await receive(bob, event)
    assert isinstance(ok_event, DecryptedToDevice)


# --- 2. an Ed25519 key of 33 bytes -----------------------------------------------------------


def test_a_panic_in_vodozemac_becomes_an_olmstead_error() -> None:
    """vodozemac 0.10 panics (a BaseException) on a 33-byte Ed25519 key: the one place
    that calls it turns the panic into olmstead's error; it is never reached from input,
    since the boundary checks the length first."""
    panic_type = None
    try:
        vodozemac.Ed25519PublicKey.from_base64(b64_of(33))
    except BaseException as exc:
        panic_type = type(exc)
    assert panic_type is not None
    assert not issubclass(panic_type, Exception)
    with pytest.raises(RemoteProtocolError), checked.binding("an Ed25519 key"):
        vodozemac.Ed25519PublicKey.from_base64(b64_of(33))
    with pytest.raises(RemoteProtocolError) as caught:
        checked.ed25519_key(b64_of(33), "keys.ed25519:DEV")
    assert caught.value.field == "keys.ed25519:DEV"
    assert not checked.verify_signature(b64_of(33), b"signed", b64_of(64))


@pytest.mark.parametrize("size", [0, 31, 33, 34, 64])
def test_the_boundary_checks_a_key_length_before_vodozemac_sees_it(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    for kind in ("Ed25519PublicKey", "Curve25519PublicKey"):
        real = getattr(vodozemac, kind)

        class Spy:
            @staticmethod
            def from_base64(text: str, real: Any = real) -> Any:
                seen.append(text)
                return real.from_base64(text)

        monkeypatch.setattr(vodozemac, kind, Spy)
    for parse in (checked.ed25519_key, checked.curve25519_key):
        with pytest.raises(RemoteProtocolError, match=f"is {size} bytes, not a 32-byte"):
            parse(b64_of(size), "keys.k")
    assert seen == []  # refused before the binding was called
    assert checked.ed25519_key(b64_of(32) + "=", "k").to_base64() == b64_of(32)
    assert seen == [b64_of(32)]  # in its canonical spelling


@pytest.mark.parametrize("size", [0, 31, 33, 34, 64])
async def test_a_device_with_a_key_of_the_wrong_length_is_refused(size: int) -> None:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    mallory = await new_peer(MALLORY, "MALLORYDEV")
    await bob.machine.update_tracked_users([ALICE, MALLORY])
    (query,) = [r for r in await bob.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)]
    keys = mallory.machine.device_keys()
    keys["keys"]["ed25519:MALLORYDEV"] = b64_of(size)  # still carries its signature
    answer = {
        "device_keys": {
            ALICE: alice.query_answer()["device_keys"][ALICE],
            MALLORY: {"MALLORYDEV": keys},
        }
    }
    await bob.machine.mark_request_as_sent(query.request_id, answer)
    assert await bob.machine.get_user_devices(MALLORY) == {}
    assert "ALICEDEV" in await bob.machine.get_user_devices(ALICE)  # the rest was taken


@pytest.mark.parametrize("usage", ["master", "self_signing"])
async def test_a_cross_signing_key_of_33_bytes_is_refused_not_a_panic(usage: str) -> None:
    # vodozemac panics (a BaseException) on an Ed25519 key of exactly 33 bytes
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    mallory = CrossSigningIdentity(MALLORY)
    await bob.machine.update_tracked_users([ALICE, MALLORY])
    (query,) = [r for r in await bob.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)]
    answer = KeysQueryAnswer().identity(mallory).json()
    bad = b64_of(33)
    key_object = answer[f"{usage}_keys"][MALLORY]
    key_object["keys"] = {f"ed25519:{bad}": bad}
    answer["device_keys"][ALICE] = alice.query_answer()["device_keys"][ALICE]
    await bob.machine.mark_request_as_sent(query.request_id, answer)
    assert await bob.machine.get_user_identity(MALLORY) is None
    assert "ALICEDEV" in await bob.machine.get_user_devices(ALICE)  # the rest was taken


async def test_a_padded_spelling_of_a_pinned_master_key_is_refused_not_a_change() -> None:
    # the same key in padded base64, and the self-signing key's signature renamed to it
    # (signatures do not cover their own map): a server could fake an identity change
    _alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    mallory = CrossSigningIdentity(MALLORY)
    await bob.machine.update_tracked_users([MALLORY])

    async def answer_query(answer: dict[str, Any]) -> None:
        await bob.machine.receive_sync_changes(device_lists={"changed": [MALLORY]})
        queries = [
            r for r in await bob.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)
        ]
        (query,) = queries
        await bob.machine.mark_request_as_sent(query.request_id, answer)

    await answer_query(KeysQueryAnswer().identity(mallory).json())
    pinned = await bob.machine.get_user_identity(MALLORY)
    assert pinned is not None
    answer = KeysQueryAnswer().identity(mallory).json()
    master = answer["master_keys"][MALLORY]
    ((key_id, key),) = master["keys"].items()
    master["keys"] = {f"{key_id}=": f"{key}="}
    ssk_signatures = answer["self_signing_keys"][MALLORY]["signatures"][MALLORY]
    ssk_signatures[f"{key_id}="] = ssk_signatures.pop(key_id)
    await answer_query(answer)
    assert bob.machine.take_identity_changes() == []
    assert await bob.machine.get_user_identity(MALLORY) == pinned


# --- 3. sync sections of the wrong JSON type ---------------------------------------------------


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ("device_lists", [], "device_lists"),
        ("device_lists", {"changed": "@a:b"}, "device_lists.changed"),
        ("device_lists", {"left": [5]}, "device_lists.left[0]"),
        ("one_time_key_counts", [], "device_one_time_keys_count"),
        ("one_time_key_counts", {"signed_curve25519": -1}, "device_one_time_keys_count"),
        ("one_time_key_counts", {"signed_curve25519": 2**64}, "device_one_time_keys_count"),
        ("unused_fallback_key_types", 5, "device_unused_fallback_key_types"),
        ("to_device_events", {"events": []}, "to_device_events"),
        ("sync_token", "\ud800", "next_batch"),
    ],
)
async def test_a_sync_section_of_the_wrong_type_is_refused_naming_it(
    section: str, value: Any, field: str
) -> None:
    _alice, bob = await pair()
    # a fallback key published, as in the issue (5 after a fallback key was published)
    await bob.machine.receive_sync_changes(unused_fallback_key_types=[])
    (upload,) = [
        r for r in await bob.machine.outgoing_requests() if isinstance(r, KeysUploadRequest)
    ]
    await bob.machine.mark_request_as_sent(upload.request_id, ok(50))
    before = dump(bob.db)
    with pytest.raises(RemoteProtocolError) as caught:
        await bob.machine.receive_sync_changes(**{section: value})
    assert caught.value.field is not None
    assert caught.value.field.startswith(field)
    assert dump(bob.db) == before


async def test_the_client_reads_each_sync_section_on_its_own() -> None:
    alice, bob = await pair()
    event = await send(alice, bob, "m.test", {"n": 1})
    sections = SyncSections.read(
        {
            "next_batch": "s1",
            "device_lists": [],
            "device_one_time_keys_count": "many",
            "device_unused_fallback_key_types": 5,
            "to_device": {"events": [event, 7]},
        }
    )
    assert sorted(p.field or "" for p in sections.problems) == [
        "device_lists",
        "device_one_time_keys_count",
        "device_unused_fallback_key_types",
    ]
    got, junk = await bob.machine.receive_sync_changes(
        one_time_key_counts=sections.one_time_key_counts,
        unused_fallback_key_types=sections.unused_fallback_key_types,
        device_lists=sections.device_lists,
        to_device_events=sections.to_device_events,
        sync_token=sections.next_batch,
    )
    assert isinstance(got, DecryptedToDevice)
    assert isinstance(junk, UndecryptableToDevice)
    assert isinstance(junk.error, MalformedEvent)
    assert await bob.machine.store.get_value("sync_token") == "s1"


# --- 4. null or [] where the public API takes a mapping or a list ------------------------------


@pytest.mark.parametrize("bad", [None, 5, "@alice:example.org", {"a": 1}, [None], ["\x00"]])
async def test_a_list_argument_of_the_wrong_type_is_a_local_error(bad: Any) -> None:
    alice, _bob = await pair()
    machine = alice.machine
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: machine.update_tracked_users(bad),
        lambda: machine.get_missing_sessions(bad),
        lambda: machine.share_room_key(ROOM, bad),
        lambda: machine.encrypt_room_events(ROOM, bad),
        lambda: machine.encrypt_to_devices(bad, "m.test", {}),
    ]
    for call in calls:
        with pytest.raises(LocalProtocolError):
            await call()
    if not isinstance(bad, list):
        with pytest.raises(LocalProtocolError):
            await machine.decrypt_room_events(ROOM, bad)


@pytest.mark.parametrize("bad", [None, [], 5, "x", ["a"]])
async def test_a_mapping_or_id_argument_of_the_wrong_type_is_a_local_error(bad: Any) -> None:
    alice, _bob = await pair()
    machine = alice.machine
    with pytest.raises(LocalProtocolError):
        await machine.encrypt_room_event(ROOM, "m.text", bad)
    with pytest.raises(LocalProtocolError):
        await machine.encrypt_to_devices([], "m.test", bad)
    if bad != "x":
        others: list[Callable[[], Awaitable[object]]] = [
            lambda: machine.share_room_key(bad, [BOB]),
            lambda: machine.decrypt_room_events(bad, []),
            lambda: machine.get_user_devices(bad),
        ]
        for call in others:
            with pytest.raises(LocalProtocolError):
                await call()


@pytest.mark.parametrize("bad", [None, [], "x", 5, {"device_keys": []}, {"device_keys": "x"}])
async def test_a_server_answer_that_is_not_an_object_is_a_remote_error(bad: Any) -> None:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await alice.machine.update_tracked_users([BOB])
    (query,) = [
        r for r in await alice.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)
    ]
    with pytest.raises(RemoteProtocolError):
        await alice.machine.mark_request_as_sent(query.request_id, bad)
    alice.clock.now += 3600  # not stranded: asked again after its backoff
    (again,) = [
        r for r in await alice.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)
    ]
    await alice.machine.mark_request_as_sent(again.request_id, bob.query_answer())
    assert "BOBDEV" in await alice.machine.get_user_devices(BOB)


# --- 5. a refused input records nothing ----------------------------------------------------------


async def test_a_spoofed_room_event_does_not_claim_the_message_index() -> None:
    alice, bob = await pair()
    (share,) = await alice.machine.share_room_key(ROOM, [BOB])
    await receive(bob, deliveries(share, alice, bob))
    content = await alice.machine.encrypt_room_event(ROOM, "m.text", {"body": "real"})
    genuine = {
        "type": "m.room.encrypted",
        "sender": ALICE,
        "event_id": "$real",
        "origin_server_ts": 1,
        "content": content,
    }
    spoofed = {**genuine, "sender": MALLORY, "event_id": "$spoofed"}
    before = dump(bob.db)
    (refused,) = await bob.machine.decrypt_room_events(ROOM, [spoofed])
    assert isinstance(refused, SenderMismatch)
    assert dump(bob.db) == before
    (got,) = await bob.machine.decrypt_room_events(ROOM, [genuine])
    assert isinstance(got, DecryptedRoomEvent)
    assert got.content == {"body": "real"}
    # and in one batch, the spoofed copy first
    content = await alice.machine.encrypt_room_event(ROOM, "m.text", {"body": "two"})
    second = {**genuine, "event_id": "$two", "content": content}
    results = await bob.machine.decrypt_room_events(
        ROOM, [{**second, "sender": MALLORY, "event_id": "$x"}, second]
    )
    assert isinstance(results[0], SenderMismatch)
    assert isinstance(results[1], DecryptedRoomEvent)
    (replay,) = await bob.machine.decrypt_room_events(ROOM, [{**second, "event_id": "$y"}])
    assert isinstance(replay, ReplayedMessage)  # the genuine event holds the index now


async def test_a_to_device_sender_mismatch_uses_no_one_time_key_and_stores_no_session() -> None:
    alice, bob = await pair()
    event = await send(alice, bob, "m.test", {"n": 1})
    spoofed = {**event, "sender": MALLORY}
    account_before = await bob.machine.store.load_account()
    assert account_before is not None
    keys_before = dict(account_before.account.one_time_keys)
    before = dump(bob.db)
    (refused,) = await receive(bob, spoofed)
    assert isinstance(refused, UndecryptableToDevice)
    assert isinstance(refused.error, SenderMismatch)
    assert dump(bob.db) == before
    assert bob.db.olm_sessions == {}
    (got,) = await receive(bob, event)  # the genuine one uses the key it was meant for
    assert isinstance(got, DecryptedToDevice)
    assert got.content == {"n": 1}
    after = await bob.machine.store.load_account()
    assert after is not None
    assert len(after.account.one_time_keys) <= len(keys_before)


async def test_a_refused_normal_message_does_not_step_the_session() -> None:
    alice, bob = await pair()
    await receive(bob, await send(alice, bob, "m.a", {}))
    await receive(alice, await send(bob, alice, "m.b", {}))
    event = await send(alice, bob, "m.test", {"n": 2})
    before = dump(bob.db)
    (refused,) = await receive(bob, {**event, "sender": MALLORY})
    assert isinstance(refused, UndecryptableToDevice)
    assert dump(bob.db) == before
    (got,) = await receive(bob, event)
    assert isinstance(got, DecryptedToDevice)


# --- 6. 200 {} to a fallback-key-only upload -----------------------------------------------------


async def test_an_empty_answer_to_a_fallback_key_upload_does_not_block_refills() -> None:
    bob = await new_peer(BOB, "BOBDEV")
    await bob.machine.receive_sync_changes(
        one_time_key_counts={"signed_curve25519": 50}, unused_fallback_key_types=[]
    )
    (upload,) = [
        r for r in await bob.machine.outgoing_requests() if isinstance(r, KeysUploadRequest)
    ]
    assert upload.fallback_keys
    assert not upload.one_time_keys
    await bob.machine.mark_request_as_sent(upload.request_id, {})  # older Dendrite
    await bob.machine.receive_sync_changes(
        one_time_key_counts={"signed_curve25519": 3},
        unused_fallback_key_types=["signed_curve25519"],
    )
    requests = await bob.machine.outgoing_requests()
    (refill,) = [r for r in requests if isinstance(r, KeysUploadRequest)]
    assert len(refill.one_time_keys) == 47
    assert not refill.fallback_keys


# --- issue 13, item 3: a pre-key message delivered twice ----------------------------------------


async def test_a_pre_key_message_delivered_twice_is_dropped_one_time_key() -> None:
    alice, bob = await pair()
    event = await send(alice, bob, "m.test", {"n": 1})
    (got,) = await receive(bob, event)
    assert isinstance(got, DecryptedToDevice)
    before = dump(bob.db)
    assert await receive(bob, copy.deepcopy(event)) == []  # dropped, not a failure
    assert dump(bob.db) == before
    assert await claims(bob) == []  # no new session, no claim, no m.dummy
    assert not [r for r in await bob.machine.outgoing_requests() if isinstance(r, ToDeviceRequest)]
    (later,) = await receive(bob, await send(alice, bob, "m.test", {"n": 2}))
    assert isinstance(later, DecryptedToDevice)


async def fallback_pair() -> tuple[Peer, Peer, dict[str, Any]]:
    """Alice opens her session with bob on bob's fallback key (his one-time keys are gone)."""
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await bob.machine.receive_sync_changes(unused_fallback_key_types=[])
    requests = await bob.machine.outgoing_requests()
    (upload,) = [r for r in requests if isinstance(r, KeysUploadRequest)]
    for request in requests:
        if isinstance(request, AccountDataRequest):
            await bob.machine.mark_request_as_sent(request.request_id, {})
    await bob.machine.mark_request_as_sent(upload.request_id, ok(0))
    ((key_id, key),) = upload.fallback_keys.items()
    await learn_devices(alice, bob)
    await learn_devices(bob, alice)
    claim = await alice.machine.get_missing_sessions([BOB])
    assert claim is not None
    answer = {"one_time_keys": {BOB: {"BOBDEV": {key_id: key}}}}
    await alice.machine.mark_request_as_sent(claim.request_id, answer)
    return alice, bob, answer


async def test_a_pre_key_message_delivered_twice_is_dropped_fallback_key() -> None:
    alice, bob, _ = await fallback_pair()
    first = await send(alice, bob, "m.test", {"n": 1})
    assert isinstance((await receive(bob, first))[0], DecryptedToDevice)
    # the session lives on: bob answers, alice sends normal messages
    (reply,) = await receive(alice, await send(bob, alice, "m.test", {"r": 1}))
    assert isinstance(reply, DecryptedToDevice)
    (second,) = await receive(bob, await send(alice, bob, "m.test", {"n": 2}))
    assert isinstance(second, DecryptedToDevice)

    before = dump(bob.db)
    # the fallback key is still bob's: the old message would make a new session from it
    assert await receive(bob, copy.deepcopy(first)) == []
    assert dump(bob.db) == before  # the live session was not replaced
    assert await claims(bob) == []
    # bob's next message still reaches alice over the live session, and alice's reaches bob
    (back,) = await receive(alice, await send(bob, alice, "m.test", {"r": 2}))
    assert isinstance(back, DecryptedToDevice)
    assert back.content == {"r": 2}
    (third,) = await receive(bob, await send(alice, bob, "m.test", {"n": 3}))
    assert isinstance(third, DecryptedToDevice)
    assert third.content == {"n": 3}


async def test_a_real_failure_still_unwedges() -> None:
    alice, bob = await pair()
    await receive(bob, await send(alice, bob, "m.test", {"n": 1}))
    bob.db.olm_sessions.clear()  # bob lost the session and the one-time key is used
    from tests.machine.pair import reopen

    bob = await reopen(bob)
    # a new pre-key message for a session bob does not hold, on a key he no longer has
    alice.machine.olm.forget()
    alice.db.olm_sessions.clear()
    claim = await alice.machine.get_missing_sessions([BOB])
    assert claim is not None
    stale = {
        "one_time_keys": {BOB: {"BOBDEV": dict([next(iter(bob.published.one_time_keys.items()))])}}
    }
    await alice.machine.mark_request_as_sent(claim.request_id, stale)
    (broken,) = await receive(bob, await send(alice, bob, "m.test", {"n": 2}))
    assert isinstance(broken, UndecryptableToDevice)
    assert len(await claims(bob)) == 1


async def test_a_key_spelled_another_way_names_the_same_device() -> None:
    """One key, one name: a padded ``sender_key`` (found by the fuzz suite) opened a
    second session under another spelling, beside the real one, unverified."""
    alice, bob = await pair()
    event = await send(alice, bob, "m.test", {"n": 1})
    padded = copy.deepcopy(event)
    padded["content"]["sender_key"] += "="
    (got,) = await receive(bob, padded)
    assert isinstance(got, DecryptedToDevice)
    assert got.sender_key == alice.machine.identity_keys["curve25519"]
    assert got.verified
    assert {key for key, _ in bob.db.olm_sessions} == {alice.machine.identity_keys["curve25519"]}


async def test_an_answer_that_leaves_users_out_is_asked_again_after_a_backoff() -> None:
    """``{}`` (a server that leaves empty maps out) or a user whose server failed: the
    user stays outdated, and is not queried again in the same round (no storm)."""
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await alice.machine.update_tracked_users([BOB])
    requests = await alice.machine.outgoing_requests()
    (query,) = [r for r in requests if isinstance(r, KeysQueryRequest)]
    await alice.machine.mark_request_as_sent(query.request_id, {"failures": {}})
    again = await alice.machine.outgoing_requests()
    assert [r for r in again if isinstance(r, KeysQueryRequest)] == []
    alice.clock.now += 3600
    (retry,) = [
        r for r in await alice.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)
    ]
    await alice.machine.mark_request_as_sent(retry.request_id, bob.query_answer())
    assert "BOBDEV" in await alice.machine.get_user_devices(BOB)
