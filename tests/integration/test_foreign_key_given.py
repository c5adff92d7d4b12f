"""doctor, repair --into and import take the key given the normal way for a mautrix store.

A mautrix store written with the operator's own pickle key opens with that key given
through $OLMSTEAD_PICKLE_KEY, a --key-file or the prompt, with no candidates at all.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from olmstead import PickleKey, SqliteStore
from olmstead.cli.main import main
from tests.integration.harness import LEASE
from tests.integration.mautrix_device import mautrix_device

CUSTOM = "our bridge's own pickle key, 2026"
WAYS = ["env", "key-file", "prompt"]


def given(way: str, tmp_path: Path, confirm: bool) -> tuple[list[str], dict[str, str], str | None]:
    """Extra arguments, environment and terminal input that give CUSTOM one way."""
    if way == "env":
        return [], {"OLMSTEAD_PICKLE_KEY": CUSTOM}, None
    if way == "key-file":
        path = tmp_path / "bridge.key"
        path.write_text(CUSTOM + "\n")
        return ["--key-file", str(path)], {}, None
    typed = f"{CUSTOM}\n{CUSTOM}\n" if confirm else f"{CUSTOM}\n"
    return [], {}, typed


def cli(args: list[str], env: dict[str, str], typed: str | None) -> Result:
    env = {"OLMSTEAD_PICKLE_KEY": None, "OLMSTEAD_CANDIDATE_KEYS": None, **env}  # type: ignore[dict-item]
    return CliRunner().invoke(main, args, env=env, input=typed)


@pytest.fixture
async def custom_store(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> tuple[Path, dict[str, Any]]:
    user = new_user()
    path = tmp_path / "mautrix-crypto.db"
    await mautrix_device(homeserver.base_url, user, path, key=CUSTOM)
    return path, user


@pytest.mark.parametrize("way", WAYS)
async def test_doctor_opens_a_mautrix_store_with_the_key_given(
    way: str, custom_store: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, user = custom_store
    extra, env, typed = given(way, tmp_path, confirm=False)
    result = await asyncio.to_thread(
        cli, ["doctor", "--store", str(path), "--json", *extra], env, typed
    )
    report = json.loads(result.stdout)
    causes = {f["cause"]: f["verdict"] for f in report["findings"]}
    assert causes.get("key_ok") == "ok", result.output
    assert "wrong_pickle_key" not in causes
    assert "legacy_default_key" not in causes
    assert report["device"]["device_id"] == user["device_id"]
    assert any("the key given" in f["evidence"] for f in report["findings"])
    assert CUSTOM not in result.output


@pytest.mark.parametrize("way", WAYS)
async def test_repair_into_moves_a_mautrix_store_under_the_key_given(
    way: str, custom_store: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, user = custom_store
    target = tmp_path / "moved.db"
    extra, env, typed = given(way, tmp_path, confirm=True)
    args = ["repair", "--store", str(path), "--into", str(target), "--yes", *extra]
    result = await asyncio.to_thread(cli, args, env, typed)
    assert result.exit_code == 0, result.output
    assert f"into {target}" in result.output

    store = await SqliteStore.open(target, PickleKey(CUSTOM), lease=LEASE)  # the same key
    try:
        record = await store.load_account()
        assert record is not None
        assert (record.user_id, record.device_id) == (user["user_id"], user["device_id"])
    finally:
        await store.close()


async def test_import_tries_the_key_given_first_and_keeps_it(
    custom_store: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, user = custom_store
    target = tmp_path / "imported.db"
    result = await asyncio.to_thread(
        cli,
        ["import", "mautrix", str(path), "--into", str(target)],
        {"OLMSTEAD_PICKLE_KEY": CUSTOM},
        None,
    )
    assert result.exit_code == 0, result.output
    assert "opened with the key given" in result.output
    store = await SqliteStore.open(target, PickleKey(CUSTOM), lease=LEASE)
    try:
        record = await store.load_account()
        assert record is not None
        assert record.device_id == user["device_id"]
    finally:
        await store.close()


async def test_a_wrong_key_given_still_finds_a_candidate_and_says_which(
    custom_store: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _user = custom_store
    env = {"OLMSTEAD_PICKLE_KEY": "not it", "OLMSTEAD_CANDIDATE_KEYS": f"nor this\n{CUSTOM}"}
    result = await asyncio.to_thread(cli, ["doctor", "--store", str(path)], env, None)
    assert "candidate #2" in result.output
    nothing = await asyncio.to_thread(
        cli, ["doctor", "--store", str(path)], {"OLMSTEAD_PICKLE_KEY": "not it"}, None
    )
    assert nothing.exit_code == 2
    assert "neither the key given" in nothing.output
