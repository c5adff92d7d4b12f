"""Device tracking through the machine alone: who is queried, which keys are accepted."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import vodozemac

from olmstead import KeysQueryRequest, MatrixHttpError, OlmMachine
from olmstead.olm import account as own
from tests.conftest import Backend
from tests.machine.test_keys_upload import DEVICE, USER, Clock, ok, pass_device_check

ALICE, BOB = "@alice:example.org", "@bob:example.org"


def keys_of(
    user_id: str, device_id: str, account: vodozemac.Account | None = None
) -> dict[str, Any]:
    return own.device_keys(account or vodozemac.Account(), user_id, device_id)


async def ready_machine(backend: Backend, clock: Clock | None = None) -> OlmMachine:
    """A machine whose own keys are uploaded, so only device queries remain."""
    machine = await OlmMachine.open(await backend.open(), USER, DEVICE, clock=clock or Clock())
    await pass_device_check(machine)
    (upload,) = await machine.outgoing_requests()
    await machine.mark_request_as_sent(upload.request_id, ok(50))
    return machine


async def only_query(machine: OlmMachine) -> KeysQueryRequest:
    requests = await machine.outgoing_requests()
    queries = [r for r in requests if isinstance(r, KeysQueryRequest)]
    assert len(queries) == 1, requests
    return queries[0]


async def answer(machine: OlmMachine, query: KeysQueryRequest, listed: dict[str, Any]) -> None:
    await machine.mark_request_as_sent(query.request_id, {"device_keys": listed, "failures": {}})


async def test_tracked_users_are_queried_and_their_devices_kept(backend: Backend) -> None:
    machine = await ready_machine(backend)
    await machine.update_tracked_users([ALICE, BOB])
    query = await only_query(machine)
    assert query.device_keys == {ALICE: [], BOB: []}
    assert await machine.outgoing_requests() == []  # one query in flight at a time

    phone = keys_of(ALICE, "PHONE")
    await answer(machine, query, {ALICE: {"PHONE": phone}, BOB: {}})
    devices = await machine.get_user_devices(ALICE)
    assert list(devices) == ["PHONE"]
    assert devices["PHONE"].ed25519 == phone["keys"]["ed25519:PHONE"]
    assert await machine.get_user_devices(BOB) == {}
    assert await machine.outgoing_requests() == []  # nobody is outdated any more

    # it all survives a restart
    await machine.store.close()
    reopened = await OlmMachine.open(await backend.open(), USER, DEVICE)
    assert reopened.devices.tracked == {ALICE, BOB}
    assert reopened.devices.outdated == frozenset()
    assert list(await reopened.get_user_devices(ALICE)) == ["PHONE"]


async def test_device_list_changes_and_leaves(backend: Backend) -> None:
    machine = await ready_machine(backend)
    await machine.update_tracked_users([ALICE, BOB])
    await answer(machine, await only_query(machine), {ALICE: {}, BOB: {}})

    lists = {"changed": [ALICE, "@stranger:example.org"], "left": [BOB]}
    await machine.receive_sync_changes(device_lists=lists)
    query = await only_query(machine)
    assert query.device_keys == {ALICE: []}  # strangers are not tracked
    assert machine.devices.tracked == {ALICE}
    await machine.store.close()
    assert await (await backend.open()).get_tracked_users() == {ALICE: True}


@pytest.mark.parametrize(
    "forge",
    [
        "other_user_inside",
        "other_device_inside",
        "tampered",
        "no_curve25519",
        "nested_too_deep",
        "not_an_object",
    ],
)
async def test_devices_that_fail_their_checks_are_refused(backend: Backend, forge: str) -> None:
    machine = await ready_machine(backend)
    await machine.update_tracked_users([ALICE])
    query = await only_query(machine)
    keys: Any = keys_of(ALICE, "PHONE")
    if forge == "other_user_inside":
        keys = keys_of(BOB, "PHONE")
    elif forge == "other_device_inside":
        keys = keys_of(ALICE, "LAPTOP")
    elif forge == "tampered":
        keys["keys"]["curve25519:PHONE"] = vodozemac.Account().curve25519_key.to_base64()
    elif forge == "no_curve25519":
        del keys["keys"]["curve25519:PHONE"]
    elif forge == "nested_too_deep":  # unsigned: the signature still verifies
        deep: dict[str, Any] = {}
        for _ in range(5000):
            deep = {"a": deep}
        keys["unsigned"] = {"device_display_name": "phone", "x": deep}
    else:
        keys = "keys"
    good = keys_of(ALICE, "GOOD")
    await answer(machine, query, {ALICE: {"PHONE": keys, "GOOD": good}})
    assert list(await machine.get_user_devices(ALICE)) == ["GOOD"]


async def test_a_changed_ed25519_key_is_refused_and_the_old_keys_kept(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    machine = await ready_machine(backend)
    await machine.update_tracked_users([ALICE])
    original = keys_of(ALICE, "PHONE")
    await answer(machine, await only_query(machine), {ALICE: {"PHONE": original}})

    await machine.receive_sync_changes(device_lists={"changed": [ALICE], "left": []})
    impostor = keys_of(ALICE, "PHONE")  # correctly self-signed, by another key
    await answer(machine, await only_query(machine), {ALICE: {"PHONE": impostor}})
    kept = (await machine.get_user_devices(ALICE))["PHONE"]
    assert kept.ed25519 == original["keys"]["ed25519:PHONE"]
    assert "Ed25519 key changed" in caplog.text


async def test_a_device_no_longer_listed_is_flagged_deleted(backend: Backend) -> None:
    machine = await ready_machine(backend)
    await machine.update_tracked_users([ALICE])
    phone, laptop = keys_of(ALICE, "PHONE"), keys_of(ALICE, "LAPTOP")
    await answer(machine, await only_query(machine), {ALICE: {"PHONE": phone, "LAPTOP": laptop}})
    await machine.receive_sync_changes(device_lists={"changed": [ALICE]})
    await answer(machine, await only_query(machine), {ALICE: {"LAPTOP": laptop}})
    assert list(await machine.get_user_devices(ALICE)) == ["LAPTOP"]
    stored = await machine.store.get_devices(ALICE)
    assert stored["PHONE"].deleted  # kept: old messages from it still verify


async def test_a_change_during_the_query_keeps_the_user_outdated(backend: Backend) -> None:
    machine = await ready_machine(backend)
    await machine.update_tracked_users([ALICE])
    query = await only_query(machine)
    await machine.receive_sync_changes(device_lists={"changed": [ALICE]})  # while in flight
    await answer(machine, query, {ALICE: {}})
    assert (await only_query(machine)).device_keys == {ALICE: []}


async def test_a_failed_query_is_retried_after_a_backoff(backend: Backend) -> None:
    clock = Clock()
    machine = await ready_machine(backend, clock)
    await machine.update_tracked_users([ALICE])
    query = await only_query(machine)
    error = MatrixHttpError("POST", "/keys/query", 502, None, "bad gateway")
    await machine.mark_request_as_failed(query.request_id, error)
    assert await machine.outgoing_requests() == []  # no spin on a failing server
    clock.now += 2.0
    assert (await only_query(machine)).device_keys == {ALICE: []}


async def test_our_own_device_is_not_stored_as_another(backend: Backend) -> None:
    machine = await ready_machine(backend)
    await machine.update_tracked_users([USER])
    query = await only_query(machine)
    mine = copy.deepcopy(machine.device_keys())
    sibling = keys_of(USER, "SIBLING")
    await answer(machine, query, {USER: {DEVICE: mine, "SIBLING": sibling}})
    assert list(await machine.get_user_devices(USER)) == ["SIBLING"]


async def test_a_failed_commit_leaves_the_user_to_be_queried_again(backend: Backend) -> None:
    machine = await ready_machine(backend)
    await machine.update_tracked_users([ALICE])
    query = await only_query(machine)
    store, original = machine.store, machine.store.save_changes

    async def failing(changes: Any, *, generation: int | None = None) -> None:
        raise OSError("disk full")

    store.save_changes = failing  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        await answer(machine, query, {ALICE: {"PHONE": keys_of(ALICE, "PHONE")}})
    store.save_changes = original  # type: ignore[method-assign]
    assert await machine.get_user_devices(ALICE) == {}
    assert (await only_query(machine)).device_keys == {ALICE: []}  # still outdated: asked again
