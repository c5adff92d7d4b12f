"""Key uploads through the machine alone: which keys, when, and what a response does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import vodozemac

from olmstead import (
    KeySettings,
    KeysQueryRequest,
    KeysUploadRequest,
    LocalProtocolError,
    MatrixHttpError,
    OlmMachine,
    RemoteProtocolError,
    StoreLockLost,
    StoreMismatch,
)
from olmstead.olm.signing import verify_signed_json
from olmstead.requests import AccountDataRequest, OutgoingRequest
from tests.conftest import Backend, pause

USER, DEVICE = "@bot:example.org", "BOTDEVICE"
WEEK = 7 * 24 * 3600.0


async def outgoing(machine: OlmMachine) -> list[OutgoingRequest]:
    """The machine's requests, its key-state markers acknowledged and left out: the tests
    here are about keys; test_key_state.py is about the markers."""
    requests = await machine.outgoing_requests()
    for request in requests:
        if isinstance(request, AccountDataRequest):
            await machine.mark_request_as_sent(request.request_id, {})
    return [r for r in requests if not isinstance(r, AccountDataRequest)]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def open_machine(backend: Backend, clock: Clock | None = None) -> OlmMachine:
    machine = await OlmMachine.open(await backend.open(), USER, DEVICE, clock=clock or Clock())
    await pass_device_check(machine)
    return machine


async def pass_device_check(machine: OlmMachine, user: str = USER, device: str = DEVICE) -> None:
    """Answer a new device's look-up of itself (the server knows no keys for it) and its
    claim of the device ID (one one-time key alone, accepted)."""
    if machine.device_keys_shared:
        return
    (query,) = await outgoing(machine)
    assert isinstance(query, KeysQueryRequest)
    assert query.device_keys == {user: [device]}
    await machine.mark_request_as_sent(query.request_id, {"device_keys": {user: {}}})
    if not machine._record.claimed:
        (claim,) = await outgoing(machine)
        assert isinstance(claim, KeysUploadRequest)
        assert claim.device_keys is None
        assert claim.fallback_keys == {}
        assert list(claim.one_time_keys) == ["signed_curve25519:AAAAAAAAAAA"]
        await machine.mark_request_as_sent(claim.request_id, ok(1))


async def only_upload(machine: OlmMachine) -> KeysUploadRequest:
    requests = await outgoing(machine)
    assert len(requests) == 1
    assert isinstance(requests[0], KeysUploadRequest)
    return requests[0]


def ok(count: int) -> dict[str, Any]:
    return {"one_time_key_counts": {"signed_curve25519": count}}


def key_ids(request: KeysUploadRequest) -> set[str]:
    return set(request.one_time_keys)


async def test_first_upload_carries_signed_device_keys_and_a_full_set(backend: Backend) -> None:
    machine = await open_machine(backend)
    upload = await only_upload(machine)
    ed25519 = machine.identity_keys["ed25519"]

    assert upload.device_keys is not None
    assert upload.device_keys["algorithms"] == [
        "m.olm.v1.curve25519-aes-sha2",
        "m.megolm.v1.aes-sha2",
    ]
    assert upload.device_keys["keys"] == {
        f"curve25519:{DEVICE}": machine.identity_keys["curve25519"],
        f"ed25519:{DEVICE}": ed25519,
    }
    assert verify_signed_json(upload.device_keys, USER, DEVICE, ed25519)
    assert len(upload.one_time_keys) == 49  # the claim put the first on the server
    for key_id, key in upload.one_time_keys.items():
        assert key_id.startswith("signed_curve25519:")
        assert verify_signed_json(key, USER, DEVICE, ed25519)
    assert upload.fallback_keys == {}  # the server has not shown it supports them


async def test_a_tampered_key_fails_verification(backend: Backend) -> None:
    machine = await open_machine(backend)
    upload = await only_upload(machine)
    _key_id, key = next(iter(upload.one_time_keys.items()))
    forged = {**key, "key": vodozemac.Account().curve25519_key.to_base64()}
    assert not verify_signed_json(forged, USER, DEVICE, machine.identity_keys["ed25519"])


def server_error() -> MatrixHttpError:
    return MatrixHttpError("POST", "/keys/upload", 500, None, "Internal server error")


async def test_pending_upload_is_retried_unchanged_until_marked(backend: Backend) -> None:
    clock = Clock()
    machine = await open_machine(backend, clock)
    first = await only_upload(machine)
    assert await outgoing(machine) == []  # never twice at once
    await machine.mark_request_as_failed(first.request_id, server_error())
    # counts arriving meanwhile (even "none left") do not grow or change it
    await machine.receive_sync_changes(one_time_key_counts={}, unused_fallback_key_types=[])
    clock.now += 10
    assert await only_upload(machine) == first
    await backend.opened[-1].close()

    reopened = await open_machine(backend)
    assert await only_upload(reopened) == first
    await reopened.mark_request_as_sent(first.request_id, ok(50))
    assert reopened.device_keys_shared
    assert reopened.server_key_count == 50
    # published: fallback now (support was seen), but never the same one-time keys again
    after = await only_upload(reopened)
    assert after.one_time_keys == {}
    assert after.device_keys is None
    assert len(after.fallback_keys) == 1


@pytest.mark.parametrize(
    "answer",
    [{}, {"one_time_key_counts": []}, ok(-1), {"one_time_key_counts": {"signed_curve25519": "5"}}],
)
async def test_a_success_without_usable_counts_publishes_and_refills_go_on(
    backend: Backend, answer: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12, item 6: older Dendrite answered ``200 {}``. The server stored the keys;
    the count is unknown until the next sync, and refills go on from there."""
    machine = await open_machine(backend)
    upload = await only_upload(machine)
    await machine.mark_request_as_sent(upload.request_id, answer)
    assert "one_time_key_counts" in caplog.text
    assert machine.device_keys_shared
    assert machine.server_key_count is None
    assert await outgoing(machine) == []  # no keys made on a guess
    await machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": 3})
    refill = await only_upload(machine)
    assert len(refill.one_time_keys) == 47
    assert key_ids(refill).isdisjoint(key_ids(upload))


