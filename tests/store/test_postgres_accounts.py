"""Many devices in one PostgreSQL database: each account its own key, lease and data."""

from __future__ import annotations

import uuid

import pytest

from olmstead import Changes, PickleKey, StoreLocked, WrongPickleKey
from olmstead.store.postgres import PostgresStore
from tests.conftest import FAST_LEASE, POSTGRES_DSN, postgres_or_skip


async def test_accounts_are_independent_in_one_database() -> None:
    await postgres_or_skip()
    first, second = f"acct-{uuid.uuid4().hex}", f"acct-{uuid.uuid4().hex}"
    key_a, key_b = PickleKey(b"a" * 32), PickleKey("another bridge's passphrase")
    a = await PostgresStore.open(POSTGRES_DSN, key_a, account=first, lease=FAST_LEASE)
    b = await PostgresStore.open(POSTGRES_DSN, key_b, account=second, lease=FAST_LEASE)
    try:
        await a.save_changes(Changes(values={"sync_token": "a1"}))
        await b.save_changes(Changes(values={"sync_token": "b1"}))
        assert await a.get_value("sync_token") == "a1"
        assert await b.get_value("sync_token") == "b1"
        with pytest.raises(StoreLocked):  # each account has its own lease...
            await PostgresStore.open(POSTGRES_DSN, key_a, account=first, lease=FAST_LEASE)
    finally:
        await a.close()
        await b.close()
    with pytest.raises(WrongPickleKey):  # ... and its own key check
        await PostgresStore.open(POSTGRES_DSN, key_b, account=first, lease=FAST_LEASE)


async def test_a_dsn_password_never_appears_in_messages() -> None:
    await postgres_or_skip()
    dsn = POSTGRES_DSN.replace("postgres@", "postgres:s3cret@", 1)
    account = f"acct-{uuid.uuid4().hex}"
    store = await PostgresStore.open(dsn, PickleKey(b"a" * 32), account=account, lease=FAST_LEASE)
    await store.close()
    with pytest.raises(WrongPickleKey) as caught:
        await PostgresStore.open(dsn, PickleKey(b"b" * 32), account=account, lease=FAST_LEASE)
    assert "s3cret" not in str(caught.value)
    assert account in str(caught.value)
