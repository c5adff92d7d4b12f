"""The key-state marker through the machine alone: written after confirmed uploads only,
and read back to find a rolled-back store before its next upload collides."""

from __future__ import annotations

import copy

import vodozemac

from olmstead import (
    KeysClaimRequest,
    KeysUploadRequest,
    MatrixHttpError,
    MemoryDatabase,
    OlmMachine,
)
from olmstead.key_state import (
    issued_through,
    key_number,
    marker_content,
    marker_type,
    read_marker,
)
from olmstead.olm import account as own
from olmstead.requests import AccountDataRequest
from tests.machine.test_keys_upload import (
    DEVICE,
    USER,
    Clock,
    ok,
    pass_device_check,
    server_error,
)
from tests.machine.test_upload_guard import claim_answer, foreign_key, machine_on


def test_key_numbers_are_vodozemac_s_counter() -> None:
    assert key_number("AAAAAAAAAAA") == 0
    assert key_number("AAAAAAAAAA0") == 13  # the ID a colliding new account meets first
    account = vodozemac.Account()
    assert issued_through(account) == -1
    account.generate_one_time_keys(50)
    assert issued_through(account) == 49
    assert max(key_number(k) for k in account.one_time_keys) == 49
    assert len(account.one_time_keys) == 50  # the probe issued nothing in the account itself


async def upload_and_marker(
    machine: OlmMachine, count: int = 50
) -> tuple[KeysUploadRequest, AccountDataRequest]:
    (upload,) = await machine.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    await machine.mark_request_as_sent(upload.request_id, ok(count))
    (marker,) = await machine.outgoing_requests()
    assert isinstance(marker, AccountDataRequest)
    return upload, marker


async def test_a_marker_follows_each_confirmed_upload_and_only_then() -> None:
    clock = Clock()
    machine = await machine_on(MemoryDatabase(), clock)
    await pass_device_check(machine)
    (upload,) = await machine.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    await machine.mark_request_as_failed(upload.request_id, server_error())
    clock.now += 60
    (retry,) = await machine.outgoing_requests()  # a failed upload makes no marker
    assert retry == upload
    await machine.mark_request_as_sent(retry.request_id, ok(50))

    (marker,) = await machine.outgoing_requests()
    assert isinstance(marker, AccountDataRequest)
    assert (marker.user_id, marker.event_type) == (USER, marker_type(DEVICE))
    written = read_marker(marker.content)
    assert written is not None
    assert written.ed25519 == machine.identity_keys["ed25519"]
    assert written.published_through == max(
        key_number(k.split(":")[1]) for k in upload.one_time_keys
    )
    await machine.mark_request_as_sent(marker.request_id, {})
    assert await machine.outgoing_requests() == []


async def test_a_failed_marker_goes_out_again_after_a_backoff_unless_a_newer_one_waits() -> None:
    clock = Clock()
    machine = await machine_on(MemoryDatabase(), clock)
    await pass_device_check(machine)
    _upload, marker = await upload_and_marker(machine)
    await machine.mark_request_as_failed(marker.request_id, server_error())
    assert await machine.outgoing_requests() == []  # never again in the same round
    clock.now += 2.1
    assert await machine.outgoing_requests() == [marker]

    await machine.mark_request_as_failed(marker.request_id, server_error())
    clock.now += 10
    await machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": 10})
    again_marker, second = await machine.outgoing_requests()  # the queued marker, a refill
    assert again_marker == marker
    assert isinstance(second, KeysUploadRequest)
    await machine.mark_request_as_sent(second.request_id, ok(50))
    await machine.mark_request_as_failed(marker.request_id, server_error())  # old one fails
    clock.now += 60
    (newer,) = await machine.outgoing_requests()
    assert isinstance(newer, AccountDataRequest)
    await machine.mark_request_as_failed(newer.request_id, server_error())
    clock.now += 60
    (again,) = await machine.outgoing_requests()
    assert again == newer  # the older marker never overwrites the newer one
    newest = read_marker(newer.content)
    assert newest is not None
    assert newest.published_through == 89  # the claim's key and 49, then 40 more


