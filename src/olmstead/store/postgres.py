"""The PostgreSQL store: many devices in one database, for bridges; on asyncpg.

Every row carries an ``account_id``: one database holds as many devices as a
bridge runs, each opened with its own pickle key check and its own writer lease.
Lease times come from the database's clock, so processes on hosts whose clocks
disagree still agree on who holds a lease; every write locks the lease row and
commits only if it still names this holder and generation.

Opening migrates the shared schema (under an advisory lock), then proves the
pickle key against this account's key check before anything of the account is
written. Needs the ``postgres`` extra (PyPI ``asyncpg``).

Many accounts in one process share one pool: ``PostgresDatabase.open(dsn,
pool_size=…)`` once, then ``database.open_store(key, account=…)`` per device.
``PostgresStore.open(dsn, …)`` makes a pool of its own per account, which runs a
server out of connections at about a hundred accounts.

The pools olmstead makes prepare no named statements (asyncpg's statement cache
is off), so they work through a pooler in transaction mode (pgbouncer).
Every failure of the driver becomes a ``StoreError`` in ``store_error``, the one
place that maps them: a lost connection, a server shutting down, a pooler that
refused a prepared statement, a full disk, a read-only server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from olmstead import metrics
from olmstead.errors import (
    LocalProtocolError,
    StoreConnectionLost,
    StoreCorrupt,
    StoreDiskFull,
    StoreError,
    StoreLockLost,
    StoreMigrationError,
    StoreOutOfConnections,
    StorePoolerRefused,
    StoreReadOnly,
    StoreUnavailable,
)
from olmstead.key_state import DRAINED
from olmstead.store.base import (
    CryptoStore,
    Inspection,
    LeaseSettings,
    LockRow,
    MessageIndex,
    SerializedChanges,
    account_from_row,
    new_holder_name,
    next_lock_row,
)
from olmstead.store.migrations.postgres import MIGRATIONS
from olmstead.store.pickle_key import DerivedKey, PickleKey

__all__ = ["PostgresDatabase", "PostgresStore", "connect_mapped", "store_error"]

T = TypeVar("T")
log = logging.getLogger(__name__)
#: connections a store opened with a DSN keeps (its own pool)
OWN_POOL_SIZE = 4
#: the value every commit sets to its own random ID (see ``PostgresStore._write``)
LAST_COMMIT = "olmstead.last_commit"
#: reads to find out whether a commit cut off by a lost connection landed
LANDED_CHECKS = 5
#: seconds to wait for a commit the server may still be finishing after the connection broke
LANDED_WAIT = 5.0
#: what the driver raises when the database, the network or the pooler fails
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
_MIGRATION_LOCK = 0x6F6C6D73  # "olms": one advisory lock for schema changes
_NOW = "extract(epoch from clock_timestamp())::double precision"
#: where each kind of pickle lives, and the rest of its primary key (after account_id)
SECRET_TABLES = {
    "account": ("olmstead_account", ("account_id",)),
    "olm": ("olmstead_olm_sessions", ("sender_key", "session_id")),
    "inbound": ("olmstead_inbound_group_sessions", ("room_id", "session_id")),
    "outbound": ("olmstead_outbound_group_sessions", ("room_id",)),
    "cross_signing": ("olmstead_cross_signing", ("account_id",)),
}


class PostgresStore(CryptoStore):
    def __init__(
        self,
        name: str,
        pool: asyncpg.Pool,
        account_id: str,
        key: DerivedKey,
        lease: LeaseSettings,
        holder: str,
        owns_pool: bool,
    ) -> None:
        super().__init__(name, key, lease, holder)
        self.account_id = account_id
        self._pool = pool
        self._owns_pool = owns_pool
        self._database: PostgresDatabase | None = None

    @classmethod
    async def open(
        cls,
        dsn: str,
        pickle_key: PickleKey,
        *,
        account: str = "default",
        lease: LeaseSettings | None = None,
        holder: str | None = None,
        pool: asyncpg.Pool | None = None,
        migrate: bool = True,
    ) -> PostgresStore:
        """Open the device ``account`` in the database at ``dsn``; creates what is missing.

        This makes a pool of ``OWN_POOL_SIZE`` connections for this account alone. For
        many accounts in one process use ``PostgresDatabase`` (one shared pool), or pass
        ``pool``: one made with ``statement_cache_size=0`` if a pooler may sit between.
        ``migrate=False`` leaves the schema alone (``PostgresDatabase`` migrated it once).

        Raises ``WrongPickleKey``, ``StoreCorrupt``, ``StoreMigrationError``,
        ``StoreLocked``, ``StoreUnavailable`` (``StoreOutOfConnections`` when the server
        has no connection left) or ``StoreError``.
        """
        name = f"PostgreSQL store {_redacted(dsn)} account {account!r}"
        owns_pool = pool is None
        try:
            with _mapped(name):
                if pool is None:
                    pool = await _create_pool(dsn, OWN_POOL_SIZE, prepared_statements=False)
                # an existing account's key and account are proven before anything is written
                derived = await _prove_existing(pool, account, pickle_key, name)
                if migrate:
                    await _migrate(pool, name)
                if derived is None:
                    derived = await _check_key(pool, account, pickle_key, name)
        except BaseException:
            if owns_pool and pool is not None:
                await pool.close()
            raise
        store = cls(
            name,
            pool,
            account,
            derived,
            lease or LeaseSettings(),
            holder or new_holder_name(),
            owns_pool,
        )
        try:
            await store._start()
        except BaseException:
            await store.close()
            raise
        return store

    @staticmethod
    async def inspect(dsn: str, pickle_key: PickleKey, *, account: str = "default") -> Inspection:
        """Prove ``pickle_key`` and read ``account``, writing nothing (for diagnosis).

        Raises ``WrongPickleKey``, ``StoreCorrupt`` (no olmstead tables, or no such
        account) or ``StoreError`` (the database cannot be reached).
        """
        name = f"PostgreSQL store {_redacted(dsn)} account {account!r}"
        with _mapped(name):
            conn = await _connect(dsn)
        try:
            try:
                version = await conn.fetchval("SELECT max(version) FROM olmstead_schema") or 0
            except asyncpg.UndefinedTableError:
                raise StoreCorrupt(name, "the database holds no olmstead store") from None
            record = await conn.fetchval(
                "SELECT value FROM olmstead_meta WHERE account_id = $1 AND key = 'key_check'",
                account,
            )
            if record is None:
                raise StoreCorrupt(name, f"the database holds no account {account!r}")
            derived = pickle_key.check(record, name)
            row = await conn.fetchrow(
                "SELECT user_id, device_id, pickle, state FROM olmstead_account "
                "WHERE account_id = $1",
                account,
            )
            lock, now = await _read_lease(conn, account)
            drained = await conn.fetchval(
                "SELECT value FROM olmstead_kv WHERE account_id = $1 AND key = $2",
                account,
                DRAINED,
            )
        except DRIVER_ERRORS as exc:
            raise store_error(name, exc) from exc
        finally:
            await conn.close()
        found = None if row is None else account_from_row(tuple(row), derived.key, name)
        latest = MIGRATIONS[-1][0]
        return Inspection(name, derived.fingerprint, found, version, latest, lock, now, drained)

    @staticmethod
    async def read_lease(dsn: str, account: str = "default") -> tuple[LockRow | None, float]:
        """The account's writer lease and the database's clock, read-only (no key needed)."""
        with _mapped(f"PostgreSQL store {_redacted(dsn)}"):
            conn = await _connect(dsn)
            try:
                return await _read_lease(conn, account)
            except asyncpg.UndefinedTableError:
                return None, 0.0
            finally:
                await conn.close()

    @staticmethod
    async def release_stale_lease(dsn: str, account: str, holder: str) -> bool:
        """Mark ``holder``'s lease released if it ran out; whether it did."""
        with _mapped(f"PostgreSQL store {_redacted(dsn)}"):
            conn = await _connect(dsn)
            try:
                result = await conn.execute(
                    "UPDATE olmstead_lease SET expires_at = 0 WHERE account_id = $1 "
                    f"AND holder = $2 AND expires_at > 0 AND expires_at <= {_NOW}",
                    account,
                    holder,
                )
            finally:
                await conn.close()
        return bool(result == "UPDATE 1")

    async def _run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        with _mapped(self.name):
            async with self._pool.acquire() as conn:
                try:
                    return await fn(conn)
                except DRIVER_ERRORS as exc:
                    if _breaks_connection(exc):
                        # never back into the pool half-broken (a closed one is detached)
                        with contextlib.suppress(Exception):
                            conn.terminate()
                    raise

    # --- reads ---------------------------------------------------------------------------------

    async def _load_account_row(self) -> tuple[str, str, str, str] | None:
        row = await self._run(
            lambda c: c.fetchrow(
                "SELECT user_id, device_id, pickle, state FROM olmstead_account "
                "WHERE account_id = $1",
                self.account_id,
            )
        )
        return None if row is None else (row[0], row[1], row[2], row[3])

    async def get_value(self, key: str) -> str | None:
        value: str | None = await self._run(
            lambda c: c.fetchval(
                "SELECT value FROM olmstead_kv WHERE account_id = $1 AND key = $2",
                self.account_id,
                key,
            )
        )
        return value

    async def _device_rows(self, user_id: str) -> list[tuple[str, str]]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT device_id, data FROM olmstead_devices "
                "WHERE account_id = $1 AND user_id = $2",
                self.account_id,
                user_id,
            )
        )
        return [(r[0], r[1]) for r in rows]

    async def _device_rows_of(self, user_ids: list[str]) -> list[tuple[str, str, str]]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT user_id, device_id, data FROM olmstead_devices "
                "WHERE account_id = $1 AND user_id = ANY($2::text[])",
                self.account_id,
                user_ids,
            )
        )
        return [(row[0], row[1], row[2]) for row in rows]

    async def _identity_rows_of(self, user_ids: list[str]) -> list[tuple[str, str]]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT user_id, data FROM olmstead_user_identities "
                "WHERE account_id = $1 AND user_id = ANY($2::text[])",
                self.account_id,
                user_ids,
            )
        )
        return [(row[0], row[1]) for row in rows]

    async def _device_row_by_curve25519(self, key: str) -> tuple[str, str, str] | None:
        row = await self._run(
            lambda c: c.fetchrow(
                "SELECT user_id, device_id, data FROM olmstead_devices "
                "WHERE account_id = $1 AND curve25519 = $2",
                self.account_id,
                key,
            )
        )
        return None if row is None else (row[0], row[1], row[2])

    async def _cross_signing_row(self) -> tuple[str, str] | None:
        row = await self._run(
            lambda c: c.fetchrow(
                "SELECT pickle, state FROM olmstead_cross_signing WHERE account_id = $1",
                self.account_id,
            )
        )
        return None if row is None else (row[0], row[1])

    async def get_tracked_users(self) -> dict[str, bool]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT user_id, outdated FROM olmstead_tracked_users WHERE account_id = $1",
                self.account_id,
            )
        )
        return {r[0]: bool(r[1]) for r in rows}

    async def _olm_session_rows(self, sender_key: str) -> list[tuple[str, float, float]]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT pickle, created_at, last_used FROM olmstead_olm_sessions "
                "WHERE account_id = $1 AND sender_key = $2",
                self.account_id,
                sender_key,
            )
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def _olm_session_rows_of(
        self, sender_keys: list[str]
    ) -> list[tuple[str, str, float, float]]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT sender_key, pickle, created_at, last_used FROM olmstead_olm_sessions "
                "WHERE account_id = $1 AND sender_key = ANY($2::text[])",
                self.account_id,
                sender_keys,
            )
        )
        return [(row[0], row[1], row[2], row[3]) for row in rows]

    async def _inbound_group_row(
        self, room_id: str, session_id: str
    ) -> tuple[str, str, str] | None:
        row = await self._run(
            lambda c: c.fetchrow(
                "SELECT sender_key, signing_key, pickle FROM olmstead_inbound_group_sessions "
                "WHERE account_id = $1 AND room_id = $2 AND session_id = $3",
                self.account_id,
                room_id,
                session_id,
            )
        )
        return None if row is None else (row[0], row[1], row[2])

    async def _outbound_group_row(self, room_id: str) -> tuple[str, str] | None:
        row = await self._run(
            lambda c: c.fetchrow(
                "SELECT pickle, state FROM olmstead_outbound_group_sessions "
                "WHERE account_id = $1 AND room_id = $2",
                self.account_id,
                room_id,
            )
        )
        return None if row is None else (row[0], row[1])

    async def _inbound_group_page(
        self, after: tuple[str, str], limit: int
    ) -> list[tuple[str, str, str, str, str]]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT room_id, session_id, sender_key, signing_key, pickle "
                "FROM olmstead_inbound_group_sessions WHERE account_id = $1 "
                "AND (room_id, session_id) > ($2, $3) ORDER BY room_id, session_id LIMIT $4",
                self.account_id,
                *after,
                limit,
            )
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def get_message_index(self, session_id: str, index: int) -> MessageIndex | None:
        row = await self._run(
            lambda c: c.fetchrow(
                "SELECT event_id, origin_ts FROM olmstead_message_indices "
                "WHERE account_id = $1 AND session_id = $2 AND message_index = $3",
                self.account_id,
                session_id,
                index,
            )
        )
        return None if row is None else MessageIndex(session_id, index, row[0], row[1])

    # --- the one write -------------------------------------------------------------------------

    async def get_message_indices(
        self, session_id: str, indices: Collection[int]
    ) -> dict[int, MessageIndex]:
        if not indices:
            return {}
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT message_index, event_id, origin_ts FROM olmstead_message_indices "
                "WHERE account_id = $1 AND session_id = $2 AND message_index = ANY($3::bigint[])",
                self.account_id,
                session_id,
                sorted(set(indices)),
            )
        )
        return {r[0]: MessageIndex(session_id, r[0], r[1], r[2]) for r in rows}

    async def _waiting_rows(
        self, session_ids: list[str] | None
    ) -> list[tuple[str, str, str, str, float, int]]:
        columns = "room_id, event_id, session_id, event, received_at, position"
        if session_ids is None:
            rows = await self._run(
                lambda c: c.fetch(
                    f"SELECT {columns} FROM olmstead_waiting_room_events WHERE account_id = $1 "
                    "ORDER BY received_at, position",
                    self.account_id,
                )
            )
        else:
            rows = await self._run(
                lambda c: c.fetch(
                    f"SELECT {columns} FROM olmstead_waiting_room_events WHERE account_id = $1 "
                    "AND session_id = ANY($2::text[]) ORDER BY received_at, position",
                    self.account_id,
                    session_ids,
                )
            )
        return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    async def count_waiting_events(self) -> int:
        count = await self._run(
            lambda c: c.fetchval(
                "SELECT count(*) FROM olmstead_waiting_room_events WHERE account_id = $1",
                self.account_id,
            )
        )
        return int(count)

    async def _withheld_rows(
        self, room_id: str, session_id: str
    ) -> list[tuple[str, str, str, str]]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT sender_key, sender, code, reason FROM olmstead_withheld_sessions "
                "WHERE account_id = $1 AND room_id = $2 AND session_id = $3",
                self.account_id,
                room_id,
                session_id,
            )
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def _outbox_rows(self) -> list[tuple[str, float, str]]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT request_id, created_at, data FROM olmstead_outbox WHERE account_id = $1 "
                "ORDER BY created_at, request_id",
                self.account_id,
            )
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def _write(self, changes: SerializedChanges, holder: str, generation: int) -> None:
        """One transaction; it also records a random commit ID, so that when the connection
        breaks during the commit a fresh one can tell whether the commit landed."""
        commit_id = uuid.uuid4().hex
        try:
            await self._run(self._writer(changes, holder, generation, commit_id))
        except StoreConnectionLost:
            if not await self._landed(commit_id):
                raise  # not seen (yet): the outcome stays unknown to the caller
            log.warning("%s: the connection broke during a commit that landed", self.name)

    async def _landed(self, commit_id: str) -> bool:
        """Whether the commit that recorded ``commit_id`` is in the database (a few tries).

        The server may still be finishing that commit after our end of the connection
        broke: every commit holds the lease row locked, so waiting for a share lock on
        it (up to ``LANDED_WAIT``) waits for the commit to land or roll back first.
        """
        a = self.account_id

        async def read(conn: asyncpg.Connection) -> str | None:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{int(LANDED_WAIT * 1000)}ms'")
                try:
                    await conn.execute(
                        "SELECT 1 FROM olmstead_lease WHERE account_id = $1 FOR SHARE", a
                    )
                except asyncpg.LockNotAvailableError:
                    return None  # still not finished: the outcome stays unknown
                value: str | None = await conn.fetchval(
                    "SELECT value FROM olmstead_kv WHERE account_id = $1 AND key = $2",
                    a,
                    LAST_COMMIT,
                )
                return value

        for attempt in range(LANDED_CHECKS):
            try:
                found = await self._run(read)
            except StoreUnavailable:
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            return found == commit_id
        return False

    def _writer(
        self, changes: SerializedChanges, holder: str, generation: int, commit_id: str
    ) -> Callable[[asyncpg.Connection], Awaitable[None]]:
        a = self.account_id

        async def write(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                row = await conn.fetchrow(
                    "SELECT holder, generation FROM olmstead_lease WHERE account_id = $1 "
                    "FOR UPDATE",
                    a,
                )
                if row is None or row[0] != holder or row[1] != generation:
                    now_held = row[0] if row else "nobody"
                    raise StoreLockLost(self.name, f"now held by {now_held}")
                if changes.account is not None:
                    await conn.execute(
                        "INSERT INTO olmstead_account (account_id, user_id, device_id, pickle, "
                        "state) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id) DO UPDATE "
                        "SET user_id = excluded.user_id, device_id = excluded.device_id, "
                        "pickle = excluded.pickle, state = excluded.state",
                        a,
                        *changes.account,
                    )
                if changes.cross_signing is not None:
                    await conn.execute(
                        "INSERT INTO olmstead_cross_signing (account_id, pickle, state) "
                        "VALUES ($1, $2, $3) ON CONFLICT (account_id) DO UPDATE SET "
                        "pickle = excluded.pickle, state = excluded.state",
                        a,
                        *changes.cross_signing,
                    )
                await _many(
                    conn,
                    "INSERT INTO olmstead_devices (account_id, user_id, device_id, curve25519, "
                    "data) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id, user_id, "
                    "device_id) DO UPDATE SET curve25519 = excluded.curve25519, "
                    "data = excluded.data",
                    a,
                    changes.devices,
                )
                await _many(
                    conn,
                    "INSERT INTO olmstead_tracked_users (account_id, user_id, outdated) "
                    "VALUES ($1, $2, $3) ON CONFLICT (account_id, user_id) DO UPDATE SET "
                    "outdated = excluded.outdated",
                    a,
                    list(changes.tracked_users.items()),
                )
                await _many(
                    conn,
                    "DELETE FROM olmstead_tracked_users WHERE account_id = $1 AND user_id = $2",
                    a,
                    [(user,) for user in changes.untracked_users],
                )
                await _many(
                    conn,
                    "INSERT INTO olmstead_olm_sessions (account_id, sender_key, session_id, "
                    "pickle, created_at, last_used) VALUES ($1, $2, $3, $4, $5, $6) "
                    "ON CONFLICT (account_id, sender_key, session_id) DO UPDATE SET "
                    "pickle = excluded.pickle, last_used = excluded.last_used",
                    a,
                    changes.olm_sessions,
                )
                await _many(
                    conn,
                    "INSERT INTO olmstead_inbound_group_sessions (account_id, room_id, "
                    "session_id, sender_key, signing_key, pickle) VALUES ($1, $2, $3, $4, $5, "
                    "$6) ON CONFLICT (account_id, room_id, session_id) DO UPDATE SET "
                    "pickle = excluded.pickle",
                    a,
                    changes.inbound_group_sessions,
                )
                await _many(
                    conn,
                    "INSERT INTO olmstead_outbound_group_sessions (account_id, room_id, pickle, "
                    "state) VALUES ($1, $2, $3, $4) ON CONFLICT (account_id, room_id) DO UPDATE "
                    "SET pickle = excluded.pickle, state = excluded.state",
                    a,
                    changes.outbound_group_sessions,
                )
                await _many(
                    conn,
                    "DELETE FROM olmstead_outbound_group_sessions WHERE account_id = $1 "
                    "AND room_id = $2",
                    a,
                    [(room,) for room in changes.discarded_outbound],
                )
                await _many(
                    conn,
                    "INSERT INTO olmstead_message_indices (account_id, session_id, "
                    "message_index, event_id, origin_ts) VALUES ($1, $2, $3, $4, $5) "
                    "ON CONFLICT DO NOTHING",
                    a,
                    changes.message_indices,
                )
                await _many(
                    conn,
                    "INSERT INTO olmstead_waiting_room_events (account_id, room_id, event_id, "
                    "session_id, event, received_at, position) VALUES ($1, $2, $3, $4, $5, $6, "
                    "$7) ON CONFLICT DO NOTHING",
                    a,
                    changes.waiting_events,
                )
                await _many(
                    conn,
                    "DELETE FROM olmstead_waiting_room_events WHERE account_id = $1 "
                    "AND room_id = $2 AND event_id = $3",
                    a,
                    list(changes.settled_events),
                )
                await _many(
                    conn,
                    "INSERT INTO olmstead_withheld_sessions (account_id, room_id, session_id, "
                    "sender_key, sender, code, reason) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                    "ON CONFLICT (account_id, room_id, session_id, sender_key) DO UPDATE SET "
                    "sender = excluded.sender, code = excluded.code, reason = excluded.reason",
                    a,
                    changes.withheld,
                )
                await _many(
                    conn,
                    "INSERT INTO olmstead_outbox (account_id, request_id, created_at, data) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    a,
                    changes.outbox,
                )
                await _many(
                    conn,
                    "DELETE FROM olmstead_outbox WHERE account_id = $1 AND request_id = $2",
                    a,
                    [(request_id,) for request_id in changes.outbox_sent],
                )
                await _many(
                    conn,
                    "INSERT INTO olmstead_user_identities (account_id, user_id, data) "
                    "VALUES ($1, $2, $3) ON CONFLICT (account_id, user_id) DO UPDATE SET "
                    "data = excluded.data",
                    a,
                    changes.user_identities,
                )
                for key, value in {**changes.values, LAST_COMMIT: commit_id}.items():
                    if value is None:
                        await conn.execute(
                            "DELETE FROM olmstead_kv WHERE account_id = $1 AND key = $2", a, key
                        )
                    else:
                        await conn.execute(
                            "INSERT INTO olmstead_kv (account_id, key, value) VALUES ($1, $2, "
                            "$3) ON CONFLICT (account_id, key) DO UPDATE SET value = "
                            "excluded.value",
                            a,
                            key,
                            value,
                        )

        return write

    async def count_secrets(self) -> dict[str, int]:
        async def count(conn: asyncpg.Connection) -> dict[str, int]:
            return {
                kind: int(
                    await conn.fetchval(
                        f"SELECT count(*) FROM {table} WHERE account_id = $1", self.account_id
                    )
                )
                for kind, (table, _key) in SECRET_TABLES.items()
            }

        return await self._run(count)

    async def _rekey(
        self,
        rewrap: dict[str, Callable[[str], str]],
        key_check: str,
        holder: str,
        generation: int,
        progress: Callable[[int], object] | None,
    ) -> None:
        a = self.account_id

        async def rekey(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                row = await conn.fetchrow(
                    "SELECT holder, generation FROM olmstead_lease WHERE account_id = $1 "
                    "FOR UPDATE",
                    a,
                )
                if row is None or row[0] != holder or row[1] != generation:
                    raise StoreLockLost(self.name, f"now held by {row[0] if row else 'nobody'}")
                for kind, (table, key) in SECRET_TABLES.items():
                    columns = ", ".join(key)
                    where = " AND ".join(f"{c} = ${i + 3}" for i, c in enumerate(key))
                    async for found in conn.cursor(
                        f"SELECT {columns}, pickle FROM {table} WHERE account_id = $1", a
                    ):
                        await conn.execute(
                            f"UPDATE {table} SET pickle = $2 WHERE account_id = $1 AND {where}",
                            a,
                            rewrap[kind](found["pickle"]),
                            *[found[c] for c in key],
                        )
                        if progress is not None:
                            progress(1)
                await conn.execute(
                    "UPDATE olmstead_meta SET value = $2 WHERE account_id = $1 AND "
                    "key = 'key_check'",
                    a,
                    key_check,
                )

        await self._run(rekey)

    # --- the lease -----------------------------------------------------------------------------

    async def _try_lock(self, holder: str, duration: float) -> LockRow:
        a = self.account_id

        async def take(conn: asyncpg.Connection) -> LockRow:
            await conn.execute(
                "INSERT INTO olmstead_lease VALUES ($1, '', 0, 0, 0) ON CONFLICT DO NOTHING", a
            )
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"SELECT holder, acquired_at, expires_at, generation, {_NOW} AS now "
                    "FROM olmstead_lease WHERE account_id = $1 FOR UPDATE",
                    a,
                )
                current = LockRow(row[0], row[1], row[2], row[3])
                new = next_lock_row(current, holder, duration, row[4])
                if new != current:
                    await conn.execute(
                        "UPDATE olmstead_lease SET holder = $2, acquired_at = $3, "
                        "expires_at = $4, generation = $5 WHERE account_id = $1",
                        a,
                        new.holder,
                        new.acquired_at,
                        new.expires_at,
                        new.generation,
                    )
                return new

        return await self._run(take)

    async def _unlock(self, holder: str) -> None:
        await self._run(
            lambda c: c.execute(
                "UPDATE olmstead_lease SET expires_at = 0 WHERE account_id = $1 AND holder = $2",
                self.account_id,
                holder,
            )
        )

    async def _close_backend(self) -> None:
        if self._database is not None:
            self._database._stores.discard(self)
        if self._owns_pool:
            await self._pool.close()


class PostgresDatabase:
    """One PostgreSQL database and one connection pool, handing out a store per account.

    For a bridge or any process with many devices: every account's reads, writes and
    lease renewals share ``pool_size`` connections, however many accounts there are
    (200 accounts run on 10). Each store still proves its own pickle key and holds
    its own writer lease.

        database = await PostgresDatabase.open("postgresql://bridge@db/bridge", pool_size=10)
        store = await database.open_store(PickleKey(key), account="@alice:example.org")
        ...
        await database.close()    # closes the stores it handed out, then the pool

    No named prepared statements unless ``prepared_statements=True``: the pool then
    works through pgbouncer in transaction mode. Connected straight to PostgreSQL,
    prepared statements save a parse per query (see docs/operations.md for what
    that was measured to be worth).
    """

    def __init__(self, dsn: str, pool: asyncpg.Pool, pool_size: int) -> None:
        self.name = f"PostgreSQL database {_redacted(dsn)}"
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool = pool
        self._stores: set[PostgresStore] = set()
        self._closed = False

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        pool_size: int = 10,
        prepared_statements: bool = False,
    ) -> PostgresDatabase:
        """Connect a pool of up to ``pool_size`` connections and bring the schema up to date.

        Raises ``StoreMigrationError``, ``StoreUnavailable`` or ``StoreError``.
        """
        if pool_size < 1:
            raise LocalProtocolError("pool_size must be at least 1")
        name = f"PostgreSQL database {_redacted(dsn)}"
        with _mapped(name):
            pool = await _create_pool(dsn, pool_size, prepared_statements=prepared_statements)
            try:
                await _migrate(pool, name)
            except BaseException:
                await pool.close()
                raise
        return cls(dsn, pool, pool_size)

    async def open_store(
        self,
        pickle_key: PickleKey,
        *,
        account: str = "default",
        lease: LeaseSettings | None = None,
        holder: str | None = None,
    ) -> PostgresStore:
        """The store of ``account`` on this database's pool (created if missing).

        Raises what ``PostgresStore.open`` raises. Closing the store leaves the pool open.
        """
        if self._closed:
            raise StoreError(f"{self.name} is closed")
        store = await PostgresStore.open(
            self.dsn,
            pickle_key,
            account=account,
            lease=lease,
            holder=holder,
            pool=self._pool,
            migrate=False,
        )
        self._stores.add(store)
        store._database = self
        return store

    async def close(self) -> None:
        """Close every store this database handed out (releasing their leases), then the pool."""
        if self._closed:
            return
        self._closed = True
        for store in list(self._stores):
            await store.close()
        await self._pool.close()

    async def __aenter__(self) -> PostgresDatabase:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def store_error(name: str, exc: BaseException) -> StoreError:
    """The ``StoreError`` that says what a failure of asyncpg, the network or the server
    was; ``name`` names the store. The one place the PostgreSQL backend maps them."""
    if isinstance(exc, StoreError):
        return exc
    sqlstate = getattr(exc, "sqlstate", None) or ""
    detail = str(exc).strip() or type(exc).__name__
    if sqlstate in ("26000", "42P05") or (
        "prepared statement" in detail and ("does not exist" in detail or "already" in detail)
    ):
        return StorePoolerRefused(name, detail)
    if sqlstate == "53300" or "too many clients" in detail or "connection slots" in detail:
        return StoreOutOfConnections(name, "the server has no connection left", detail)
    if sqlstate == "53100":
        return StoreDiskFull(name, "the database server's disk is full", detail)
    if sqlstate == "25006":
        return StoreReadOnly(
            name, "the server accepts no writes (a standby, or a read-only database)", detail
        )
    if sqlstate == "57P01":
        return StoreConnectionLost(
            name, "the server terminated the connection (an administrator, or a shutdown)", detail
        )
    if sqlstate == "57P02":
        return StoreConnectionLost(name, "the server crashed and closed the connection", detail)
    if sqlstate == "57P03":
        return StoreConnectionLost(name, "the server is starting up or shutting down", detail)
    if sqlstate == "55000" and "accepting connections" in detail:
        return StoreConnectionLost(name, "the database does not accept connections now", detail)
    if sqlstate.startswith("08") or isinstance(
        exc, asyncpg.PostgresConnectionError | ConnectionError
    ):
        return StoreConnectionLost(name, "the connection to the database broke", detail)
    if isinstance(exc, OSError | TimeoutError):
        return StoreConnectionLost(name, "the database server cannot be reached", detail)
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError) and (
        "closed" in detail or "in progress" in detail
    ):
        return StoreConnectionLost(name, "the connection to the database broke", detail)
    if sqlstate.startswith("28") or sqlstate == "3D000":
        return StoreError(
            f"{name}: the server refused the login or the database ({detail}). Check the "
            "DSN's user, password and database name, and the server's pg_hba.conf."
        )
    if sqlstate.startswith("53") or sqlstate.startswith("57"):
        return StoreUnavailable(name, "the server cannot serve this now", detail)
    return StoreError(f"{name}: {detail}")


