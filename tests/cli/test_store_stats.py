"""``olmstead store stats``: rows and bytes per table, read-only, with no pickle key."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import vodozemac
from click.testing import CliRunner

from olmstead import Changes, InboundGroupSessionRecord, PickleKey, SqliteStore
from olmstead.cli.main import main
from olmstead.store.postgres import PostgresStore
from olmstead.store.stats import postgres_table_stats
from tests.conftest import FAST_LEASE, POSTGRES_DSN, postgres_or_skip

KEY = PickleKey(b"s" * 32)


def room_keys(count: int) -> list[InboundGroupSessionRecord]:
    return [
        InboundGroupSessionRecord(
            f"!r{n}:x",
            "c",
            "e",
            vodozemac.InboundGroupSession(vodozemac.GroupSession().session_key),
        )
        for n in range(count)
    ]


async def test_stats_of_an_sqlite_store(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    store = await SqliteStore.open(path, KEY)
    await store.save_changes(Changes(inbound_group_sessions=room_keys(25)))
    await store.close()
    result = CliRunner().invoke(main, ["store", "stats", "--store", str(path), "--json"])
    assert result.exit_code == 0, result.output
    tables = {t["table"]: t for t in json.loads(result.output)}
    assert tables["inbound_group_sessions"]["rows"] == 25
    assert tables["inbound_group_sessions"]["bytes"] > 25 * 100  # pickles of ~hundreds of bytes
    assert tables["megolm_message_indices"]["rows"] == 0
    text = CliRunner().invoke(main, ["store", "stats", "--store", str(path)])
    assert "inbound_group_sessions" in text.output
    assert "total" in text.output


async def test_stats_of_one_postgres_account() -> None:
    await postgres_or_skip()
    account = f"stats-{uuid.uuid4().hex}"
    store = await PostgresStore.open(POSTGRES_DSN, KEY, account=account, lease=FAST_LEASE)
    await store.save_changes(Changes(inbound_group_sessions=room_keys(7)))
    await store.close()
    tables = {t.table: t for t in await postgres_table_stats(POSTGRES_DSN, account)}
    assert tables["olmstead_inbound_group_sessions"].rows == 7
    assert tables["olmstead_inbound_group_sessions"].bytes > 7 * 100
    assert tables["olmstead_olm_sessions"].rows == 0
