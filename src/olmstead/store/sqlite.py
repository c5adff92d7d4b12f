"""The SQLite store: olmstead's embedded default, one file per device, in WAL mode.

All SQL runs on one worker thread per store, so the event loop never waits on the
disk and the connection is never shared between threads. ``synchronous=FULL``:
a commit that returned survives a power cut, not only a killed process, because
keys leave the machine right after their commit.

Opening is read-only until the pickle key is proven: a wrong key or a damaged
file is reported before a single byte is written. A missing file is created; an
existing file that is empty or not an olmstead store is refused, never reused,
since starting a new account there would give the device a new identity.

A new store, its -wal and -shm files and its copies are created 0600, whatever
the umask. Failures of SQLite and the file system are mapped in ``_store_error``:
a full disk (``StoreDiskFull``), a read-only file (``StoreReadOnly``), a file
replaced or removed while open (``StoreFileReplaced``), damage (``StoreCorrupt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import TypeVar

from olmstead import metrics
from olmstead.errors import (
    StoreCorrupt,
    StoreDiskFull,
    StoreError,
    StoreFileReplaced,
    StoreLockLost,
    StoreMigrationError,
    StoreReadOnly,
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
from olmstead.store.files import create_private, link_into_place, read_only_uri
from olmstead.store.migrations.sqlite import MIGRATIONS
from olmstead.store.pickle_key import DerivedKey, PickleKey

__all__ = ["SqliteStore"]

T = TypeVar("T")
LATEST_VERSION = MIGRATIONS[-1][0]
_LEASE_NAME = "device"
#: values bound per ``IN (...)`` list: well under SQLite's limit on parameters
_IN_CHUNK = 500
#: where each kind of pickle lives: what rekey rewrites and count_secrets counts
SECRET_TABLES = {
    "account": "account",
    "olm": "olm_sessions",
    "inbound": "inbound_group_sessions",
    "outbound": "outbound_group_sessions",
    "cross_signing": "cross_signing",
}


class SqliteStore(CryptoStore):
    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        key: DerivedKey,
        lease: LeaseSettings,
        holder: str,
    ) -> None:
        super().__init__(f"SQLite store {path}", key, lease, holder)
        self.path = path
        self._conn = conn
        self._executor = executor
        # the file this connection has open: a write checks the path still names it
        self._file_id = _file_id(path)

    @classmethod
    async def open(
        cls,
        path: str | Path,
        pickle_key: PickleKey,
        *,
        lease: LeaseSettings | None = None,
        holder: str | None = None,
    ) -> SqliteStore:
        """Open (or create) the store at ``path``, prove the key, take the writer lease.

        Raises ``WrongPickleKey``, ``StoreCorrupt``, ``StoreMigrationError`` or
        ``StoreLocked``; in every one of those cases nothing was written.
        """
        path = Path(path)
        name = f"SQLite store {path}"
        executor = ThreadPoolExecutor(1, thread_name_prefix="olmstead-sqlite")
        loop = asyncio.get_running_loop()
        try:
            conn, derived = await loop.run_in_executor(
                executor, _open_and_check, path, name, pickle_key
            )
        except (sqlite3.DatabaseError, OSError) as exc:  # a new store on a full disk, …
            executor.shutdown(wait=False)
            raise _store_error(name, exc) from exc
        except BaseException:
            executor.shutdown(wait=False)
            raise
        store = cls(
            path, conn, executor, derived, lease or LeaseSettings(), holder or new_holder_name()
        )
        try:
            await store._start()
            await store._run(_migrate, conn, name)
        except BaseException:
            await store.close()
            raise
        return store

    @staticmethod
    def inspect(path: str | Path, pickle_key: PickleKey) -> Inspection:
        """Prove ``pickle_key`` and read the account, writing nothing: no lease, no migration.

        For diagnosis: it neither waits for nor disturbs a process that holds the
        store. Raises ``WrongPickleKey`` or ``StoreCorrupt`` as ``open`` does.
        """
        path = Path(path)
        name = f"SQLite store {path}"
        conn, derived = _open_and_check(path, name, pickle_key, read_only=True)
        try:
            row = conn.execute(
                "SELECT user_id, device_id, pickle, state FROM account WHERE id = 1"
            ).fetchone()
            version, lock = _version(conn), _lock_row(conn)
            drained = conn.execute("SELECT value FROM kv WHERE key = ?", (DRAINED,)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(name, str(exc)) from exc
        finally:
            conn.close()
        record = None if row is None else account_from_row(tuple(row), derived.key, name)
        return Inspection(
            name,
            derived.fingerprint,
            record,
            version,
            LATEST_VERSION,
            lock,
            time.time(),
            None if drained is None else str(drained[0]),
        )

    @staticmethod
    def read_lease(path: str | Path) -> LockRow | None:
        """The writer lease as it stands, read-only (it needs no key)."""
        try:
            with closing(sqlite3.connect(read_only_uri(path), uri=True)) as conn:
                return _lock_row(conn)
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(f"SQLite store {path}", str(exc)) from exc

    @staticmethod
    def release_stale_lease(path: str | Path, holder: str) -> bool:
        """Mark ``holder``'s lease released if it ran out (a process that died holding it).

        Whether it did: a lease that was renewed or taken meanwhile is left alone.
        """
        with closing(_connect(Path(path))) as conn:

            def release(conn: sqlite3.Connection) -> bool:
                cursor = conn.execute(
                    "UPDATE lease_lock SET expires_at = 0 WHERE name = ? AND holder = ? "
                    "AND expires_at > 0 AND expires_at <= ?",
                    (_LEASE_NAME, holder, time.time()),
                )
                return cursor.rowcount == 1

            return _transaction(conn, release)

    async def copy_to(self, target: str | Path) -> None:
        """A consistent copy of the whole store at ``target`` (mode 0600), under the same key."""

        def copy() -> None:
            create_private(target)  # VACUUM INTO fills an empty file, keeping its mode
            try:
                self._conn.execute("VACUUM INTO ?", (str(target),))
            except BaseException:
                os.unlink(target)
                raise

        await self._run(copy)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except StoreError as exc:  # raised on the worker: a lost lease, a replaced file
            metrics.store_error(type(exc).__name__)
            raise
        except (sqlite3.DatabaseError, OSError) as exc:
            mapped = _store_error(self.name, exc)
            metrics.store_error(type(mapped).__name__)
            raise mapped from exc

    async def _load_account_row(self) -> tuple[str, str, str, str] | None:
        def read() -> tuple[str, str, str, str] | None:
            row = self._conn.execute(
                "SELECT user_id, device_id, pickle, state FROM account WHERE id = 1"
            ).fetchone()
            return None if row is None else (row[0], row[1], row[2], row[3])

        return await self._run(read)

    async def get_value(self, key: str) -> str | None:
        def read() -> str | None:
            row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._run(read)

    async def _device_rows(self, user_id: str) -> list[tuple[str, str]]:
        def read() -> list[tuple[str, str]]:
            rows = self._conn.execute(
                "SELECT device_id, data FROM devices WHERE user_id = ?", (user_id,)
            ).fetchall()
            return [(row[0], row[1]) for row in rows]

        return await self._run(read)

    async def _device_rows_of(self, user_ids: list[str]) -> list[tuple[str, str, str]]:
        def read() -> list[tuple[str, str, str]]:
            sql = "SELECT user_id, device_id, data FROM devices WHERE user_id IN ({})"
            return [(r[0], r[1], r[2]) for r in _rows_in(self._conn, sql, (), user_ids)]

        return await self._run(read)

    async def _device_row_by_curve25519(self, key: str) -> tuple[str, str, str] | None:
        def read() -> tuple[str, str, str] | None:
            row = self._conn.execute(
                "SELECT user_id, device_id, data FROM devices WHERE curve25519 = ?", (key,)
            ).fetchone()
            return None if row is None else (row[0], row[1], row[2])

        return await self._run(read)

    async def _identity_rows_of(self, user_ids: list[str]) -> list[tuple[str, str]]:
        def read() -> list[tuple[str, str]]:
            sql = "SELECT user_id, data FROM user_identities WHERE user_id IN ({})"
            return [(r[0], r[1]) for r in _rows_in(self._conn, sql, (), user_ids)]

        return await self._run(read)

    async def _cross_signing_row(self) -> tuple[str, str] | None:
        def read() -> tuple[str, str] | None:
            row = self._conn.execute("SELECT pickle, state FROM cross_signing").fetchone()
            return None if row is None else (row[0], row[1])

        return await self._run(read)

    async def get_tracked_users(self) -> dict[str, bool]:
        def read() -> dict[str, bool]:
            rows = self._conn.execute("SELECT user_id, outdated FROM tracked_users").fetchall()
            return {row[0]: bool(row[1]) for row in rows}

        return await self._run(read)

    async def _olm_session_rows(self, sender_key: str) -> list[tuple[str, float, float]]:
        def read() -> list[tuple[str, float, float]]:
            rows = self._conn.execute(
                "SELECT pickle, created_at, last_used FROM olm_sessions WHERE sender_key = ?",
                (sender_key,),
            ).fetchall()
            return [(row[0], row[1], row[2]) for row in rows]

        return await self._run(read)

    async def _olm_session_rows_of(
        self, sender_keys: list[str]
    ) -> list[tuple[str, str, float, float]]:
        def read() -> list[tuple[str, str, float, float]]:
            sql = (
                "SELECT sender_key, pickle, created_at, last_used FROM olm_sessions "
                "WHERE sender_key IN ({})"
            )
            rows = _rows_in(self._conn, sql, (), sender_keys)
            return [(r[0], r[1], r[2], r[3]) for r in rows]

        return await self._run(read)

    async def _inbound_group_row(
        self, room_id: str, session_id: str
    ) -> tuple[str, str, str] | None:
        def read() -> tuple[str, str, str] | None:
            row = self._conn.execute(
                "SELECT sender_key, signing_key, pickle FROM inbound_group_sessions "
                "WHERE room_id = ? AND session_id = ?",
                (room_id, session_id),
            ).fetchone()
            return None if row is None else (row[0], row[1], row[2])

        return await self._run(read)

    async def _outbound_group_row(self, room_id: str) -> tuple[str, str] | None:
        def read() -> tuple[str, str] | None:
            row = self._conn.execute(
                "SELECT pickle, state FROM outbound_group_sessions WHERE room_id = ?", (room_id,)
            ).fetchone()
            return None if row is None else (row[0], row[1])

        return await self._run(read)

    async def _inbound_group_page(
        self, after: tuple[str, str], limit: int
    ) -> list[tuple[str, str, str, str, str]]:
        def read() -> list[tuple[str, str, str, str, str]]:
            rows = self._conn.execute(
                "SELECT room_id, session_id, sender_key, signing_key, pickle "
                "FROM inbound_group_sessions WHERE (room_id, session_id) > (?, ?) "
                "ORDER BY room_id, session_id LIMIT ?",
                (*after, limit),
            ).fetchall()
            return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

        return await self._run(read)

    async def get_message_index(self, session_id: str, index: int) -> MessageIndex | None:
        def read() -> MessageIndex | None:
            row = self._conn.execute(
                "SELECT event_id, origin_ts FROM megolm_message_indices "
                "WHERE session_id = ? AND message_index = ?",
                (session_id, index),
            ).fetchone()
            return None if row is None else MessageIndex(session_id, index, row[0], row[1])

        return await self._run(read)

    async def get_message_indices(
        self, session_id: str, indices: Collection[int]
    ) -> dict[int, MessageIndex]:
        wanted = sorted(set(indices))

        def read() -> dict[int, MessageIndex]:
            sql = (
                "SELECT message_index, event_id, origin_ts FROM megolm_message_indices "
                "WHERE session_id = ? AND message_index IN ({})"
            )
            return {
                index: MessageIndex(session_id, index, event_id, origin_ts)
                for index, event_id, origin_ts in _rows_in(self._conn, sql, (session_id,), wanted)
            }

        return await self._run(read) if wanted else {}

    async def _waiting_rows(
        self, session_ids: list[str] | None
    ) -> list[tuple[str, str, str, str, float, int]]:
        def read() -> list[tuple[str, str, str, str, float, int]]:
            columns = "room_id, event_id, session_id, event, received_at, position"
            if session_ids is None:
                rows = self._conn.execute(f"SELECT {columns} FROM waiting_room_events").fetchall()
            else:
                sql = f"SELECT {columns} FROM waiting_room_events WHERE session_id IN ({{}})"
                rows = _rows_in(self._conn, sql, (), session_ids)
            found = [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]
            return sorted(found, key=lambda r: (r[4], r[5]))

        return await self._run(read)

    async def count_waiting_events(self) -> int:
        def count() -> int:
            return int(self._conn.execute("SELECT count(*) FROM waiting_room_events").fetchone()[0])

        return await self._run(count)

    async def _withheld_rows(
        self, room_id: str, session_id: str
    ) -> list[tuple[str, str, str, str]]:
        def read() -> list[tuple[str, str, str, str]]:
            rows = self._conn.execute(
                "SELECT sender_key, sender, code, reason FROM withheld_sessions "
                "WHERE room_id = ? AND session_id = ?",
                (room_id, session_id),
            ).fetchall()
            return [(r[0], r[1], r[2], r[3]) for r in rows]

        return await self._run(read)

    async def _outbox_rows(self) -> list[tuple[str, float, str]]:
        def read() -> list[tuple[str, float, str]]:
            rows = self._conn.execute(
                "SELECT request_id, created_at, data FROM outbox ORDER BY created_at, rowid"
            ).fetchall()
            return [(r[0], r[1], r[2]) for r in rows]

        return await self._run(read)

    def _check_in_place(self) -> None:
        """Refuse to write to a file the path no longer names (SQLite would, silently)."""
        try:
            now = _file_id(self.path)
        except FileNotFoundError:
            raise StoreFileReplaced(self.name, "the file is gone") from None
        if now != self._file_id:
            raise StoreFileReplaced(self.name, "another file now has its name")

    async def _write(self, changes: SerializedChanges, holder: str, generation: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            self._check_in_place()
            row = _lock_row(conn)
            if row is None or row.holder != holder or row.generation != generation:
                raise StoreLockLost(self.name, f"now held by {row.holder if row else 'nobody'}")
            if changes.account is not None:
                conn.execute(
                    "INSERT INTO account (id, user_id, device_id, pickle, state) "
                    "VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                    "user_id = excluded.user_id, device_id = excluded.device_id, "
                    "pickle = excluded.pickle, state = excluded.state",
                    changes.account,
                )
            if changes.cross_signing is not None:
                conn.execute(
                    "INSERT INTO cross_signing (id, pickle, state) VALUES (1, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET pickle = excluded.pickle, "
                    "state = excluded.state",
                    changes.cross_signing,
                )
            conn.executemany(
                "INSERT INTO devices (user_id, device_id, curve25519, data) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user_id, device_id) DO UPDATE SET "
                "curve25519 = excluded.curve25519, data = excluded.data",
                changes.devices,
            )
            conn.executemany(
                "INSERT INTO tracked_users (user_id, outdated) VALUES (?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET outdated = excluded.outdated",
                list(changes.tracked_users.items()),
            )
            conn.executemany(
                "DELETE FROM tracked_users WHERE user_id = ?",
                [(user_id,) for user_id in changes.untracked_users],
            )
            conn.executemany(
                "INSERT INTO olm_sessions (sender_key, session_id, pickle, created_at, last_used) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (sender_key, session_id) DO UPDATE SET "
                "pickle = excluded.pickle, last_used = excluded.last_used",
                changes.olm_sessions,
            )
            conn.executemany(
                "INSERT INTO inbound_group_sessions "
                "(room_id, session_id, sender_key, signing_key, pickle) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (room_id, session_id) DO UPDATE SET pickle = excluded.pickle",
                changes.inbound_group_sessions,
            )
            conn.executemany(
                "INSERT INTO outbound_group_sessions (room_id, pickle, state) VALUES (?, ?, ?) "
                "ON CONFLICT (room_id) DO UPDATE SET pickle = excluded.pickle, "
                "state = excluded.state",
                changes.outbound_group_sessions,
            )
            conn.executemany(
                "DELETE FROM outbound_group_sessions WHERE room_id = ?",
                [(room_id,) for room_id in changes.discarded_outbound],
            )
            conn.executemany(
                "INSERT INTO megolm_message_indices (session_id, message_index, event_id, "
                "origin_ts) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                changes.message_indices,
            )
            conn.executemany(
                "INSERT INTO waiting_room_events (room_id, event_id, session_id, event, "
                "received_at, position) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                changes.waiting_events,
            )
            conn.executemany(
                "DELETE FROM waiting_room_events WHERE room_id = ? AND event_id = ?",
                list(changes.settled_events),
            )
            conn.executemany(
                "INSERT INTO withheld_sessions (room_id, session_id, sender_key, sender, code, "
                "reason) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (room_id, session_id, sender_key) "
                "DO UPDATE SET sender = excluded.sender, code = excluded.code, "
                "reason = excluded.reason",
                changes.withheld,
            )
            conn.executemany(
                "INSERT INTO outbox (request_id, created_at, data) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                changes.outbox,
            )
            conn.executemany(
                "DELETE FROM outbox WHERE request_id = ?",
                [(request_id,) for request_id in changes.outbox_sent],
            )
            conn.executemany(
                "INSERT INTO user_identities (user_id, data) VALUES (?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET data = excluded.data",
                changes.user_identities,
            )
            for key, value in changes.values.items():
                if value is None:
                    conn.execute("DELETE FROM kv WHERE key = ?", (key,))
                else:
                    conn.execute(
                        "INSERT INTO kv (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (key, value),
                    )

        await self._run(_transaction, self._conn, write)

    async def count_secrets(self) -> dict[str, int]:

        def count() -> dict[str, int]:
            return {
                kind: int(self._conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                for kind, table in SECRET_TABLES.items()
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

        def rekey(conn: sqlite3.Connection) -> None:
            self._check_in_place()
            row = _lock_row(conn)
            if row is None or row.holder != holder or row.generation != generation:
                raise StoreLockLost(self.name, f"now held by {row.holder if row else 'nobody'}")
            for kind, table in SECRET_TABLES.items():
                last = 0
                while True:  # a page at a time, by rowid: memory stays flat
                    page = conn.execute(
                        f"SELECT rowid, pickle FROM {table} WHERE rowid > ? "
                        "ORDER BY rowid LIMIT 500",
                        (last,),
                    ).fetchall()
                    for rowid, pickle in page:
                        conn.execute(
                            f"UPDATE {table} SET pickle = ? WHERE rowid = ?",
                            (rewrap[kind](pickle), rowid),
                        )
                        if progress is not None:
                            progress(1)
                    if len(page) < 500:
                        break
                    last = page[-1][0]
            conn.execute("UPDATE meta SET value = ? WHERE key = 'key_check'", (key_check,))

        await self._run(_transaction, self._conn, rekey)

    async def _try_lock(self, holder: str, duration: float) -> LockRow:
        def take(conn: sqlite3.Connection) -> LockRow:
            self._check_in_place()
            row = _lock_row(conn)
            new = next_lock_row(row, holder, duration, time.time())
            if new != row:
                _put_lock_row(conn, new)
            return new

        return await self._run(_transaction, self._conn, take)

    async def _unlock(self, holder: str) -> None:
        def release(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE lease_lock SET expires_at = 0 WHERE name = ? AND holder = ?",
                (_LEASE_NAME, holder),
            )

        await self._run(_transaction, self._conn, release)

    async def _close_backend(self) -> None:
        await self._run(self._conn.close)
        self._executor.shutdown(wait=True)


# --- runs on the store's worker thread -----------------------------------------------------


#: SQLite's primary result codes that _store_error tells apart
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_IOERR = 5, 6, 8, 10
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26
#: SQLITE_READONLY_DBMOVED: the file was renamed, removed or replaced while open
_SQLITE_READONLY_DBMOVED = _SQLITE_READONLY | (4 << 8)


def _store_error(name: str, exc: sqlite3.DatabaseError | OSError) -> StoreError:
    """The ``StoreError`` that says what a failure of SQLite or the file system was: the
    one place the SQLite backend maps them. Only damage is ``StoreCorrupt``."""
    text = str(exc)
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return StoreDiskFull(name, "the disk is full", text)
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return StoreReadOnly(name, "the file or its file system accepts no writes", text)
        return StoreError(f"{name}: the file system failed ({text}): check the disk.")
    code = getattr(exc, "sqlite_errorcode", None) or 0
    primary = code & 0xFF
    if code == _SQLITE_READONLY_DBMOVED:
        return StoreFileReplaced(name, text)
    if primary == _SQLITE_FULL:
        return StoreDiskFull(name, "the disk is full", text)
    if primary == _SQLITE_READONLY:
        return StoreReadOnly(name, "the file or its file system accepts no writes", text)
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in text:
        return StoreError(
            f"{name} stayed busy for 30 s ({text}): another process keeps a transaction "
            "open on it. Find that process; olmstead holds transactions for milliseconds."
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in text:
        return StoreCorrupt(name, text)
    if isinstance(exc, sqlite3.OperationalError) or primary == _SQLITE_IOERR:
        return StoreError(
            f"{name} could not be read or written ({text}): check the disk (space, "
            "permissions, a read-only mount). The store itself is not known to be damaged; "
            "do not restore an older copy, which would roll its keys back."
        )
    return StoreCorrupt(name, text)


def _rows_in(
    conn: sqlite3.Connection, sql: str, fixed: tuple[object, ...], values: Sequence[object]
) -> list[sqlite3.Row]:
    """Rows of ``sql`` whose ``IN ({})`` takes ``values``, in chunks that stay under
    SQLite's parameter limit (999 in older builds); ``fixed`` parameters come first."""
    rows: list[sqlite3.Row] = []
    for start in range(0, len(values), _IN_CHUNK):
        chunk = values[start : start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        rows.extend(conn.execute(sql.format(marks), (*fixed, *chunk)).fetchall())
    return rows


def _transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        # a failed COMMIT (a full disk) leaves the transaction open; a full disk or an
        # I/O error may already have rolled it back: either way, none of it stays
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return result


def _lock_row(conn: sqlite3.Connection) -> LockRow | None:
    row = conn.execute(
        "SELECT holder, acquired_at, expires_at, generation FROM lease_lock WHERE name = ?",
        (_LEASE_NAME,),
    ).fetchone()
    return None if row is None else LockRow(row[0], row[1], row[2], row[3])


def _put_lock_row(conn: sqlite3.Connection, row: LockRow) -> None:
    conn.execute(
        "INSERT INTO lease_lock (name, holder, acquired_at, expires_at, generation) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
        "acquired_at = excluded.acquired_at, expires_at = excluded.expires_at, "
        "generation = excluded.generation",
        (_LEASE_NAME, row.holder, row.acquired_at, row.expires_at, row.generation),
    )


def _connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    # read-only: no checkpoint on close, so a dead holder's log stays as it was found
    target = read_only_uri(path) if read_only else str(path)
    conn = sqlite3.connect(
        target, isolation_level=None, check_same_thread=False, timeout=30, uri=read_only
    )
    try:
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def _open_and_check(
    path: Path, name: str, pickle_key: PickleKey, *, read_only: bool = False
) -> tuple[sqlite3.Connection, DerivedKey]:
    """Connect and prove the key, writing nothing unless the store is new (and not
    ``read_only``, which never creates one)."""
    if not path.exists():
        if read_only:
            raise StoreCorrupt(name, "there is no such file")
        return _create(path, name, pickle_key)
    if path.stat().st_size == 0:
        raise StoreCorrupt(name, "the file is empty")
    try:
        conn = _connect(path, read_only)
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(name, str(exc)) from exc
    try:
        version = _version(conn)
        if version == 0:
            raise StoreCorrupt(name, "the file is an SQLite database but not an olmstead store")
        if version > LATEST_VERSION:
            raise StoreMigrationError(
                f"{name} has schema version {version}, newer than this olmstead knows "
                f"({LATEST_VERSION}). It was written by a newer olmstead: upgrade olmstead; "
                "downgrading a store is not supported."
            )
        row = conn.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
        if row is None:
            raise StoreCorrupt(name, "the pickle key check record is missing")
        derived = pickle_key.check(row[0], name)
        # the account too, before the lease or a migration writes anything
        account = conn.execute(
            "SELECT user_id, device_id, pickle, state FROM account WHERE id = 1"
        ).fetchone()
        if account is not None:
            account_from_row(tuple(account), derived.key, name)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreCorrupt(name, str(exc)) from exc
    except BaseException:
        conn.close()
        raise
    return conn, derived


def _file_id(path: Path) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _create(path: Path, name: str, pickle_key: PickleKey) -> tuple[sqlite3.Connection, DerivedKey]:
    """Build a new store beside ``path`` and link it into place only once it is complete.

    A crash while building leaves a stray temp file, never a half-made store at ``path``
    (which ``open`` would then refuse as not an olmstead store).
    """
    record, _derived = pickle_key.new_key_check()
    building = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.building")
    try:
        create_private(building)  # 0600: SQLite gives the -wal and -shm files this mode too
    except OSError as exc:
        raise _store_error(name, exc) from exc
    try:
        conn = _connect(building)
        try:
            conn.execute("PRAGMA journal_mode = WAL")

            def init(conn: sqlite3.Connection) -> None:
                _apply(conn, 0)
                conn.execute("INSERT INTO meta (key, value) VALUES ('key_check', ?)", (record,))

            _transaction(conn, init)
        finally:
            conn.close()
    except BaseException:
        for leftover in (
            building,
            *(building.with_name(building.name + s) for s in ("-wal", "-shm")),
        ):
            leftover.unlink(missing_ok=True)
        raise
    link_into_place(building, path)  # another process's store, if it was first, stays
    return _open_and_check(path, name, pickle_key)


def _apply(conn: sqlite3.Connection, after: int) -> None:
    for number, _description, _sql in MIGRATIONS:
        if number > after:
            _apply_one(conn, number)


def _migrate(conn: sqlite3.Connection, name: str) -> None:
    """Bring the schema up to date, one transaction per step (called holding the lease).

    Numbers are handed out per change, so a store may be at 8 without 7 (made by a
    build that had 8 before 7 was merged): a step below the version whose tables are
    all missing is applied too, and the version never goes down.
    """
    for number, description, _sql in MIGRATIONS:

        def step(conn: sqlite3.Connection, number: int = number) -> None:
            if _version(conn) < number or _tables_missing(conn, number):
                _apply_one(conn, number)

        try:
            _transaction(conn, step)
        except sqlite3.DatabaseError as exc:
            raise StoreMigrationError(
                f"{name}: migration {number} ({description}) failed: {exc}. The store was "
                f"left at schema version {_version(conn)}; restore it from a backup or report "
                "this with the file."
            ) from exc


def _tables_missing(conn: sqlite3.Connection, number: int) -> bool:
    """Whether step ``number`` creates tables and none of them exists."""
    sql = next(s for n, _d, s in MIGRATIONS if n == number)
    tables = re.findall(r"CREATE TABLE (\w+)", sql)
    if not tables:
        return False
    marks = ", ".join("?" for _ in tables)
    found = conn.execute(
        f"SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ({marks})", tables
    ).fetchone()[0]
    return int(found) == 0


def _apply_one(conn: sqlite3.Connection, number: int) -> None:
    sql = next(s for n, _d, s in MIGRATIONS if n == number)
    for statement in sql.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {max(number, _version(conn))}")
