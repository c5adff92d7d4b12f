"""Stores written by earlier olmsteads open, migrate and decrypt with this one.

Each ``tests/store/fixtures/schemaN.*`` was written once, by the olmstead of
schema N (``make_fixture.py``), and is never rewritten: an SQLite file and a
PostgreSQL dump holding a device with an Olm session and a room key, and the
peer's messages that only those stored sessions decrypt.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from olmstead import CryptoStore, OlmMachine, PickleKey, SqliteStore, TrustLevel
from olmstead.sessions.olm_sessions import DecryptedToDevice
from olmstead.store.migrations.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from olmstead.store.migrations.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from olmstead.store.postgres import PostgresStore
from tests.conftest import POSTGRES_DSN, postgres_or_skip
from tests.store.fixtures.make_fixture import (
    ACCOUNT,
    DEVICE,
    FIXTURE_KEY,
    PEER_DEVICE,
    PEER_USER,
    USER,
    with_database,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VERSIONS = sorted(int(p.name[6:-7]) for p in FIXTURES.glob("schema*.sqlite"))
KEY = PickleKey(FIXTURE_KEY)


def messages(version: int, backend: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads((FIXTURES / f"schema{version}.json").read_text())[backend]
    return found


async def reads_its_sessions(store: CryptoStore, sent: dict[str, Any]) -> None:
    machine = await OlmMachine.open(store, USER, DEVICE)
    assert machine.device_keys_shared
    (got,) = await machine.receive_sync_changes(to_device_events=[sent["to_device"]])
    assert isinstance(got, DecryptedToDevice), got
    assert (got.type, got.content) == ("m.fixture", {"body": "over the stored Olm session"})
    event = await machine.decrypt_room_event(sent["room_id"], sent["room_event"])
    assert event.content["body"] == "under the stored room key"
    if "peer_master_key" in sent:  # schema 8 on: a pinned identity, its device cross-signed
        identity = await machine.get_user_identity(PEER_USER)
        assert identity is not None
        assert identity.master_key == sent["peer_master_key"]
        assert await machine.get_device_trust(PEER_USER, PEER_DEVICE) is TrustLevel.CROSS_SIGNED
        assert event.trust is TrustLevel.CROSS_SIGNED
    if "cross_signing_master" in sent:  # schema 7 on: the sealed cross-signing keys
        status = machine.cross_signing_status
        assert status.has_keys
        assert status.public_keys["master"] == sent["cross_signing_master"]
        assert status.pending == 7  # the outbox survived as it was committed


def test_there_is_a_fixture_of_every_schema_from_5() -> None:
    # numbers are handed out per change and may leave gaps: one fixture per step
    assert VERSIONS[0] == 5
    assert [n for n, _d, _s in SQLITE_MIGRATIONS if n >= 5] == VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
async def test_an_old_sqlite_store_migrates_and_decrypts(tmp_path: Path, version: int) -> None:
    path = tmp_path / "old.sqlite"
    shutil.copyfile(FIXTURES / f"schema{version}.sqlite", path)
    store = await SqliteStore.open(path, KEY)
    try:
        inspection = SqliteStore.inspect(path, KEY)
        assert inspection.schema_version == SQLITE_MIGRATIONS[-1][0]
        await reads_its_sessions(store, messages(version, "sqlite"))
    finally:
        await store.close()


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    await postgres_or_skip()
    name = f"olmstead_fixture_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES_DSN)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield with_database(POSTGRES_DSN, name)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.mark.parametrize("version", VERSIONS)
async def test_an_old_postgres_dump_migrates_and_decrypts(
    fresh_database: str, version: int
) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute((FIXTURES / f"schema{version}.postgres.sql").read_text())
    finally:
        await conn.close()
    store = await PostgresStore.open(fresh_database, KEY, account=ACCOUNT)
    try:
        inspection = await PostgresStore.inspect(fresh_database, KEY, account=ACCOUNT)
        assert inspection.schema_version == POSTGRES_MIGRATIONS[-1][0]
        await reads_its_sessions(store, messages(version, "postgres"))
    finally:
        await store.close()
