"""The client against the real Synapse: sessions, the stored sync token, start and stop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from olmstead import MatrixHttpError
from tests.integration.harness import Wire, close_client, open_client, session_of

SYNC_PATH = "/_matrix/client/v3/sync"


async def test_login_gets_a_new_device_and_logout_ends_the_session(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    user = new_user()
    client = await open_client(homeserver.base_url, tmp_path / "a.db")
    session = await client.login(user["localpart"], user["password"])
    assert session.user_id == user["user_id"]
    assert session.device_id != user["device_id"]  # the server assigned another device
    whoami = await client.http.request("GET", "/_matrix/client/v3/account/whoami")
    assert (whoami["user_id"], whoami["device_id"]) == (session.user_id, session.device_id)

    await client.logout()
    client.http.access_token = session.access_token
    with pytest.raises(MatrixHttpError) as caught:
        await client.http.request("GET", "/_matrix/client/v3/account/whoami")
    assert (caught.value.status, caught.value.errcode) == (401, "M_UNKNOWN_TOKEN")
    await close_client(client)


async def test_the_sync_token_survives_a_restart(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    client = await open_client(url, tmp_path / "device.db", session_of(url, user))
    await client.init_crypto()
    answer = await client.sync_once()
    assert client.store is not None
    assert await client.store.get_value("sync_token") == answer["next_batch"]
    await close_client(client)

    wire = Wire()
    restarted = await open_client(url, tmp_path / "device.db", session_of(url, user), wire)
    await restarted.init_crypto()
    await restarted.sync_once()
    syncs = [params for _m, path, params in wire.requests if path == SYNC_PATH]
    assert syncs[0]["since"] == answer["next_batch"]
    await close_client(restarted)


async def test_start_syncs_until_stopped_even_mid_long_poll(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    wire = Wire()
    client = await open_client(url, tmp_path / "device.db", session_of(url, user), wire)
    await client.init_crypto()
    running = asyncio.create_task(client.start(initial_sync_limit=20, timeout_ms=30_000))
    deadline = time.monotonic() + 20
    while len([p for _m, p, _q in wire.requests if p == SYNC_PATH]) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # the second sync is now waiting in its 30 s long-poll
    stopped_at = time.monotonic()
    client.stop()
    await asyncio.wait_for(running, 10)
    assert time.monotonic() - stopped_at < 5
    first, second = [q for _m, p, q in wire.requests if p == SYNC_PATH][:2]
    assert '"limit": 20' in first["filter"]
    assert first["timeout"] == "0"
    assert second["timeout"] == "30000"
    assert (first.get("full_state"), second.get("full_state")) == ("true", None)
    assert client.machine is not None
    assert client.machine.server_key_count == 50
    await close_client(client)
