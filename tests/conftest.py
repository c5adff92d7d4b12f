"""Fixtures shared by all tests: stores of every backend, opened the same way.

``backend`` is parametrised over every store backend, so a test that takes it is
a contract test: it must pass for each of them.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

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
POSTGRES_DSN = os.environ.get("OLMSTEAD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


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
