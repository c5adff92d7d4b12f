"""The seed's first failure against a real Synapse: every way a device's keys drift.

Each test counts ``POST /keys/upload`` at the HTTP layer (``Wire``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from olmstead import (
    Client,
    DeviceIdInUse,
    DeviceUnusable,
    KeyStateError,
    OneTimeKeysDrained,
)
from olmstead.http.endpoints import account_data_path
from olmstead.key_state import marker_type
from tests.integration.harness import (
    Wire,
    claim_one,
    close_client,
    drop,
    open_client,
    opens_session,
    rate_limited,
    server_device_keys,
    server_error,
    session_of,
)


async def crypto_client(url: str, path: Path, registered: dict[str, Any], wire: Wire) -> Client:
    client = await open_client(url, path, session_of(url, registered), wire)
    await client.init_crypto()
    return client


async def sync_for(client: Client, seconds: float) -> int:
    """Sync with a short long-poll for ``seconds``; the number of syncs made."""
    syncs, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        await client.sync_once(timeout_ms=100)
        syncs += 1
    return syncs


async def test_lost_store_on_the_same_device_uploads_nothing(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    first = await crypto_client(url, tmp_path / "first.db", user, Wire())
    await first.sync_once()
    await close_client(first)
    before = await server_device_keys(url, user["access_token"], user["user_id"], user["device_id"])
    assert before is not None

    wire = Wire()  # the store is gone: same token and device, a new empty store
    lost = await open_client(url, tmp_path / "lost.db", session_of(url, user), wire)
    with pytest.raises(DeviceIdInUse) as caught:
        await lost.init_crypto()
    assert "Log in without a device ID" in str(caught.value)
    syncs = await sync_for(lost, 60)  # an application that carries on regardless
    assert syncs > 20
    assert wire.uploads == []  # not one upload, in a minute of syncing
    assert isinstance(lost.machine and lost.machine.key_problem, KeyStateError)
    await close_client(lost)

    after = await server_device_keys(url, user["access_token"], user["user_id"], user["device_id"])
    assert after == before


async def test_two_clients_on_one_token_second_refuses_first_works(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user, other = homeserver.base_url, new_user(), new_user()
    first_wire = Wire()
    first = await crypto_client(url, tmp_path / "first.db", user, first_wire)
    await first.sync_once()
    keys = await server_device_keys(url, user["access_token"], user["user_id"], user["device_id"])

    second_wire = Wire()
    second = await open_client(url, tmp_path / "second.db", session_of(url, user), second_wire)
    with pytest.raises(DeviceIdInUse):
        await second.init_crypto()
    assert second_wire.uploads == []

    # the first keeps working: its keys are claimed, it refills them
    for _ in range(30):
        assert await claim_one(url, other["access_token"], user["user_id"], user["device_id"])
    uploads_before = len(first_wire.uploads)
    await first.sync_once()
    assert len(first_wire.uploads) == uploads_before + 1
    assert first_wire.uploads[-1][2] == 200
    assert first.machine is not None
    assert first.machine.key_problem is None
    assert first.machine.server_key_count == 50
    assert (
        await server_device_keys(url, user["access_token"], user["user_id"], user["device_id"])
        == keys
    )
    await close_client(second)
    await close_client(first)


async def test_login_with_a_device_id_that_has_keys_is_refused(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    owner = await open_client(url, tmp_path / "owner.db")
    await owner.login(user["localpart"], user["password"], device_id="REUSEDDEV")
    await owner.init_crypto()
    old = await server_device_keys(url, user["access_token"], user["user_id"], "REUSEDDEV")
    assert old is not None
    await close_client(owner)

    wire = Wire()
    newcomer = await open_client(url, tmp_path / "newcomer.db", wire=wire)
    session = await newcomer.login(user["localpart"], user["password"], device_id="REUSEDDEV")
    assert session.device_id == "REUSEDDEV"
    with pytest.raises(DeviceIdInUse) as caught:
        await newcomer.init_crypto()
    assert caught.value.device_id == "REUSEDDEV"
    # a refused device sends nothing encrypted as that device, and says why
    room_id = await newcomer.create_room(encrypted=True)
    with pytest.raises(DeviceUnusable) as refused:
        await newcomer.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "x"})
    assert refused.value.cause is caught.value
    assert "Log in as a new device" in str(refused.value)
    assert wire.uploads == []
    assert await server_device_keys(url, user["access_token"], user["user_id"], "REUSEDDEV") == old
    await close_client(newcomer)


@pytest.mark.parametrize("marker", [True, False], ids=["found-at-start", "found-by-collision"])
async def test_rolled_back_store_heals_itself(
    homeserver: Any, new_user: Any, tmp_path: Path, marker: bool
) -> None:
    """With the key-state marker, the rollback is found at start and drained before any
    upload; without it (a store from before markers), the first colliding upload finds it."""
    url, user, peer = homeserver.base_url, new_user(), new_user()
    uid, dev, peer_token = user["user_id"], user["device_id"], peer["access_token"]
    path, backup = tmp_path / "device.db", tmp_path / "backup.db"

    client = await crypto_client(url, path, user, Wire())
    await client.sync_once()  # learns the counts, uploads a fallback key
    await close_client(client)
    shutil.copy(path, backup)

    client = await open_client(url, path, session_of(url, user))
    await client.init_crypto()
    for _ in range(30):  # 30 claims: 20 left, so 30 new keys go up
        await claim_one(url, peer_token, uid, dev)
    await client.sync_once()
    await close_client(client)

    shutil.copy(backup, path)  # the rollback: the store forgets those 30 keys
    if not marker:  # as if no marker had ever been written
        async with httpx.AsyncClient(base_url=url) as http:
            answer = await http.put(
                account_data_path(uid, marker_type(dev)),
                json={},
                headers={"Authorization": f"Bearer {user['access_token']}"},
            )
            answer.raise_for_status()
    wire = Wire()
    drains: list[OneTimeKeysDrained] = []
    client = await open_client(url, path, session_of(url, user), wire)
    client.on_keys_drained(drains.append)
    await client.init_crypto()
    for _ in range(26):  # 24 left, some of them the forgotten ones: a refill collides
        await claim_one(url, peer_token, uid, dev)
    await client.sync_once()

    statuses = [status for _t, _b, status in wire.uploads]
    (drained,) = drains
    assert drained.drained >= 1
    if marker:
        assert 400 not in statuses, statuses  # drained before anything could collide
        assert drained.conflicting_key_id == ""
    else:
        # the same keys again once drained, then a new fallback key (it may be stale too)
        assert statuses == [400, 200, 200], statuses
        assert list(wire.uploads[2][1]) == ["fallback_keys"]
        assert drained.conflicting_key_id.startswith("signed_curve25519:")
    uploaded = {
        key["key"]
        for _t, body, _s in wire.uploads
        for key in body.get("one_time_keys", {}).values()
    }

    # every key the server now hands out for the device is one this account can use
    assert client.store is not None
    account = (await client.store.load_account()).account  # type: ignore[union-attr]
    claimed: list[Any] = []
    while (got := await claim_one(url, peer_token, uid, dev)) is not None:
        claimed.append(got)
        if got[1].get("fallback"):
            break
    one_time = [key for _id, key in claimed if not key.get("fallback")]
    # after the drain only keys uploaded since sit there: a full set (the refill after a
    # start-up drain), or exactly the retried keys (after a collision)
    assert len(one_time) == (50 if marker else len(uploaded))
    for key in one_time:
        assert key["key"] in uploaded
        assert opens_session(account, key["key"])
    assert claimed[-1][1].get("fallback") is True
    assert opens_session(account, claimed[-1][1]["key"])
    await close_client(client)


@pytest.mark.parametrize(
    ("where", "fault"),
    [
        ("before", server_error),
        ("before", drop),
        ("after", drop),  # the server stored the keys; the answer was lost
        ("before", rate_limited(3)),
    ],
    ids=["500", "dropped-before", "dropped-after", "429"],
)
async def test_server_faults_during_upload(
    homeserver: Any, new_user: Any, tmp_path: Path, where: str, fault: Any
) -> None:
    url, user = homeserver.base_url, new_user()
    wire = Wire()
    (wire.faults_before if where == "before" else wire.faults_after).append(fault)
    client = await open_client(url, tmp_path / "device.db", session_of(url, user), wire)
    await client.init_crypto()
    assert client.machine is not None
    deadline = time.monotonic() + 30
    while not client.machine.device_keys_shared and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        await client.process_outgoing()
    assert client.machine.device_keys_shared

    (t1, first_body, first_status), (t2, second_body, second_status), full = wire.uploads[:3]
    assert "device_keys" not in first_body  # the faulted one: the claim of the device ID
    assert second_status == 200
    assert second_body == first_body  # the keys were never lost nor replaced
    if isinstance(first_status, int) and first_status == 429:
        assert t2 - t1 >= 3.0  # Retry-After honoured
    assert full[2] == 200
    assert "device_keys" in full[1]
    # no duplicate conflict later: the fallback key and the next refill are accepted
    await client.sync_once()
    for _ in range(30):
        await claim_one(url, user["access_token"], user["user_id"], user["device_id"])
    await client.sync_once()
    later = wire.uploads[3:]
    assert [status for _t, _b, status in later] == [200, 200]
    assert "fallback_keys" in later[0][1]
    assert len(later[1][1]["one_time_keys"]) == 30
    await close_client(client)


@pytest.mark.parametrize("when", ["before", "after"])
async def test_crash_around_the_upload_resends_the_same_keys(
    homeserver: Any, new_user: Any, tmp_path: Path, when: str
) -> None:
    url, user = homeserver.base_url, new_user()
    session = session_of(url, user)
    store, sent = tmp_path / "device.db", tmp_path / "sent.json"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.crash_client",
            json.dumps(session.__dict__),
            str(store),
            str(sent),
            when,
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'src'}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    crashed_body = json.loads(sent.read_text())
    on_server = await server_device_keys(
        url, user["access_token"], user["user_id"], user["device_id"]
    )
    assert (on_server is not None) == (when == "after")

    wire = Wire()
    client = await open_client(url, store, session, wire)
    await client.init_crypto()  # a restart: must not call our own keys a conflict
    ((_t, body, status),) = wire.uploads
    assert status == 200
    assert body == crashed_body  # the very same device keys, key IDs and keys
    assert client.machine is not None
    assert client.machine.server_key_count == 50
    assert client.machine.key_problem is None
    await close_client(client)