def _breaks_connection(exc: BaseException) -> bool:
    """Whether the connection that raised ``exc`` may be unusable (not a plain SQL error)."""
    if not isinstance(exc, asyncpg.PostgresError):
        return True
    return str(getattr(exc, "sqlstate", "") or "").startswith(("08", "57"))


@contextlib.contextmanager
def _mapped(name: str) -> Iterator[None]:
    """Raise every driver failure inside as the ``StoreError`` that says what it was."""
    try:
        yield
    except StoreError as exc:  # raised inside: a lost lease, a wrong key
        metrics.store_error(type(exc).__name__)
        raise
    except DRIVER_ERRORS as exc:
        mapped = store_error(name, exc)
        metrics.store_error(type(mapped).__name__)
        raise mapped from exc


async def _create_pool(dsn: str, size: int, *, prepared_statements: bool) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=size,
        # no named prepared statements: a pooler in transaction mode (pgbouncer) hands
        # each transaction another server connection, where they do not exist
        statement_cache_size=100 if prepared_statements else 0,
        timeout=10,
    )
    return pool


@contextlib.asynccontextmanager
async def connect_mapped(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """One short-lived connection (no named statements), its failures as ``StoreError``."""
    with _mapped(f"PostgreSQL store {_redacted(dsn)}"):
        conn = await _connect(dsn)
        try:
            yield conn
        finally:
            await conn.close()


async def _connect(dsn: str) -> asyncpg.Connection:
    """One connection for a short read-only look (diagnosis); no named statements."""
    return await asyncpg.connect(dsn, statement_cache_size=0, timeout=10)


async def _read_lease(conn: asyncpg.Connection, account: str) -> tuple[LockRow | None, float]:
    row = await conn.fetchrow(
        f"SELECT holder, acquired_at, expires_at, generation, {_NOW} FROM olmstead_lease "
        "WHERE account_id = $1",
        account,
    )
    if row is None or row[0] == "":
        return None, 0.0 if row is None else row[4]
    return LockRow(row[0], row[1], row[2], row[3]), row[4]


async def _many(conn: asyncpg.Connection, sql: str, account: str, rows: list[Any]) -> None:
    if rows:
        await conn.executemany(sql, [(account, *row) for row in rows])


async def _migrate(pool: asyncpg.Pool, name: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS olmstead_schema (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM olmstead_schema") or 0
        latest = MIGRATIONS[-1][0]
        if version > latest:
            raise StoreMigrationError(
                f"{name} has schema version {version}, newer than this olmstead knows "
                f"({latest}): upgrade olmstead; downgrading a store is not supported."
            )
        # every step not yet recorded, not only those above the highest: numbers are
        # assigned per change, and a database may have run a later one first
        done = {row[0] for row in await conn.fetch("SELECT version FROM olmstead_schema")}
        for number, _description, sql in MIGRATIONS:
            if number not in done:
                await conn.execute(sql)
                await conn.execute("INSERT INTO olmstead_schema (version) VALUES ($1)", number)


async def _prove_existing(
    pool: asyncpg.Pool, account: str, pickle_key: PickleKey, name: str
) -> DerivedKey | None:
    """Check the key (and that the account unpickles) of an account that already exists."""
    async with pool.acquire() as conn:
        try:
            record = await conn.fetchval(
                "SELECT value FROM olmstead_meta WHERE account_id = $1 AND key = 'key_check'",
                account,
            )
        except asyncpg.UndefinedTableError:
            return None  # a new database: nothing to prove yet
        if record is None:
            return None
        derived = pickle_key.check(record, name)
        row = await conn.fetchrow(
            "SELECT user_id, device_id, pickle, state FROM olmstead_account WHERE account_id = $1",
            account,
        )
    if row is not None:
        account_from_row((row[0], row[1], row[2], row[3]), derived.key, name)
    return derived


async def _check_key(
    pool: asyncpg.Pool, account: str, pickle_key: PickleKey, name: str
) -> DerivedKey:
    """Prove the key against the account's key check; record one for a new account."""
    async with pool.acquire() as conn:
        query = "SELECT value FROM olmstead_meta WHERE account_id = $1 AND key = 'key_check'"
        record = await conn.fetchval(query, account)
        if record is None:
            fresh, _derived = pickle_key.new_key_check()
            await conn.execute(
                "INSERT INTO olmstead_meta (account_id, key, value) VALUES ($1, 'key_check', $2) "
                "ON CONFLICT DO NOTHING",
                account,
                fresh,
            )
            record = await conn.fetchval(query, account)  # ours, or a racing opener's
    return pickle_key.check(record, name)


def _redacted(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    return dsn.replace(f":{parts.password}@", ":***@", 1)
