"""A database and a role of their own on the test PostgreSQL, for tests that cut connections.

Terminating or refusing connections of this role and database leaves the rest of
the suite (and whoever else uses the server) untouched; the server itself is never
stopped.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.conftest import POSTGRES_DSN, postgres_or_skip


@dataclass
class DedicatedDatabase:
    """The DSN to hand olmstead, and the admin's levers over its connections."""

    dsn: str
    role: str
    database: str
    admin: asyncpg.Connection

    async def terminate(self) -> int:
        """End every connection of the role from the server side; how many there were."""
        killed = await self.admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE usename = $1 AND pid <> pg_backend_pid()",
            self.role,
        )
        return int(killed)

    async def refuse_connections(self) -> None:
        """The database down, as far as its clients can tell: no new connection, none left."""
        await self.admin.execute(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS false')
        await self.terminate()

    async def allow_connections(self) -> None:
        await self.admin.execute(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS true')

    async def connections(self) -> int:
        count = await self.admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", self.role
        )
        return int(count)


def dsn_for(role: str, database: str, host: str | None = None, port: int | None = None) -> str:
    parts = urlsplit(POSTGRES_DSN)
    netloc = f"{role}@{host or parts.hostname or '127.0.0.1'}:{port or parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", "", ""))


@asynccontextmanager
async def dedicated_database(prefix: str) -> AsyncIterator[DedicatedDatabase]:
    """A fresh role and database (dropped afterwards) on the test server."""
    await postgres_or_skip()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES_DSN)
    try:
        await admin.execute(f'CREATE ROLE "{name}" LOGIN')
        await admin.execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
        try:
            yield DedicatedDatabase(dsn_for(name, name), name, name, admin)
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                name,
            )
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
    finally:
        await admin.close()
