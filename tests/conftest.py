"""Fixtures shared by all tests: stores of every backend, opened the same way.

``backend`` is parametrised over every store backend, so a test that takes it is
a contract test: it must pass for each of them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from olmstead import CryptoStore, LeaseSettings, MemoryDatabase, MemoryStore, PickleKey, SqliteStore

KEY = PickleKey(b"k" * 32)
OTHER_KEY = PickleKey(b"o" * 32)
#: short leases so lock tests run in a fraction of a second
FAST_LEASE = LeaseSettings(duration=0.6, renew_every=0.2, wait=0.3, poll=0.02)


@dataclass
class Backend:
    """Opens handles on one underlying store of one backend."""

    name: str
    path: Path
    memory: MemoryDatabase = field(default_factory=MemoryDatabase)
    opened: list[CryptoStore] = field(default_factory=list)

    async def open(
        self, key: PickleKey = KEY, lease: LeaseSettings = FAST_LEASE, holder: str | None = None
    ) -> CryptoStore:
        store: CryptoStore
        if self.name == "memory":
            store = await MemoryStore.open(key, self.memory, lease=lease, holder=holder)
        else:
            store = await SqliteStore.open(self.path, key, lease=lease, holder=holder)
        self.opened.append(store)
        return store

    def expire_lease(self) -> None:
        """Make the lease look expired, as if its holder had been paused past it."""
        if self.name == "memory":
            lock = self.memory.lock
            assert lock is not None
            self.memory.lock = type(lock)(lock.holder, lock.acquired_at, 0.0, lock.generation)
        else:
            with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
                conn.execute("UPDATE lease_lock SET expires_at = 0")


def pause(store: CryptoStore) -> None:
    """Stop renewing ``store``'s lease, as if its process were frozen (SIGSTOP, a long GC)."""
    assert store._renewer is not None
    store._renewer.cancel()


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = Backend(request.param, tmp_path / "crypto.db")
    yield b
    for store in b.opened:
        await store.close()
