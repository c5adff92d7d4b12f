"""Run in a fresh interpreter by ``store_size``: open a store, look sessions up, report JSON.

``python -m benchmarks.store_probe BACKEND WHERE ACCOUNT KEYS_JSON OPENS``. Opening
is the device's whole start: the store (key check, lease, migrations) and the
machine (its account). The median of ``OPENS`` opens is reported, then each
sampled session is looked up once, in a shuffled order, and timed alone. The
peak resident memory of this process comes last.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.peers import KEY
from olmstead import CryptoStore, OlmMachine, SqliteStore

USER, DEVICE = "@bench:bench.example", "BENCH"


async def _open(backend: str, where: str, account: str) -> CryptoStore:
    if backend == "sqlite":
        return await SqliteStore.open(where, KEY)
    from olmstead.store.postgres import PostgresStore

    return await PostgresStore.open(where, KEY, account=account)


async def probe(backend: str, where: str, account: str, keys: Path, opens: int) -> dict[str, Any]:
    sample = [tuple(pair) for pair in json.loads(keys.read_text())]
    random.Random(11).shuffle(sample)
    open_times = []
    for _ in range(opens):
        started = time.perf_counter()
        store = await _open(backend, where, account)
        await OlmMachine.open(store, USER, DEVICE)
        open_times.append((time.perf_counter() - started) * 1000)
        await store.close()
    store = await _open(backend, where, account)
    latencies, found = [], 0
    try:
        for room_id, session_id in sample:
            started = time.perf_counter()
            record = await store.get_inbound_group_session(room_id, session_id)
            latencies.append((time.perf_counter() - started) * 1000)
            found += record is not None
    finally:
        await store.close()
    latencies.sort()
    return {
        "open_ms": statistics.median(open_times),
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)],
        "lookups": len(latencies),
        "found": found,
        # Linux reports kilobytes
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    backend, where, account, keys, opens = sys.argv[1:6]
    result = asyncio.run(probe(backend, where, account, Path(keys), int(opens)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
