"""Fixtures shared by all tests: stores of every backend, opened the same way.

``backend`` is parametrised over every store backend, so a test that takes it is
a contract test: it must pass for each of them.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from olmstead import (
    Changes,
    CryptoStore,
    LeaseSettings,
    MemoryDatabase,
    MemoryStore,
    PickleKey,
    SqliteStore,
)
from olmstead.store.postgres import PostgresStore

KEY = PickleKey(b"k" * 32)
OTHER_KEY = PickleKey(b"o" * 32)
#: short leases so lock tests run in a fraction of a second
FAST_LEASE = LeaseSettings(duration=0.6, renew_every=0.2, wait=0.3, poll=0.02)
#: the server, and a database on it to connect to while making the run's own database
SERVER_DSN = os.environ.get("OLMSTEAD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
#: a run's own database, made at its start and dropped at its end: stores that an earlier
#: run, or a branch with another schema, left in the shared database never meet this one
POSTGRES_DSN = SERVER_DSN
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
_scratch: str | None = None


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Make the run's own PostgreSQL database; without a server, tests skip or fail later."""
    global POSTGRES_DSN, _scratch
    name = f"olmstead_test_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(SERVER_DSN, timeout=5)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    try:
        asyncio.run(create())
    except (OSError, asyncpg.PostgresError) as exc:
        # no server (postgres_or_skip says so per test) or no right to create databases:
        # the shared database as it is
        print(f"PostgreSQL tests use {SERVER_DSN} itself: no database of their own ({exc})")
        return
    _scratch = name
    POSTGRES_DSN = _with_database(SERVER_DSN, name)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _scratch is None:
        return

    async def drop(name: str) -> None:
        conn = await asyncpg.connect(SERVER_DSN, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop(_scratch))


@dataclass
class Backend:
    """Opens handles on one underlying store of one backend."""

    name: str
    path: Path
    memory: MemoryDatabase = field(default_factory=MemoryDatabase)
    #: each test is its own device in the shared PostgreSQL database
    account: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex}")
    opened: list[CryptoStore] = field(default_factory=list)

    async def open(
        self, key: PickleKey = KEY, lease: LeaseSettings = FAST_LEASE, holder: str | None = None
    ) -> CryptoStore:
        store: CryptoStore
        if self.name == "memory":
            store = await MemoryStore.open(key, self.memory, lease=lease, holder=holder)
        elif self.name == "sqlite":
            store = await SqliteStore.open(self.path, key, lease=lease, holder=holder)
        else:
            store = await PostgresStore.open(
                POSTGRES_DSN, key, account=self.account, lease=lease, holder=holder
            )
        self.opened.append(store)
        return store

    async def expire_lease(self) -> None:
        """Make the lease look expired, as if its holder had been paused past it."""
        if self.name == "memory":
            lock = self.memory.lock
            assert lock is not None
            self.memory.lock = type(lock)(lock.holder, lock.acquired_at, 0.0, lock.generation)
        elif self.name == "postgres":
            conn = await asyncpg.connect(POSTGRES_DSN)
            try:
                await conn.execute(
                    "UPDATE olmstead_lease SET expires_at = 0 WHERE account_id = $1", self.account
                )
            finally:
                await conn.close()
        else:
            with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
                conn.execute("UPDATE lease_lock SET expires_at = 0")


def record_commits(store: CryptoStore) -> list[Changes]:
    """Every ``Changes`` ``store`` commits from now on, in order."""
    original = store.save_changes
    seen: list[Changes] = []

    async def recorded(changes: Changes, *, generation: int | None = None) -> None:
        seen.append(changes)
        await original(changes, generation=generation)

    store.save_changes = recorded  # type: ignore[method-assign]
    return seen


def pause(store: CryptoStore) -> None:
    """Stop renewing ``store``'s lease, as if its process were frozen (SIGSTOP, a long GC)."""
    assert store._renewer is not None
    store._renewer.cancel()


async def postgres_or_skip() -> None:
    """Reach the test PostgreSQL; off CI a missing server skips, in CI it fails."""
    try:
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(
            f"PostgreSQL is not reachable at {POSTGRES_DSN} ({exc}); start it: {START_POSTGRES}"
        )
    await conn.close()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "postgres":
        await postgres_or_skip()
    b = Backend(request.param, tmp_path / "crypto.db")
    yield b
    for store in b.opened:
        await store.close()
