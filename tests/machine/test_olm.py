"""Olm to-device messages between two machines, with no network: sessions, checks, restarts."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
import vodozemac

from olmstead import KeysClaimRequest, MatrixHttpError
from olmstead.errors import (
    DeviceIdInUse,
    NotForThisDevice,
    OlmSessionError,
    SenderMismatch,
    StoreError,
)
from olmstead.machine import UNWEDGE_INTERVAL, UndecryptableToDevice
from olmstead.olm import account as own
from olmstead.requests import ToDeviceRequest
from olmstead.sessions.olm_sessions import DecryptedToDevice
from tests.conftest import Backend
from tests.machine.pair import (
    Peer,
    deliveries,
    learn_devices,
    new_peer,
    open_session,
    reopen,
    send,
)
from tests.machine.test_keys_upload import open_machine

ALICE, BOB = "@alice:example.org", "@bob:example.org"


async def receive(peer: Peer, event: dict[str, Any]) -> DecryptedToDevice | UndecryptableToDevice:
    (result,) = await peer.machine.receive_sync_changes(to_device_events=[event])
    assert isinstance(result, DecryptedToDevice | UndecryptableToDevice)
    return result


async def pair() -> tuple[Peer, Peer]:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    return alice, bob


async def test_a_message_both_ways_with_sender_and_recipient_bound() -> None:
    alice, bob = await pair()
    event = await send(alice, bob, "m.test", {"body": "hello bob"})
    assert event["content"]["ciphertext"][bob.machine.identity_keys["curve25519"]]["type"] == 0

    got = await receive(bob, event)
    assert isinstance(got, DecryptedToDevice)
    assert (got.type, got.content) == ("m.test", {"body": "hello bob"})
    assert got.sender == ALICE
    assert got.sender_device == "ALICEDEV"
    assert got.sender_key == alice.machine.identity_keys["curve25519"]
    assert got.sender_ed25519 == alice.machine.identity_keys["ed25519"]
    assert not got.verified  # bob does not know alice's device yet

    await learn_devices(bob, alice)
    reply = await send(bob, alice, "m.test", {"body": "hello alice"})
    assert reply["content"]["ciphertext"][alice.machine.identity_keys["curve25519"]]["type"] == 1
    back = await receive(alice, reply)
    assert isinstance(back, DecryptedToDevice)
    assert back.content == {"body": "hello alice"}
    assert back.verified


async def test_the_inbound_session_uses_up_the_one_time_key() -> None:
    alice, bob = await pair()
    await receive(bob, await send(alice, bob, "m.test", {}))
    (used,) = bob.claimed
    stored = await bob.machine.store.load_account()
    assert stored is not None
    peer = vodozemac.Account()  # another device that claimed the same key: refused
    session = peer.create_outbound_session(
        stored.account.curve25519_key,
        vodozemac.Curve25519PublicKey.from_base64(bob.published.one_time_keys[used]["key"]),
    )
    message = session.encrypt(b"x").to_pre_key()
    assert message is not None
    try:
        stored.account.create_inbound_session(peer.curve25519_key, message)
    except ValueError:
        pass
    else:
        raise AssertionError("the one-time key was used twice")


async def test_ratchets_survive_a_restart_on_both_sides() -> None:
    alice, bob = await pair()
    await receive(bob, await send(alice, bob, "m.test", {"n": 1}))
    alice, bob = await reopen(alice), await reopen(bob)
    second = await receive(bob, await send(alice, bob, "m.test", {"n": 2}))
    assert isinstance(second, DecryptedToDevice)
    assert second.content == {"n": 2}


async def test_a_replayed_normal_message_is_refused() -> None:
    alice, bob = await pair()
    await receive(bob, await send(alice, bob, "m.test", {"n": 0}))
    await learn_devices(bob, alice)
    await receive(alice, await send(bob, alice, "m.test", {}))  # alice now sends normal ones
    event = await send(alice, bob, "m.test", {"n": 1})
    assert event["content"]["ciphertext"][bob.machine.identity_keys["curve25519"]]["type"] == 1
    assert isinstance(await receive(bob, event), DecryptedToDevice)
    again = await receive(bob, copy.deepcopy(event))
    assert isinstance(again, UndecryptableToDevice)


async def test_tampered_ciphertext_is_refused() -> None:
    alice, bob = await pair()
    await receive(bob, await send(alice, bob, "m.test", {"n": 1}))
    event = await send(alice, bob, "m.test", {"n": 2})
    part = event["content"]["ciphertext"][bob.machine.identity_keys["curve25519"]]
    body = part["body"]
    part["body"] = body[:20] + ("A" if body[20] != "A" else "B") + body[21:]
    got = await receive(bob, event)
    assert isinstance(got, UndecryptableToDevice)
    assert isinstance(got.error, OlmSessionError)
    # the genuine message still decrypts: the failed attempt stepped nothing
    part["body"] = body
    assert isinstance(await receive(bob, event), DecryptedToDevice)


async def test_a_wrong_sender_is_refused() -> None:
    alice, bob = await pair()
    event = await send(alice, bob, "m.test", {})
    event["sender"] = "@mallory:example.org"
    got = await receive(bob, event)
    assert isinstance(got, UndecryptableToDevice)
    assert isinstance(got.error, SenderMismatch)
    assert "@mallory:example.org" in str(got.error)


async def test_a_wrong_sender_key_is_refused() -> None:
    alice, bob = await pair()
    event = await send(alice, bob, "m.test", {})
    event["content"]["sender_key"] = vodozemac.Account().curve25519_key.to_base64()
    got = await receive(bob, event)
    assert isinstance(got, UndecryptableToDevice)
    assert isinstance(got.error, OlmSessionError)


async def test_a_known_device_with_another_ed25519_key_is_refused() -> None:
    alice, bob = await pair()
    await learn_devices(bob, alice)
    bob_curve = bob.machine.identity_keys["curve25519"]
    # alice's own session, but a payload that claims an impostor's Ed25519 key
    (record, *_) = await alice.machine.olm.sessions_for(bob_curve)
    payload = {
        "type": "m.test",
        "content": {},
        "sender": ALICE,
        "sender_device": "ALICEDEV",
        "keys": {"ed25519": own.identity_keys(vodozemac.Account())["ed25519"]},
        "recipient": BOB,
        "recipient_keys": {"ed25519": bob.machine.identity_keys["ed25519"]},
    }
    message_type, body = record.session.encrypt(json.dumps(payload).encode()).to_parts()
    content = {
        "algorithm": "m.olm.v1.curve25519-aes-sha2",
        "sender_key": alice.machine.identity_keys["curve25519"],
        "ciphertext": {bob_curve: {"type": message_type, "body": b64(body)}},
    }
    got = await receive(bob, {"type": "m.room.encrypted", "sender": ALICE, "content": content})
    assert isinstance(got, UndecryptableToDevice)
    assert isinstance(got.error, SenderMismatch)
    assert "not the key it claims" in str(got.error)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


async def test_messages_for_other_devices_are_not_ours() -> None:
    alice, bob = await pair()
    event = await send(alice, bob, "m.test", {})
    ciphertext = event["content"]["ciphertext"]
    ciphertext["SOMEONEELSE"] = ciphertext.pop(bob.machine.identity_keys["curve25519"])
    got = await receive(bob, event)
    assert isinstance(got, UndecryptableToDevice)
    assert isinstance(got.error, NotForThisDevice)


async def test_plain_to_device_events_pass_through() -> None:
    bob = await new_peer(BOB, "BOBDEV")
    plain = {"type": "m.key.verification.request", "sender": ALICE, "content": {"x": 1}}
    assert await bob.machine.receive_sync_changes(to_device_events=[plain]) == [plain]


async def test_a_claimed_key_not_signed_by_the_device_makes_no_session() -> None:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await learn_devices(alice, bob)
    claim = await alice.machine.get_missing_sessions([BOB])
    assert claim is not None
    answer = bob.claim_answer()
    key = next(iter(answer["one_time_keys"][BOB]["BOBDEV"].values()))
    key["key"] = vodozemac.Account().curve25519_key.to_base64()  # swapped by the server
    await alice.machine.mark_request_as_sent(claim.request_id, answer)
    devices = (await alice.machine.get_user_devices(BOB)).values()
    request, without = await alice.machine.encrypt_to_devices(devices, "m.test", {})
    assert request is None
    assert [d.device_id for d in without] == ["BOBDEV"]
    # and it is still missing, so it will be claimed again
    assert await alice.machine.get_missing_sessions([BOB]) is not None


async def test_no_claim_for_devices_we_have_sessions_with() -> None:
    alice, _bob = await pair()
    assert await alice.machine.get_missing_sessions([BOB]) is None


async def test_a_wedged_session_is_replaced_and_announced_with_m_dummy() -> None:
    alice, bob = await pair()
    await learn_devices(bob, alice)
    await receive(bob, await send(alice, bob, "m.test", {"n": 1}))
    bob.db.olm_sessions.clear()  # bob's store lost the session (a restored backup)
    bob = await reopen(bob)

    broken = await receive(bob, await send(alice, bob, "m.test", {"n": 2}))
    assert isinstance(broken, UndecryptableToDevice)
    assert isinstance(broken.error, OlmSessionError)

    # bob claims a fresh key of alice's device, opens a new session, and says so
    (claim,) = [r for r in await bob.machine.outgoing_requests() if isinstance(r, KeysClaimRequest)]
    assert claim.one_time_keys == {ALICE: {"ALICEDEV": "signed_curve25519"}}
    await bob.machine.mark_request_as_sent(claim.request_id, alice.claim_answer())
    (dummy,) = await bob.machine.outgoing_requests()
    assert isinstance(dummy, ToDeviceRequest)
    got = await receive(alice, deliveries(dummy, bob, alice))
    assert isinstance(got, DecryptedToDevice)
    assert got.type == "m.dummy"
    await bob.machine.mark_request_as_sent(dummy.request_id, {})

    # alice now writes over the new session, and bob reads it
    healed = await receive(bob, await send(alice, bob, "m.test", {"n": 3}))
    assert isinstance(healed, DecryptedToDevice)
    assert healed.content == {"n": 3}


async def test_an_unusable_device_does_not_unwedge() -> None:
    alice, bob = await pair()
    await learn_devices(bob, alice)
    await receive(bob, await send(alice, bob, "m.test", {"n": 1}))
    bob.db.olm_sessions.clear()
    bob = await reopen(bob)
    # as if bob's device ID had been found to hold another identity's keys
    bob.machine.upload_guard.problem = DeviceIdInUse(BOB, "BOBDEV", "someone else's key")
    broken = await receive(bob, await send(alice, bob, "m.test", {"n": 2}))
    assert isinstance(broken, UndecryptableToDevice)
    requests = await bob.machine.outgoing_requests()
    assert not [r for r in requests if isinstance(r, KeysClaimRequest | ToDeviceRequest)]


def tampered(event: dict[str, Any], bob: Peer) -> dict[str, Any]:
    part = event["content"]["ciphertext"][bob.machine.identity_keys["curve25519"]]
    part["body"] = part["body"][:20] + ("A" if part["body"][20] != "A" else "B") + part["body"][21:]
    return event


async def claims(peer: Peer) -> list[KeysClaimRequest]:
    return [r for r in await peer.machine.outgoing_requests() if isinstance(r, KeysClaimRequest)]


async def test_unwedging_is_rate_limited_per_device() -> None:
    alice, bob = await pair()
    await learn_devices(bob, alice)
    await receive(bob, await send(alice, bob, "m.test", {}))

    await receive(bob, tampered(await send(alice, bob, "m.test", {}), bob))
    (claim,) = await claims(bob)
    await bob.machine.mark_request_as_sent(claim.request_id, alice.claim_answer())

    bob.clock.now += UNWEDGE_INTERVAL - 1
    await receive(bob, tampered(await send(alice, bob, "m.test", {}), bob))
    assert await claims(bob) == []  # within the hour: no new session

    bob.clock.now += 1
    await receive(bob, tampered(await send(alice, bob, "m.test", {}), bob))
    assert len(await claims(bob)) == 1


async def test_a_failed_unwedge_claim_is_retried_at_the_next_breakage() -> None:
    alice, bob = await pair()
    await learn_devices(bob, alice)
    await receive(bob, await send(alice, bob, "m.test", {}))
    await receive(bob, tampered(await send(alice, bob, "m.test", {}), bob))
    (claim,) = await claims(bob)
    await bob.machine.mark_request_as_failed(
        claim.request_id, MatrixHttpError("POST", "/keys/claim", 502, None, "down")
    )
    await receive(bob, tampered(await send(alice, bob, "m.test", {}), bob))
    assert len(await claims(bob)) == 1


@pytest.mark.parametrize(
    ("sender", "sender_key"),
    [
        ("@e\x00:x", "k" * 43),  # the server writes the sender; PostgreSQL refuses NUL
        ("@e\ud800:x", "k" * 43),  # a lone surrogate is valid JSON, not UTF-8
        ("@e:x", "k\x00" + "k" * 41),  # any sender writes the sender key
        ("@e:x", "k\ud800" + "k" * 41),
    ],
)
async def test_an_olm_message_with_a_sender_or_key_no_store_can_keep_fails_and_the_sync_commits(
    backend: Backend, sender: str, sender_key: str
) -> None:
    bob = await open_machine(backend)
    # a pre-key message no session decrypts, from a device bob does not know
    body = base64.b64encode(b"\x03" + bytes(60)).decode().rstrip("=")
    event = {
        "type": "m.room.encrypted",
        "sender": sender,
        "content": {
            "algorithm": "m.olm.v1.curve25519-aes-sha2",
            "sender_key": sender_key,
            "ciphertext": {bob.identity_keys["curve25519"]: {"type": 0, "body": body}},
        },
    }
    (result,) = await bob.receive_sync_changes(to_device_events=[event], sync_token="s1")
    assert isinstance(result, UndecryptableToDevice)
    assert await bob.store.get_value("sync_token") == "s1"
    assert await bob.store.get_tracked_users() == {}  # nobody is followed for it


async def test_a_store_failure_between_decryption_and_commit_leaves_no_session_ahead() -> None:
    """The store fails after an Olm message was decrypted (its session stepped in the
    cache) and before the commit: when the sync comes again, the message still decrypts.
    A cache left ahead of the store made it fail as wedged, and the room key it carried
    was lost (found with the database refusing connections mid-sync)."""
    alice, bob = await pair()
    await receive(bob, await send(alice, bob, "m.test", {"n": 1}))  # bob's session is set up
    event = await send(alice, bob, "m.test", {"n": 2})
    store = bob.machine.store
    real = store.get_device_by_curve25519

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("the database went away")

    store.get_device_by_curve25519 = down  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        await bob.machine.receive_sync_changes(to_device_events=[event])
    store.get_device_by_curve25519 = real  # type: ignore[method-assign]
    got = await receive(bob, event)
    assert isinstance(got, DecryptedToDevice), got
    assert got.content == {"n": 2}
