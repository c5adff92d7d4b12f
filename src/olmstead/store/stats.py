"""``olmstead store stats``: rows and bytes per table of a store, read-only, no key needed.

For an operator watching a store grow over months. SQLite sizes are the pages each
table and its indexes occupy (SQLite's ``dbstat``; where a build lacks it, the
bytes of the stored values); PostgreSQL sizes are the bytes of one account's rows
(``pg_column_size``), indexes not counted, since accounts share them.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from olmstead.errors import StoreCorrupt
from olmstead.store.files import read_only_uri

__all__ = ["TableStats", "postgres_table_stats", "sqlite_table_stats"]


@dataclass(frozen=True)
class TableStats:
    table: str
    rows: int
    #: bytes on disk (SQLite: pages of the table and its indexes) or of the rows (PostgreSQL)
    bytes: int


def sqlite_table_stats(path: str | Path) -> list[TableStats]:
    """Every table of the SQLite store at ``path``. Raises ``StoreCorrupt`` if it is unreadable."""
    try:
        with closing(sqlite3.connect(read_only_uri(path), uri=True)) as conn:
            owners = dict(
                conn.execute(
                    "SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"
                ).fetchall()
            )
            tables = sorted(
                name
                for (name,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%'"
                )
            )
            sizes = dict.fromkeys(tables, 0)
            try:
                for name, size in conn.execute(
                    "SELECT name, sum(pgsize) FROM dbstat GROUP BY name"
                ):
                    owner = owners.get(name, name)
                    if owner in sizes:
                        sizes[owner] += int(size)
            except sqlite3.OperationalError:  # built without dbstat: the values' bytes
                for table in tables:
                    columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
                    total = " + ".join(f'coalesce(length("{c}"), 0)' for c in columns) or "0"
                    sizes[table] = int(
                        conn.execute(f'SELECT coalesce(sum({total}), 0) FROM "{table}"').fetchone()[
                            0
                        ]
                    )
            return [
                TableStats(
                    table,
                    int(conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]),
                    sizes[table],
                )
                for table in tables
            ]
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(f"SQLite store {path}", str(exc)) from exc


async def postgres_table_stats(dsn: str, account: str) -> list[TableStats]:
    """Every olmstead table's rows and bytes for ``account`` in the database at ``dsn``.

    Raises ``StoreUnavailable`` or ``StoreError`` when the database cannot be read.
    """
    from olmstead.store.postgres import connect_mapped  # asyncpg only when asked for

    async with connect_mapped(dsn) as conn:
        tables = [
            row[0]
            for row in await conn.fetch(
                "SELECT table_name FROM information_schema.columns WHERE column_name = "
                "'account_id' AND table_name LIKE 'olmstead_%' AND table_schema = "
                "current_schema() ORDER BY table_name"
            )
        ]
        found = []
        for table in tables:
            row = await conn.fetchrow(
                f"SELECT count(*), coalesce(sum(pg_column_size(t.*)), 0) FROM {table} t "
                "WHERE account_id = $1",
                account,
            )
            found.append(TableStats(table, int(row[0]), int(row[1])))
        return found