async def test_an_answer_that_is_not_an_object_fails_the_upload_and_it_is_retried(
    backend: Backend,
) -> None:
    clock = Clock()
    machine = await open_machine(backend, clock)
    upload = await only_upload(machine)
    bad: Any
    for bad in ([], None, "ok"):
        with pytest.raises(RemoteProtocolError):
            await machine.mark_request_as_sent(upload.request_id, bad)
        # settled as failed already: a caller that also reports the failure changes nothing
        await machine.mark_request_as_failed(upload.request_id, RemoteProtocolError("bad"))
    clock.now += 60
    assert await only_upload(machine) == upload
    assert not machine.device_keys_shared


async def test_unknown_request_id_is_a_local_error(backend: Backend) -> None:
    machine = await open_machine(backend)
    await only_upload(machine)
    with pytest.raises(LocalProtocolError):
        await machine.mark_request_as_sent("no-such-request", ok(50))


async def test_top_up_below_half_to_the_target(backend: Backend) -> None:
    machine = await open_machine(backend)
    first = await only_upload(machine)
    await machine.mark_request_as_sent(first.request_id, ok(50))

    await machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": 25})
    assert await outgoing(machine) == []
    await machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": 24})
    refill = await only_upload(machine)
    assert len(refill.one_time_keys) == 26
    assert key_ids(refill).isdisjoint(key_ids(first))  # a new key never reuses an ID
    await machine.mark_request_as_sent(refill.request_id, ok(50))

    await machine.receive_sync_changes(one_time_key_counts={})  # absent count: none left
    assert len((await only_upload(machine)).one_time_keys) == 50


async def test_unknown_count_generates_nothing(backend: Backend) -> None:
    machine = await open_machine(backend)
    first = await only_upload(machine)
    await machine.mark_request_as_sent(first.request_id, ok(50))
    await machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": 3})
    await machine.receive_sync_changes(one_time_key_counts=None)  # field absent: no news
    assert len((await only_upload(machine)).one_time_keys) == 47


async def test_fallback_key_created_uploaded_rotated(backend: Backend) -> None:
    clock = Clock()
    machine = await open_machine(backend, clock)
    await machine.receive_sync_changes(unused_fallback_key_types=[])
    first = await only_upload(machine)
    ((fb_id, fb),) = first.fallback_keys.items()
    assert fb["fallback"] is True
    assert verify_signed_json(fb, USER, DEVICE, machine.identity_keys["ed25519"])
    await machine.mark_request_as_sent(first.request_id, ok(50))

    # unused and young: nothing
    await machine.receive_sync_changes(unused_fallback_key_types=["signed_curve25519"])
    clock.now += WEEK - 1
    assert await outgoing(machine) == []
    # a week old: rotated
    clock.now += 1
    rotated = await only_upload(machine)
    assert list(rotated.fallback_keys) != [fb_id]
    await machine.mark_request_as_sent(rotated.request_id, ok(50))
    # used (no longer listed as unused): replaced at once
    await machine.receive_sync_changes(unused_fallback_key_types=[])
    replaced = await only_upload(machine)
    assert set(replaced.fallback_keys).isdisjoint(set(rotated.fallback_keys) | {fb_id})


