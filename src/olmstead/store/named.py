"""A store as an operator names it: an SQLite path, or a ``postgresql://`` DSN and an account."""

from __future__ import annotations

from olmstead.store.base import CryptoStore, LeaseSettings
from olmstead.store.pickle_key import PickleKey
from olmstead.store.sqlite import SqliteStore

__all__ = ["is_postgres", "open_store"]


def is_postgres(store: str) -> bool:
    return store.startswith(("postgresql://", "postgres://"))


async def open_store(store: str, account: str, key: PickleKey) -> CryptoStore:
    """Open it for an operator's tool: waiting up to 30 s for a holder to let go."""
    lease = LeaseSettings(wait=30.0)
    if is_postgres(store):
        from olmstead.store.postgres import PostgresStore  # asyncpg only when asked for

        return await PostgresStore.open(store, key, account=account, lease=lease)
    return await SqliteStore.open(store, key, lease=lease)
