"""PostgreSQL migrations apply every step a database has not recorded, not only those
above its highest: numbers are assigned per change, so a database may have run 7
before 6 existed (a development branch), and 6 must still come."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from olmstead import PickleKey
from olmstead.store.migrations.postgres import MIGRATIONS
from olmstead.store.postgres import PostgresStore
from tests.conftest import POSTGRES_DSN, postgres_or_skip
from tests.store.fixtures.make_fixture import with_database


@pytest.fixture
async def database() -> AsyncIterator[str]:
    await postgres_or_skip()
    name = f"olmstead_migrations_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES_DSN)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield with_database(POSTGRES_DSN, name)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_a_step_below_the_highest_recorded_is_still_applied(database: str) -> None:
    key = PickleKey(b"k" * 32)
    store = await PostgresStore.open(database, key, account="a")
    await store.close()
    skipped_number, _description, sql = MIGRATIONS[-2]  # as if run before it existed
    tables = re.findall(r"CREATE TABLE (\w+)", sql)
    assert tables
    conn = await asyncpg.connect(database)
    try:
        for table in tables:
            await conn.execute(f"DROP TABLE {table}")
        await conn.execute("DELETE FROM olmstead_schema WHERE version = $1", skipped_number)
    finally:
        await conn.close()

    store = await PostgresStore.open(database, key, account="a")
    await store.close()
    conn = await asyncpg.connect(database)
    try:
        found = {
            r[0]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        versions = sorted(r[0] for r in await conn.fetch("SELECT version FROM olmstead_schema"))
    finally:
        await conn.close()
    assert set(tables) <= found
    assert versions == [number for number, _d, _s in MIGRATIONS]