async def test_previous_fallback_key_still_opens_sessions(backend: Backend) -> None:
    machine = await open_machine(backend)
    await machine.receive_sync_changes(unused_fallback_key_types=[])
    first = await only_upload(machine)
    await machine.mark_request_as_sent(first.request_id, ok(50))
    old_fallback = next(iter(first.fallback_keys.values()))["key"]
    await machine.receive_sync_changes(unused_fallback_key_types=[])  # used: rotate
    rotated = await only_upload(machine)
    await machine.mark_request_as_sent(rotated.request_id, ok(50))

    # a peer that claimed the old fallback key just before the rotation
    peer = vodozemac.Account()
    session = peer.create_outbound_session(
        vodozemac.Curve25519PublicKey.from_base64(machine.identity_keys["curve25519"]),
        vodozemac.Curve25519PublicKey.from_base64(old_fallback),
    )
    message = session.encrypt(b"late but welcome").to_pre_key()
    assert message is not None
    stored = await machine.store.load_account()
    assert stored is not None
    _, plaintext = stored.account.create_inbound_session(peer.curve25519_key, message)
    assert plaintext == b"late but welcome"


async def test_store_of_another_device_is_refused(backend: Backend) -> None:
    machine = await open_machine(backend)
    await backend.opened[-1].close()
    with pytest.raises(StoreMismatch) as caught:
        await OlmMachine.open(await backend.open(), USER, "OTHERDEVICE")
    assert "BOTDEVICE" in str(caught.value)
    assert "OTHERDEVICE" in str(caught.value)
    assert machine.device_id == DEVICE


async def test_machine_reloads_when_the_lease_changed_hands(backend: Backend) -> None:
    first = await open_machine(backend)
    upload = await only_upload(first)
    pause(first.store)
    await backend.expire_lease()

    # another process takes over, publishes the keys, and exits
    second = await OlmMachine.open(await backend.open(), USER, DEVICE)
    await pass_device_check(second)
    assert await only_upload(second) == upload
    await second.mark_request_as_sent(upload.request_id, ok(50))
    await second.store.close()

    # the first, resumed, must not overwrite that with its stale copy
    with pytest.raises(StoreLockLost):
        await first.mark_request_as_sent(upload.request_id, ok(50))
    # ... and its next operation reloads: nothing is pending any more
    assert await outgoing(first) == []
    assert first.device_keys_shared


async def test_custom_target_is_respected(backend: Backend) -> None:
    store = await backend.open()
    machine = await OlmMachine.open(
        store, USER, DEVICE, key_settings=KeySettings(target=10, refill_below=5)
    )
    await pass_device_check(machine)
    assert len((await only_upload(machine)).one_time_keys) == 9  # and the claim's key


async def test_a_writer_paused_mid_operation_cannot_overwrite_the_next_holder(
    backend: Backend,
) -> None:
    first = await open_machine(backend)
    upload = await only_upload(first)
    store = first.store
    original_save = store.save_changes
    second_identity: list[str] = []

    async def paused_then_save(changes: Any, *, generation: int | None = None) -> None:
        # first froze after reading its state: its lease runs out, another process
        # takes the store, publishes the keys and exits; first's renewer (still
        # running) then takes the lease back under a new generation
        await backend.expire_lease()
        second = await OlmMachine.open(await backend.open(), USER, DEVICE)
        await pass_device_check(second)
        (theirs,) = await outgoing(second)
        await second.mark_request_as_sent(theirs.request_id, ok(37))
        second_identity.append(second.identity_keys["ed25519"])
        await second.store.close()
        await asyncio.sleep(0.5)  # > renew_every: first's renewer re-adopts the lease
        assert store._lock is not None
        await original_save(changes, generation=generation)

    store.save_changes = paused_then_save  # type: ignore[method-assign]
    with pytest.raises(StoreLockLost):
        await first.mark_request_as_sent(upload.request_id, ok(50))
    store.save_changes = original_save  # type: ignore[method-assign]

    stored = await store.load_account()
    assert stored is not None
    assert stored.server_key_count == 37  # the second holder's write stands
    assert await outgoing(first) == []  # first reloaded: nothing pending
    assert first.server_key_count == 37
