"""What leaving out named prepared statements costs the PostgreSQL store, connected directly.

``python -m benchmarks.prepared_statements [--postgres DSN] [--lookups N] [--commits N]``

olmstead's pools prepare no named statements, so that they work behind a pooler in
transaction mode (pgbouncer); each query is then parsed and planned on every call.
This runs the same lookups and commits on two pools to one database, one with
asyncpg's statement cache (the default, 100 statements) and one without, taking
turns, and prints the median of each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import vodozemac

from benchmarks.store_size import DEFAULT_POSTGRES
from olmstead import Changes, InboundGroupSessionRecord, LeaseSettings, PickleKey
from olmstead.store.postgres import PostgresDatabase, PostgresStore

KEY = PickleKey(b"b" * 32)


async def _timed(store: PostgresStore, session_ids: list[str], commits: int) -> tuple[float, float]:
    started = time.perf_counter()
    for session_id in session_ids:
        await store.get_inbound_group_session("!room:bench", session_id)
    lookup = (time.perf_counter() - started) / len(session_ids)
    started = time.perf_counter()
    for n in range(commits):
        await store.save_changes(Changes(values={"sync_token": f"s{n}"}))
    commit = (time.perf_counter() - started) / commits
    return lookup, commit


async def run(
    dsn: str, lookups: int, commits: int, rounds: int = 5
) -> dict[str, tuple[float, float]]:
    """Median seconds per lookup and per commit, with and without prepared statements."""
    results: dict[str, list[tuple[float, float]]] = {"prepared": [], "unprepared": []}
    databases = {
        "prepared": await PostgresDatabase.open(dsn, pool_size=1, prepared_statements=True),
        "unprepared": await PostgresDatabase.open(dsn, pool_size=1),
    }
    account = f"bench-{uuid.uuid4().hex[:8]}"
    lease = LeaseSettings(duration=30.0, renew_every=10.0)
    try:
        setup = await databases["unprepared"].open_store(KEY, account=account, lease=lease)
        sessions = []
        for _ in range(100):
            outbound = vodozemac.GroupSession()
            inbound = vodozemac.InboundGroupSession(outbound.session_key)
            sessions.append(InboundGroupSessionRecord("!room:bench", "c", "e", inbound))
        await setup.save_changes(Changes(inbound_group_sessions=sessions))
        await setup.close()
        ids = [s.session_id for s in sessions] * (lookups // len(sessions) + 1)
        for _ in range(rounds):
            for kind, database in databases.items():
                store = await database.open_store(KEY, account=account, lease=lease)
                results[kind].append(await _timed(store, ids[:lookups], commits))
                await store.close()
    finally:
        for database in databases.values():
            await database.close()
    return {
        kind: (
            statistics.median(r[0] for r in rows),
            statistics.median(r[1] for r in rows),
        )
        for kind, rows in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prepared_statements")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--commits", type=int, default=200)
    args = parser.parse_args()
    figures = asyncio.run(run(args.postgres, args.lookups, args.commits))
    (p_lookup, p_commit), (u_lookup, u_commit) = figures["prepared"], figures["unprepared"]
    print(f"{'':22}{'prepared':>12}{'unprepared':>12}{'ratio':>8}")
    for label, (prepared, unprepared) in (
        ("session lookup", (p_lookup, u_lookup)),
        ("commit (one value)", (p_commit, u_commit)),
    ):
        ratio = unprepared / prepared
        print(f"{label:22}{prepared * 1e3:>10.3f}ms{unprepared * 1e3:>10.3f}ms{ratio:>7.2f}x")


if __name__ == "__main__":
    main()
