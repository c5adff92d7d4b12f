"""libolm accounts moved to olmstead: no key ID is ever issued twice, published keys still work.

vodozemac 0.10 reads libolm's "last issued key ID" as "next ID to issue": without
the repair its first new key replaces the newest key the account holds.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import olm
import vodozemac
from click.testing import CliRunner

from olmstead import (
    KeysUploadRequest,
    MemoryDatabase,
    MemoryStore,
    OlmMachine,
    PickleKey,
    SqliteStore,
)
from olmstead.cli.main import main
from olmstead.imports.foreign import ForeignStore, import_into, open_libolm_account
from tests.conftest import FAST_LEASE, KEY
from tests.integration.harness import opens_session
from tests.machine.test_keys_upload import outgoing


def libolm_account() -> tuple[olm.Account, dict[str, str]]:
    """A libolm account with five published keys and two not yet uploaded."""
    account = olm.Account()
    account.generate_one_time_keys(5)
    published = dict(account.one_time_keys["curve25519"])
    account.mark_keys_as_published()
    account.generate_one_time_keys(2)
    return account, published


def test_the_vodozemac_import_bug_is_real_and_repaired() -> None:
    account = olm.Account()
    account.generate_one_time_keys(5)
    published = dict(account.one_time_keys["curve25519"])
    account.mark_keys_as_published()
    newest = published[max(published)]
    pickle = account.pickle("k").decode()

    naive = vodozemac.Account.from_libolm_pickle(pickle, b"k")
    naive.generate_one_time_keys(1)
    assert not opens_session(naive, newest)  # the bug: the newest published key is gone

    repaired = open_libolm_account(pickle, "k")
    repaired.generate_one_time_keys(10)
    assert opens_session(repaired, newest)
    assert all(opens_session(open_libolm_account(pickle, "k"), key) for key in published.values())


def test_pending_imported_keys_survive_new_ones() -> None:
    account, _published = libolm_account()
    repaired = open_libolm_account(account.pickle("k").decode(), "k")
    before = {k: v.to_base64() for k, v in repaired.one_time_keys.items()}
    repaired.generate_one_time_keys(10)
    after = {k: v.to_base64() for k, v in repaired.one_time_keys.items()}
    assert all(after[k] == v for k, v in before.items())
    assert len(after) == len(before) + 10


async def test_an_imported_account_never_reuses_a_key_id() -> None:
    account, published = libolm_account()
    restored = open_libolm_account(account.pickle("k").decode(), "k")
    db = MemoryDatabase()
    store = await MemoryStore.open(KEY, db, lease=FAST_LEASE)
    await import_into(
        ForeignStore("mautrix", "test", "@bridge:x", "BRIDGEDEV", True, restored, "test"), store
    )
    machine = await OlmMachine.open(store, "@bridge:x", "BRIDGEDEV")

    uploads: list[dict[str, Any]] = []
    for count in (None, 10, 3):  # the pending keys, then two refills
        if count is not None:
            await machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": count})
        (upload,) = await outgoing(machine)  # key-state markers acknowledged
        assert isinstance(upload, KeysUploadRequest)
        uploads.append(upload.one_time_keys)
        await machine.mark_request_as_sent(upload.request_id, {"one_time_key_counts": {}})

    seen: dict[str, str] = {}
    for batch in uploads:
        for key_id, key in batch.items():
            assert seen.setdefault(key_id, key["key"]) == key["key"], f"{key_id} reused"
    # the keys libolm had published still open sessions with the imported account
    stored = await store.load_account()
    assert stored is not None
    for public in published.values():
        assert opens_session(stored.account, public)


def test_the_import_command_names_the_key_and_writes_a_new_store(tmp_path: Path) -> None:
    account, _published = libolm_account()
    source = tmp_path / "mautrix.db"
    with closing(sqlite3.connect(source)) as conn:
        conn.execute(
            "CREATE TABLE crypto_account (account_id TEXT PRIMARY KEY, device_id TEXT, "
            "shared BOOLEAN, sync_token TEXT, account BLOB)"
        )
        conn.execute(
            "CREATE TABLE crypto_olm_session (account_id TEXT, session_id TEXT, "
            "sender_key TEXT, session BLOB, created_at TEXT, last_decrypted TEXT, "
            "last_encrypted TEXT)"
        )
        conn.execute(
            "CREATE TABLE crypto_megolm_inbound_session (account_id TEXT, "
            "session_id TEXT, sender_key TEXT, signing_key TEXT, room_id TEXT, "
            "session BLOB)"
        )
        conn.execute(
            "INSERT INTO crypto_account VALUES (?, ?, ?, ?, ?)",
            ("@bridge:x", "BRIDGEDEV", True, "", account.pickle("go.mau.fi/meowlnir")),
        )
        conn.commit()
    target = tmp_path / "olmstead.db"
    env = {"OLMSTEAD_CANDIDATE_KEYS": "wrong\nalso wrong", "OLMSTEAD_PICKLE_KEY": "new key"}
    result = CliRunner().invoke(
        main, ["import", "mautrix", str(source), "--into", str(target)], env=env
    )
    assert result.exit_code == 0, result.output
    assert "the known default 'go.mau.fi/meowlnir'" in result.output
    assert "Imported device BRIDGEDEV of @bridge:x" in result.output

    async def identity() -> str:
        store = await SqliteStore.open(target, PickleKey("new key"), lease=FAST_LEASE)
        try:
            record = await store.load_account()
            assert record is not None
            assert record.shared
            return record.account.ed25519_key.to_base64()
        finally:
            await store.close()

    assert asyncio.run(identity()) == account.identity_keys["ed25519"]
