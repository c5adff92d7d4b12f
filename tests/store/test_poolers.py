"""The PostgreSQL store through a real pgbouncer, and many accounts on one shared pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import vodozemac

from olmstead import (
    Changes,
    InboundGroupSessionRecord,
    LeaseSettings,
    PickleKey,
    StoreConnectionLost,
    StoreOutOfConnections,
    StorePoolerRefused,
    WrongPickleKey,
)
from olmstead.store.postgres import PostgresDatabase, PostgresStore, store_error
from tests.dedicated_postgres import DedicatedDatabase, dedicated_database, dsn_for
from tests.pgbouncer import running_pgbouncer

KEY = PickleKey(b"p" * 32)
NEW_KEY = PickleKey(b"q" * 32)
LEASE = LeaseSettings(duration=3.0, renew_every=1.0, wait=10.0)


@pytest.fixture
async def pooled_db() -> AsyncIterator[DedicatedDatabase]:
    async with dedicated_database("olmstead_pool") as db:
        yield db


def room_key(room: str) -> InboundGroupSessionRecord:
    outbound = vodozemac.GroupSession()
    inbound = vodozemac.InboundGroupSession(outbound.session_key)
    return InboundGroupSessionRecord(room, "curve-key", "ed-key", inbound)


async def open_write_read_rekey(dsn: str, account: str) -> None:
    store = await PostgresStore.open(dsn, KEY, account=account, lease=LEASE)
    try:
        key = room_key("!room:example.org")
        await store.save_changes(Changes(values={"sync_token": "s1"}, inbound_group_sessions=[key]))
        assert await store.get_value("sync_token") == "s1"
        found = await store.get_inbound_group_session("!room:example.org", key.session_id)
        assert found is not None
        assert found.session.session_id == key.session_id
        await store.rekey(NEW_KEY)  # one transaction, a cursor over every pickle
    finally:
        await store.close()
    with pytest.raises(WrongPickleKey):
        await PostgresStore.open(dsn, KEY, account=account, lease=LEASE)
    reopened = await PostgresStore.open(dsn, NEW_KEY, account=account, lease=LEASE)
    try:
        again = await reopened.get_inbound_group_session("!room:example.org", key.session_id)
        assert again is not None
        assert (await reopened.count_secrets())["inbound"] == 1
    finally:
        await reopened.close()


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_through_pgbouncer(pooled_db: DedicatedDatabase, mode: str) -> None:
    with running_pgbouncer(mode, [pooled_db.role]) as port:
        dsn = dsn_for(pooled_db.role, pooled_db.database, "127.0.0.1", port)
        await open_write_read_rekey(dsn, "first")
        # many accounts at once on one shared pool, each opening, writing and reading
        database = await PostgresDatabase.open(dsn, pool_size=4)
        async with database:
            stores = await asyncio.gather(
                *(database.open_store(KEY, account=f"acct-{n}", lease=LEASE) for n in range(30))
            )
            await asyncio.gather(
                *(s.save_changes(Changes(values={"sync_token": s.account_id})) for s in stores)
            )
            tokens = await asyncio.gather(*(s.get_value("sync_token") for s in stores))
            assert tokens == [s.account_id for s in stores]


async def use_until_it_breaks(dsn: str, pool: asyncpg.Pool) -> None:
    for _ in range(50):  # statements prepared on one server connection...
        stores = await asyncio.gather(
            *(
                PostgresStore.open(dsn, KEY, account=f"a{n}", lease=LEASE, pool=pool)
                for n in range(4)
            )
        )
        try:  # ... are asked for on another
            await asyncio.gather(*(s.get_value("x") for s in stores for _ in range(5)))
        finally:
            for store in stores:
                await store.close()


async def test_a_pool_with_prepared_statements_behind_pgbouncer_is_named(
    pooled_db: DedicatedDatabase,
) -> None:
    """A caller's own pool that prepares named statements breaks behind a pooler in
    transaction mode; the error says so, and what to do."""
    with running_pgbouncer("transaction", [pooled_db.role]) as port:
        dsn = dsn_for(pooled_db.role, pooled_db.database, "127.0.0.1", port)
        await open_write_read_rekey(dsn, "schema")  # the schema, made the right way
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=4)  # cache on: wrong
        try:
            with pytest.raises(StorePoolerRefused) as caught:
                await use_until_it_breaks(dsn, pool)
        finally:
            await pool.close()
        message = str(caught.value)
        assert "pgbouncer" in message
        assert "statement_cache_size=0" in message


def test_each_driver_failure_is_named() -> None:
    name = "PostgreSQL store test"
    pooler = store_error(
        name,
        asyncpg.exceptions.InvalidSQLStatementNameError(
            'prepared statement "__asyncpg_stmt_a__" does not exist'
        ),
    )
    assert isinstance(pooler, StorePoolerRefused)
    full = store_error(name, asyncpg.exceptions.TooManyConnectionsError("too many clients"))
    assert isinstance(full, StoreOutOfConnections)
    assert "PostgresDatabase" in str(full)


async def test_200_accounts_on_one_shared_pool(pooled_db: DedicatedDatabase) -> None:
    """More accounts than the server's connections (max_connections, 100 by default)."""
    admin = pooled_db.admin
    max_connections = int(await admin.fetchval("SHOW max_connections"))
    accounts = 2 * max_connections
    database = await PostgresDatabase.open(pooled_db.dsn, pool_size=8)
    async with database:
        stores = []
        for n in range(accounts):
            stores.append(await database.open_store(KEY, account=f"device-{n}", lease=LEASE))
        await asyncio.gather(
            *(s.save_changes(Changes(values={"sync_token": s.account_id})) for s in stores)
        )
        tokens = await asyncio.gather(*(s.get_value("sync_token") for s in stores))
        assert tokens == [s.account_id for s in stores]
        assert await pooled_db.connections() <= 8
        await asyncio.sleep(LEASE.renew_every * 1.5)  # every lease renewed on the same pool
        assert all(s.generation == 1 for s in stores)
    assert await pooled_db.connections() == 0  # closing the database closed the pool


