"""The upload guard through the machine alone: device checks, drains, conflicts, no storms."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import vodozemac

from olmstead import (
    DeviceIdentityConflict,
    DeviceIdInUse,
    DeviceUnusable,
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    MatrixHttpError,
    MemoryDatabase,
    MemoryStore,
    OlmMachine,
    OneTimeKeyConflict,
    RateLimited,
    UploadPolicy,
)
from olmstead.olm import account as own
from tests.conftest import FAST_LEASE, KEY
from tests.machine.test_keys_upload import DEVICE, USER, Clock, ok, outgoing, pass_device_check


async def machine_on(db: MemoryDatabase, clock: Clock, **policy: Any) -> OlmMachine:
    store = await MemoryStore.open(KEY, db, lease=FAST_LEASE)
    return await OlmMachine.open(
        store, USER, DEVICE, clock=clock, upload_policy=UploadPolicy(**policy)
    )


def duplicate_error(key_id: str, old_key: dict[str, Any]) -> OneTimeKeyConflict:
    """The 400 Synapse answers with, as the HTTP layer types it."""
    message = f"One time key {key_id} already exists. Old key: {json.dumps(old_key)}; new key: …"
    return OneTimeKeyConflict("POST", "/keys/upload", 400, "M_UNKNOWN", message, key_id, old_key)


def claim_answer(key_id: str | None, key: dict[str, Any] | None) -> dict[str, Any]:
    device = {} if key_id is None or key is None else {key_id: key}
    return {"one_time_keys": {USER: {DEVICE: device}} if device else {}}


def foreign_key() -> dict[str, Any]:
    other = vodozemac.Account()
    return own.sign_json(other, USER, DEVICE, {"key": other.curve25519_key.to_base64()})


async def test_device_ids_with_foreign_keys_are_refused_before_any_upload() -> None:
    machine = await machine_on(MemoryDatabase(), Clock())
    (query,) = await outgoing(machine)
    assert isinstance(query, KeysQueryRequest)
    foreign = vodozemac.Account().ed25519_key.to_base64()
    answer = {"device_keys": {USER: {DEVICE: {"keys": {f"ed25519:{DEVICE}": foreign}}}}}
    with pytest.raises(DeviceIdInUse) as caught:
        await machine.mark_request_as_sent(query.request_id, answer)
    assert caught.value.server_ed25519 == foreign
    assert "Log in without a device ID" in str(caught.value)
    assert machine.key_problem is caught.value
    for _ in range(5):
        assert await outgoing(machine) == []


async def test_a_refused_device_id_encrypts_nothing() -> None:
    machine = await machine_on(MemoryDatabase(), Clock())
    (query,) = await outgoing(machine)
    foreign = vodozemac.Account().ed25519_key.to_base64()
    answer = {"device_keys": {USER: {DEVICE: {"keys": {f"ed25519:{DEVICE}": foreign}}}}}
    with pytest.raises(DeviceIdInUse):
        await machine.mark_request_as_sent(query.request_id, answer)
    with pytest.raises(DeviceUnusable) as caught:
        await machine.share_room_key("!room:x", [USER])
    assert isinstance(caught.value.cause, DeviceIdInUse)
    assert "Log in as a new device" in str(caught.value)
    with pytest.raises(DeviceUnusable):
        await machine.encrypt_room_event("!room:x", "m.room.message", {"body": "hi"})
    with pytest.raises(DeviceUnusable):
        await machine.encrypt_to_devices([], "m.dummy", {})
    assert await machine.store.get_outbound_group_session("!room:x") is None


async def test_replacing_a_device_takes_an_explicit_opt_in() -> None:
    machine = await machine_on(MemoryDatabase(), Clock(), replace_existing_device=True)
    (query,) = await outgoing(machine)
    foreign = vodozemac.Account().ed25519_key.to_base64()
    answer = {"device_keys": {USER: {DEVICE: {"keys": {f"ed25519:{DEVICE}": foreign}}}}}
    await machine.mark_request_as_sent(query.request_id, answer)
    (upload,) = await outgoing(machine)
    assert isinstance(upload, KeysUploadRequest)
    assert upload.device_keys is not None


async def test_our_own_keys_on_the_server_are_not_a_conflict() -> None:
    machine = await machine_on(MemoryDatabase(), Clock())
    (query,) = await outgoing(machine)
    answer = {"device_keys": {USER: {DEVICE: machine.device_keys()}}}
    await machine.mark_request_as_sent(query.request_id, answer)
    (upload,) = await outgoing(machine)
    assert isinstance(upload, KeysUploadRequest)


async def rolled_back_machine(clock: Clock) -> tuple[OlmMachine, KeysUploadRequest, dict[str, Any]]:
    """A device whose store went back to before its second upload; and that upload."""
    db = MemoryDatabase()
    machine = await machine_on(db, clock)
    await pass_device_check(machine)
    (first,) = await outgoing(machine)
    await machine.mark_request_as_sent(first.request_id, ok(50))
    backup = copy.deepcopy(db.account)

    await machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": 20})
    (second,) = await outgoing(machine)
    assert isinstance(second, KeysUploadRequest)
    await machine.mark_request_as_sent(second.request_id, ok(50))
    await machine.store.close()

    db.account = backup  # the rollback
    restored = await machine_on(db, clock)
    await restored.receive_sync_changes(one_time_key_counts={"signed_curve25519": 20})
    (third,) = await outgoing(restored)
    assert isinstance(third, KeysUploadRequest)
    assert set(third.one_time_keys) == set(second.one_time_keys)  # the same IDs ...
    assert third.one_time_keys != second.one_time_keys  # ... with other keys
    return restored, third, second.one_time_keys


async def test_rolled_back_store_drains_its_stale_keys_then_uploads() -> None:
    clock = Clock()
    machine, upload, stale = await rolled_back_machine(clock)
    key_id = min(stale)
    await machine.mark_request_as_failed(upload.request_id, duplicate_error(key_id, stale[key_id]))

    drained = 0
    for stale_id, stale_key in stale.items():
        (claim,) = await outgoing(machine)
        assert isinstance(claim, KeysClaimRequest)
        assert claim.one_time_keys == {USER: {DEVICE: "signed_curve25519"}}
        await machine.mark_request_as_sent(claim.request_id, claim_answer(stale_id, stale_key))
        drained += 1
    (claim,) = await outgoing(machine)
    stored = await machine.store.load_account()
    assert stored is not None
    fallback = own.sign_json(  # our fallback key: nothing else is left, the drain ends
        stored.account, USER, DEVICE, {"key": foreign_key()["key"], "fallback": True}
    )
    await machine.mark_request_as_sent(
        claim.request_id, claim_answer("signed_curve25519:F", fallback)
    )

    (report,) = machine.take_reports()
    assert (report.drained, report.conflicting_key_id) == (drained, key_id)
    assert machine.take_reports() == []
    (retry,) = await outgoing(machine)
    assert retry == upload  # the very same keys, now free to go
    await machine.mark_request_as_sent(retry.request_id, ok(len(upload.one_time_keys)))
    assert machine.key_problem is None


async def test_stale_keys_of_another_identity_stop_uploads() -> None:
    clock = Clock()
    machine, upload, _stale = await rolled_back_machine(clock)
    error = duplicate_error("signed_curve25519:AAAAAAAAADI", foreign_key())
    with pytest.raises(DeviceIdentityConflict) as caught:
        await machine.mark_request_as_failed(upload.request_id, error)
    assert machine.key_problem is caught.value
    clock.now += 3600
    assert await outgoing(machine) == []
    with pytest.raises(DeviceUnusable) as refused:
        await machine.share_room_key("!room:x", [USER])
    assert refused.value.cause is caught.value


@pytest.mark.parametrize("whose", ["ours", "theirs"])
async def test_unparseable_duplicate_error_is_settled_by_a_claim(whose: str) -> None:
    clock = Clock()
    machine, upload, stale = await rolled_back_machine(clock)
    error = OneTimeKeyConflict(
        "POST", "/keys/upload", 400, "M_UNKNOWN", "key already exists", None, None
    )
    await machine.mark_request_as_failed(upload.request_id, error)
    (claim,) = await outgoing(machine)
    assert isinstance(claim, KeysClaimRequest)
    key_id, key = next(iter(stale.items()))
    if whose == "theirs":
        with pytest.raises(DeviceIdentityConflict):
            await machine.mark_request_as_sent(
                claim.request_id, claim_answer(key_id, foreign_key())
            )
        assert await outgoing(machine) == []
    else:
        await machine.mark_request_as_sent(claim.request_id, claim_answer(key_id, key))
        (next_claim,) = await outgoing(machine)  # draining goes on
        assert isinstance(next_claim, KeysClaimRequest)
        await machine.mark_request_as_sent(next_claim.request_id, claim_answer(None, None))
        assert [r.drained for r in machine.take_reports()] == [1]
        assert await outgoing(machine) == [upload]


async def test_failing_uploads_never_storm() -> None:
    clock = Clock()
    machine = await machine_on(MemoryDatabase(), clock)
    await pass_device_check(machine)
    sent: list[float] = []
    start = clock.now
    while clock.now - start < 600:  # ten minutes, asking ten times a second
        for request in await outgoing(machine):
            assert isinstance(request, KeysUploadRequest)
            sent.append(clock.now - start)
            error = MatrixHttpError("POST", "/keys/upload", 500, None, "boom")
            await machine.mark_request_as_failed(request.request_id, error)
        clock.now += 0.1
    assert len([t for t in sent if t < 60]) <= 3
    for t in sent:  # no five-minute window holds more than three
        assert len([u for u in sent if t <= u < t + 300]) <= 3
    assert len(sent) >= 4  # it does keep trying, slowly


async def test_retry_after_is_honoured() -> None:
    clock = Clock()
    machine = await machine_on(MemoryDatabase(), clock)
    await pass_device_check(machine)
    (upload,) = await outgoing(machine)
    limited = RateLimited("POST", "/keys/upload", 429, "M_LIMIT_EXCEEDED", "slow", retry_after=30)
    await machine.mark_request_as_failed(upload.request_id, limited)
    clock.now += 29.9
    assert await outgoing(machine) == []
    clock.now += 0.2
    assert await outgoing(machine) == [upload]


async def test_a_device_check_in_flight_is_not_handed_out_twice() -> None:
    clock = Clock()
    machine = await machine_on(MemoryDatabase(), clock)
    (query,) = await outgoing(machine)
    assert isinstance(query, KeysQueryRequest)
    assert await outgoing(machine) == []  # a second copy would be answered twice
    clock.now += UploadPolicy().in_flight_timeout  # nobody reported on it: asked again
    (again,) = await outgoing(machine)
    assert isinstance(again, KeysQueryRequest)
    assert again.request_id != query.request_id


async def test_another_identity_s_fallback_key_is_a_conflict_too() -> None:
    clock = Clock()
    machine, upload, stale = await rolled_back_machine(clock)
    key_id = min(stale)
    await machine.mark_request_as_failed(upload.request_id, duplicate_error(key_id, stale[key_id]))
    (claim,) = await outgoing(machine)
    foreign_fallback = {**foreign_key(), "fallback": True}
    with pytest.raises(DeviceIdentityConflict):
        await machine.mark_request_as_sent(
            claim.request_id, claim_answer("signed_curve25519:F", foreign_fallback)
        )
    assert await outgoing(machine) == []
