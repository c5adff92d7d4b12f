"""A store holding many inbound group sessions beside an empty one: open time, lookups, memory.

The full store is built once (``count`` real Megolm sessions, through
``save_changes`` in large batches) into a cache and reused by later runs: a
SQLite file in the cache directory, and for PostgreSQL an account in the
benchmark database whose name the cache directory records once it is complete.
Every measurement runs in a fresh subprocess (``benchmarks.store_probe``), so the
peak resident memory it reports (``ru_maxrss``) is that of one process opening the
store and looking sessions up; the empty store is measured the same way, the two
taking turns over a few rounds (the best times and the highest peak are kept).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import vodozemac

from benchmarks.peers import KEY
from benchmarks.table import Row, time_row
from olmstead import Changes, CryptoStore, OlmMachine, SqliteStore
from olmstead.store.base import InboundGroupSessionRecord

__all__ = ["DEFAULT_POSTGRES", "run"]

DEFAULT_POSTGRES = os.environ.get(
    "OLMSTEAD_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/olmstead_bench"
)
USER, DEVICE = "@bench:bench.example", "BENCH"
ROOMS = 1000
BUILD_BATCH = 5000
SAMPLE = 2000


async def _open(backend: str, where: str, account: str) -> CryptoStore:
    if backend == "sqlite":
        return await SqliteStore.open(where, KEY)
    from olmstead.store.postgres import PostgresStore

    return await PostgresStore.open(where, KEY, account=account)


async def _build(backend: str, where: str, account: str, count: int, progress: bool) -> list[Any]:
    """Fill a new store with ``count`` sessions; a random sample of their keys."""
    store = await _open(backend, where, account)
    sample: list[tuple[str, str]] = []
    rng = random.Random(7)
    try:
        await OlmMachine.open(store, USER, DEVICE)  # an account, as a real device's store has
        sender = vodozemac.Account()
        curve, ed = sender.curve25519_key.to_base64(), sender.ed25519_key.to_base64()
        started = time.monotonic()
        for start in range(0, count, BUILD_BATCH):
            batch = []
            for n in range(start, min(count, start + BUILD_BATCH)):
                session = vodozemac.InboundGroupSession(vodozemac.GroupSession().session_key)
                room = f"!room{n % ROOMS}:bench.example"
                batch.append(InboundGroupSessionRecord(room, curve, ed, session))
            await store.save_changes(Changes(inbound_group_sessions=batch))
            picks = rng.sample(batch, min(len(batch), max(1, SAMPLE * len(batch) // count)))
            sample.extend((r.room_id, r.session_id) for r in picks)
            if progress:
                done = start + len(batch)
                rate = done / (time.monotonic() - started)
                print(
                    f"  built {done:,} of {count:,} sessions ({rate:,.0f}/s)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await store.close()
    return sample[:SAMPLE]


async def _cached_sqlite(cache: Path, count: int) -> tuple[str, Path]:
    path = cache / f"sqlite-{count}.db"
    keys = cache / f"sqlite-{count}.keys.json"
    if not (path.exists() and keys.exists()):
        for stale in (path, keys):
            stale.unlink(missing_ok=True)
        building = cache / f"sqlite-{count}.{uuid.uuid4().hex[:8]}.building.db"
        print(f"building a SQLite store of {count:,} sessions in {path}", file=sys.stderr)
        sample = await _build("sqlite", str(building), "", count, count >= 100_000)
        for suffix in ("-wal", "-shm"):
            Path(f"{building}{suffix}").unlink(missing_ok=True)
        building.rename(path)
        keys.write_text(json.dumps(sample))
    return str(path), keys


async def _cached_postgres(cache: Path, dsn: str, count: int) -> tuple[str, Path]:
    """The account holding ``count`` sessions; built under a new name if none is complete."""
    marker = cache / f"postgres-{count}.json"
    if marker.exists():
        known = json.loads(marker.read_text())
        if known["dsn"] == dsn:
            return str(known["account"]), cache / f"postgres-{count}.keys.json"
    await _ensure_database(dsn)
    account = f"bench-{count}-{uuid.uuid4().hex[:8]}"
    print(f"building a PostgreSQL store of {count:,} sessions ({account})", file=sys.stderr)
    sample = await _build("postgres", dsn, account, count, count >= 100_000)
    keys = cache / f"postgres-{count}.keys.json"
    keys.write_text(json.dumps(sample))
    marker.write_text(json.dumps({"dsn": dsn, "account": account}))  # complete: reuse
    return account, keys


async def _ensure_database(dsn: str) -> None:
    """Create the benchmark database if the server lacks it (kept apart from test data)."""
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        name = dsn.rsplit("/", 1)[1].split("?")[0]
        admin = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres")
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return
    await conn.close()


#: runs the probe from a small interpreter: Linux carries a process's peak RSS across
#: fork and exec, so a probe started straight from this (large) process would report
#: this process's peak instead of its own
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


async def _probe(backend: str, where: str, account: str, keys: Path, opens: int) -> dict[str, Any]:
    """Run the probe in a fresh interpreter: its figures as JSON."""
    # from the checkout, whatever the caller's directory: the probe is part of this package
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-S",
        "-c",
        _LAUNCHER,
        sys.executable,
        "-m",
        "benchmarks.store_probe",
        backend,
        where,
        account,
        str(keys),
        str(opens),
        stdout=asyncio.subprocess.PIPE,
        cwd=root,
        env={**os.environ, "PYTHONPATH": path},
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the {backend} store probe failed ({process.returncode})")
    result: dict[str, Any] = json.loads(out)
    return result


async def _probes(
    backend: str, full: tuple[str, str], empty: tuple[str, str], keys: Path, opens: int, rounds: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full and the empty store probed in turns; the best times, the highest peak."""
    results: dict[str, list[dict[str, Any]]] = {"full": [], "empty": []}
    for _ in range(rounds):  # taking turns, so that noise from other processes hits both
        for name, (where, account) in (("empty", empty), ("full", full)):
            results[name].append(await _probe(backend, where, account, keys, opens))

    def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
        figures = {k: min(r[k] for r in runs) for k in ("open_ms", "p50_ms", "p99_ms")}
        return {
            **figures,
            "maxrss_mb": max(r["maxrss_mb"] for r in runs),
            "lookups": sum(r["lookups"] for r in runs),
            "found": sum(r["found"] for r in runs),
        }

    return best(results["full"]), best(results["empty"])