async def test_a_marker_the_server_refuses_is_not_sent_again() -> None:
    clock = Clock()
    machine = await machine_on(MemoryDatabase(), clock)
    await pass_device_check(machine)
    _upload, marker = await upload_and_marker(machine)
    forbidden = MatrixHttpError("PUT", "/account_data", 403, "M_FORBIDDEN", "no")
    await machine.mark_request_as_failed(marker.request_id, forbidden)
    for _ in range(3):
        clock.now += 3600
        assert await machine.outgoing_requests() == []


async def test_a_rolled_back_store_is_found_from_the_marker_and_drained() -> None:
    clock = Clock()
    db = MemoryDatabase()
    machine = await machine_on(db, clock)
    await pass_device_check(machine)
    await upload_and_marker(machine)
    backup = copy.deepcopy(db.account)
    await machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": 5})
    _second, marker = await upload_and_marker(machine, 50)
    await machine.store.close()

    db.account = backup  # the rollback: 45 published keys are gone from the store
    restored = await machine_on(db, clock)
    assert await restored.check_key_state(marker.content) == 45
    await drain(restored)  # a drain, before any upload
    (report,) = restored.take_reports()
    assert report.conflicting_key_id == ""
    (upload,) = await restored.outgoing_requests()  # every key was claimed: a full set
    assert isinstance(upload, KeysUploadRequest)
    assert len(upload.one_time_keys) == 50


async def test_no_drain_without_a_rollback() -> None:
    clock = Clock()
    machine = await machine_on(MemoryDatabase(), clock)
    assert await machine.check_key_state(None) == 0  # a new device: nothing to compare
    await pass_device_check(machine)
    _upload, marker = await upload_and_marker(machine)
    await machine.mark_request_as_sent(marker.request_id, {})
    assert await machine.check_key_state(marker.content) == 0
    assert await machine.check_key_state(None) == 0
    other = marker_content(foreign_key()["key"], 10_000)  # another identity's: not ours
    assert await machine.check_key_state(other) == 0
    assert await machine.check_key_state({"published_through": "many"}) == 0
    assert await machine.outgoing_requests() == []


async def drain(machine: OlmMachine) -> None:
    """Answer a drain: the server hands out our fallback key, so nothing else is left."""
    (claim,) = await machine.outgoing_requests()
    assert isinstance(claim, KeysClaimRequest)
    assert claim.one_time_keys == {USER: {DEVICE: "signed_curve25519"}}  # our own keys
    stored = await machine.store.load_account()
    assert stored is not None
    fallback = own.sign_json(
        stored.account, USER, DEVICE, {"key": foreign_key()["key"], "fallback": True}
    )
    await machine.mark_request_as_sent(
        claim.request_id, claim_answer("signed_curve25519:F", fallback)
    )


async def test_a_drained_rollback_is_not_found_again_when_the_new_marker_was_lost() -> None:
    """Rolled back by more than one upload: the refill's marker is lower than the stale
    one. If it never reaches the server, the stale marker must not start a second drain."""
    clock = Clock()
    db = MemoryDatabase()
    machine = await machine_on(db, clock)
    await pass_device_check(machine)
    await machine.receive_sync_changes(unused_fallback_key_types=[])
    await upload_and_marker(machine)  # keys #0-49
    backup = copy.deepcopy(db.account)
    marker = None
    for _ in range(4):  # 4 refills of 45: up to #229
        await machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": 5})
        _upload, marker = await upload_and_marker(machine)
        await machine.mark_request_as_sent(marker.request_id, {})
    assert marker is not None
    await machine.store.close()

    db.account = backup
    restored = await machine_on(db, clock)
    assert await restored.check_key_state(marker.content) == 180
    await drain(restored)
    (upload,) = await restored.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    assert upload.fallback_keys  # the fallback key may be stale too: a new one goes up
    await restored.mark_request_as_sent(upload.request_id, ok(50))
    (lower,) = await restored.outgoing_requests()
    assert isinstance(lower, AccountDataRequest)
    await restored.store.close()  # the new marker never reaches the server

    again = await machine_on(db, clock)
    assert await again.check_key_state(marker.content) == 0  # the drain answered it
    assert await again.outgoing_requests() == []
    assert await again.check_key_state(lower.content) == 0