async def test_running_out_of_connections_says_what_to_do(
    pooled_db: DedicatedDatabase,
) -> None:
    """One pool per account, the old way, until the role's connections run out."""
    await pooled_db.admin.execute(f'ALTER ROLE "{pooled_db.role}" CONNECTION LIMIT 3')
    opened: list[PostgresStore] = []

    async def open_more() -> None:
        for n in range(10):
            opened.append(
                await PostgresStore.open(pooled_db.dsn, KEY, account=f"d{n}", lease=LEASE)
            )
            await asyncio.gather(*(s.get_value("x") for s in opened for _ in range(4)))

    try:
        with pytest.raises(StoreOutOfConnections) as caught:
            await open_more()
        assert "PostgresDatabase.open" in str(caught.value)
    finally:
        for store in opened:
            await store.close()


async def commit_cut_off_while_server_finishes(
    pooled_db: DedicatedDatabase, lands: bool
) -> tuple[PostgresStore, asyncpg.Connection]:
    """A store whose next commit loses its connection while the server, on the other end,
    is still finishing that commit (on ``orphan``); it lands or rolls back 0.5 s later."""
    store = await PostgresStore.open(pooled_db.dsn, KEY, account="cut", lease=LEASE)
    await store.save_changes(Changes(values={"sync_token": "s1"}))
    orphan = await asyncpg.connect(pooled_db.dsn)

    def writer(changes: object, holder: str, generation: int, commit_id: str) -> object:
        async def write(conn: asyncpg.Connection) -> None:
            await orphan.execute("BEGIN")
            await orphan.execute("SELECT 1 FROM olmstead_lease WHERE account_id = 'cut' FOR UPDATE")
            await orphan.execute(
                "UPDATE olmstead_kv SET value = $1 WHERE account_id = 'cut' AND key = $2",
                commit_id,
                "olmstead.last_commit",
            )
            await orphan.execute(
                "UPDATE olmstead_kv SET value = 's2' "
                "WHERE account_id = 'cut' AND key = 'sync_token'"
            )

            async def finish() -> None:
                await asyncio.sleep(0.5)
                await orphan.execute("COMMIT" if lands else "ROLLBACK")

            asyncio.get_running_loop().create_task(finish())
            raise asyncpg.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )

        return write

    store._writer = writer  # type: ignore[assignment,method-assign]
    return store, orphan


async def test_a_commit_the_server_finishes_after_the_break_counts_as_landed(
    pooled_db: DedicatedDatabase,
) -> None:
    store, orphan = await commit_cut_off_while_server_finishes(pooled_db, lands=True)
    try:
        # the check waits for the commit still under way instead of reading the old ID
        await store.save_changes(Changes(values={"sync_token": "s2"}))
        assert await store.get_value("sync_token") == "s2"
    finally:
        await store.close()
        await orphan.close()


async def test_a_commit_the_server_rolls_back_after_the_break_is_not_taken_as_landed(
    pooled_db: DedicatedDatabase,
) -> None:
    store, orphan = await commit_cut_off_while_server_finishes(pooled_db, lands=False)
    try:
        with pytest.raises(StoreConnectionLost):
            await store.save_changes(Changes(values={"sync_token": "s2"}))
        assert await store.get_value("sync_token") == "s1"
    finally:
        await store.close()
        await orphan.close()
