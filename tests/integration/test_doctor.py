"""``olmstead doctor`` on setups broken the ways the seed describes: it names that cause."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from olmstead import DeviceIdInUse, LeaseSettings, PickleKey, SqliteStore
from olmstead.cli.main import main
from tests.conftest import pause
from tests.integration.harness import KEY, close_client, open_client, session_of

RAW_KEY_ENV = {"OLMSTEAD_PICKLE_KEY": "doctor test key"}


def doctor(path: Path, env: dict[str, str], *extra: str) -> tuple[Result, Result]:
    """The human and the JSON report for the same store."""
    runner = CliRunner()
    human = runner.invoke(main, ["doctor", "--store", str(path), *extra], env=env)
    machine = runner.invoke(main, ["doctor", "--store", str(path), "--json", *extra], env=env)
    return human, machine


def causes(result: Result) -> dict[str, str]:
    return {f["cause"]: f["verdict"] for f in json.loads(result.output)["findings"]}


async def make_device(url: str, path: Path, user: dict[str, Any], key: PickleKey) -> None:
    store = await SqliteStore.open(path, key)
    client = await open_client(url, path.with_suffix(".unused"), session_of(url, user))
    await client.store.close()  # type: ignore[union-attr]
    client.store = store
    await client.init_crypto()
    await client.sync_once()
    await close_client(client)


async def test_a_healthy_device_is_all_ok(homeserver: Any, new_user: Any, tmp_path: Path) -> None:
    url, user = homeserver.base_url, new_user()
    path = tmp_path / "bot.db"
    await make_device(url, path, user, PickleKey("doctor test key"))
    env = {**RAW_KEY_ENV, "OLMSTEAD_ACCESS_TOKEN": user["access_token"]}
    human, report = await asyncio.to_thread(doctor, path, env, "--homeserver", url)
    assert human.exit_code == 0, human.output
    assert set(causes(report).values()) == {"ok"}
    assert {"key_ok", "device_ok", "one_time_keys_ok", "lock_free"} <= set(causes(report))


async def test_a_wrong_pickle_key_is_named_with_the_key_that_opens_it(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    store = await SqliteStore.open(path, PickleKey("mautrix.bridge.e2ee"))
    await store.close()
    human, report = await asyncio.to_thread(doctor, path, RAW_KEY_ENV)
    assert human.exit_code == 2
    assert "the known default 'mautrix.bridge.e2ee' opens it" in human.output
    assert causes(report) == {"lock_free": "ok", "wrong_pickle_key": "error"}
    assert "the known default 'mautrix.bridge.e2ee'" in report.output


async def test_the_lock_held_and_stale(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    lease = LeaseSettings(duration=0.6, renew_every=0.2, wait=0.3)
    holder = await SqliteStore.open(path, PickleKey("doctor test key"), lease=lease, holder="bot-1")
    human, report = await asyncio.to_thread(doctor, path, RAW_KEY_ENV)
    assert human.exit_code == 2
    assert causes(report)["lock_held"] == "error"
    assert "bot-1" in human.output

    pause(holder)  # the holder freezes (or dies) and its lease runs out
    await asyncio.sleep(1.0)
    human, report = await asyncio.to_thread(doctor, path, RAW_KEY_ENV)
    assert causes(report)["lock_stale"] == "warning"
    assert "bot-1" in human.output
    assert "lock_held" not in causes(report)


async def test_a_lost_store_on_a_reused_device_is_device_id_in_use(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    first = await open_client(url, tmp_path / "first.db", session_of(url, user))
    await first.init_crypto()
    await close_client(first)

    lost = await open_client(url, tmp_path / "lost.db", session_of(url, user))
    with contextlib.suppress(DeviceIdInUse):
        await lost.init_crypto()
    await close_client(lost)
    env = {"OLMSTEAD_PICKLE_KEY": "unused", "OLMSTEAD_ACCESS_TOKEN": user["access_token"]}
    human, report = await asyncio.to_thread(
        doctor,
        tmp_path / "lost.db",
        env,
        "--homeserver",
        url,
        "--key-file",
        str(key_file(tmp_path)),
    )
    assert human.exit_code == 2, human.output
    found = causes(report)
    assert found["device_id_in_use"] == "error"
    assert found["keys_never_uploaded"] == "warning"
    assert "wrong_pickle_key" not in found
    assert "another client uploaded over this device ID" in human.output


def key_file(directory: Path) -> Path:
    """The harness's raw pickle key, as a key file."""
    import base64

    path = directory / "harness.key"
    path.write_text(base64.b64encode(b"i" * 32).decode())
    return path


def test_the_harness_key_is_the_one_written() -> None:
    assert KEY.is_raw
