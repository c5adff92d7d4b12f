"""``olmstead store rekey`` and ``olmstead keys export/import`` on real SQLite stores."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from olmstead import PickleKey, SqliteStore, WrongPickleKey
from olmstead.cli.main import main
from tests.conftest import FAST_LEASE
from tests.store.secrets_fixture import Secrets, assert_intact, fill

OLD, NEW = "old bridge pass", "new bridge pass"


def make_store(path: Path, passphrase: str) -> Secrets:
    async def run() -> Secrets:
        store = await SqliteStore.open(path, PickleKey(passphrase), lease=FAST_LEASE)
        try:
            return await fill(store, count=12)
        finally:
            await store.close()

    return asyncio.run(run())


def check(path: Path, passphrase: str, secrets: Secrets) -> None:
    async def run() -> None:
        store = await SqliteStore.open(path, PickleKey(passphrase), lease=FAST_LEASE)
        try:
            await assert_intact(store, secrets)
        finally:
            await store.close()

    asyncio.run(run())


def test_rekey_moves_the_store_to_the_new_key(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    secrets = make_store(path, OLD)
    env = {"OLMSTEAD_PICKLE_KEY": OLD, "OLMSTEAD_NEW_PICKLE_KEY": NEW}
    result = CliRunner().invoke(main, ["store", "rekey", "--store", str(path)], env=env)
    assert result.exit_code == 0, result.output
    assert f"{secrets.rows} secrets" in result.output
    assert "now opens with key" in result.output
    check(path, NEW, secrets)
    with pytest.raises(WrongPickleKey):
        check(path, OLD, secrets)


def test_rekey_with_the_wrong_key_names_both_fingerprints(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    secrets = make_store(path, OLD)
    env = {"OLMSTEAD_PICKLE_KEY": "mautrix.bridge.e2ee", "OLMSTEAD_NEW_PICKLE_KEY": NEW}
    result = CliRunner().invoke(main, ["store", "rekey", "--store", str(path)], env=env)
    assert result.exit_code == 1
    assert "WrongPickleKey" in result.output
    assert "Traceback" not in result.output
    check(path, OLD, secrets)  # untouched


def test_keys_travel_from_one_store_to_another(tmp_path: Path) -> None:
    source, target, keys = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "keys.txt"
    secrets = make_store(source, OLD)
    make_store(target, NEW)
    runner = CliRunner()
    env = {"OLMSTEAD_PICKLE_KEY": OLD, "OLMSTEAD_EXPORT_PASSPHRASE": "travel"}
    exported = runner.invoke(main, ["keys", "export", "--store", str(source), str(keys)], env=env)
    assert exported.exit_code == 0, exported.output
    assert "Exported 12 room keys" in exported.output
    assert keys.read_text().startswith("-----BEGIN MEGOLM SESSION DATA-----")
    # as a Windows editor saves it: a BOM, CRLF line ends, a note above, no final newline
    lines = keys.read_text().strip().split("\n")
    keys.write_bytes(("\ufeffmy keys, 2026\r\n" + "\r\n".join(lines)).encode())

    env = {"OLMSTEAD_PICKLE_KEY": NEW, "OLMSTEAD_EXPORT_PASSPHRASE": "travel"}
    imported = runner.invoke(main, ["keys", "import", "--store", str(target), str(keys)], env=env)
    assert imported.exit_code == 0, imported.output
    assert "Imported 12 room keys; skipped 0" in imported.output

    async def inbound(path: Path) -> set[str]:
        store = await SqliteStore.open(path, PickleKey(NEW), lease=FAST_LEASE)
        try:
            return {r.session_id async for r in store.inbound_group_sessions()}
        finally:
            await store.close()

    assert secrets.inbound <= asyncio.run(inbound(target))

    env["OLMSTEAD_EXPORT_PASSPHRASE"] = "wrong"
    refused = runner.invoke(main, ["keys", "import", "--store", str(target), str(keys)], env=env)
    assert refused.exit_code == 1
    assert "KeyFileError" in refused.output


def test_a_missing_store_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.db"
    env = {"OLMSTEAD_PICKLE_KEY": OLD, "OLMSTEAD_NEW_PICKLE_KEY": NEW}
    result = CliRunner().invoke(main, ["store", "rekey", "--store", str(path)], env=env)
    assert result.exit_code == 2
    assert "no store at" in result.output
    assert not path.exists()