async def _empty(backend: str, directory: Path, dsn: str) -> tuple[str, str]:
    store: CryptoStore
    if backend == "sqlite":
        path = str(directory / "empty.db")
        store = await SqliteStore.open(path, KEY)
        account = ""
    else:
        await _ensure_database(dsn)
        from olmstead.store.postgres import PostgresStore

        path, account = dsn, f"bench-empty-{uuid.uuid4().hex[:8]}"
        store = await PostgresStore.open(dsn, KEY, account=account)
    try:
        await OlmMachine.open(store, USER, DEVICE)
    finally:
        await store.close()
    return path, account


async def run(
    count: int, backends: list[str], cache: Path, dsn: str, opens: int, rounds: int
) -> list[Row]:
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for backend in backends:
        if backend == "sqlite":
            where, keys = await _cached_sqlite(cache, count)
            account = ""
        else:
            account, keys = await _cached_postgres(cache, dsn, count)
            where = dsn
        with tempfile.TemporaryDirectory(prefix="olmstead-bench-") as tmp:
            empty_store = await _empty(backend, Path(tmp), dsn)
            full, empty = await _probes(backend, (where, account), empty_store, keys, opens, rounds)
        if full["found"] != full["lookups"]:
            raise AssertionError(f"{backend}: found {full['found']} of {full['lookups']} sessions")
        name = "SQLite" if backend == "sqlite" else "PostgreSQL"
        label = f"{name}, {count:,} sessions:"
        rows += [
            time_row(
                f"{label} open",
                full["open_ms"],
                empty["open_ms"],
                "empty store",
                None,
                extra=lambda ours, empty: ours <= 1.2 * empty,
                extra_words="<= 1.2x empty",
            ),
            time_row(f"{label} lookup p50", full["p50_ms"], empty["p50_ms"], "empty store", 0.5),
            time_row(f"{label} lookup p99", full["p99_ms"], empty["p99_ms"], "empty store", None),
            time_row(
                f"{label} peak memory",
                full["maxrss_mb"],
                empty["maxrss_mb"],
                "empty store",
                150,
                unit="MB",
            ),
        ]
    return rows
