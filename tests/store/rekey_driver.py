"""Rekeys a store and SIGKILLs itself after a given number of rows, for test_rekey_crash.py.

rekey_driver.py STORE KILL_AT    # STORE: SQLite path, or postgresql://…#account
                                 # KILL_AT: a row count, or "committed"
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from olmstead import CryptoStore, LeaseSettings, SqliteStore
from olmstead.store.postgres import PostgresStore
from tests.conftest import KEY, OTHER_KEY

LEASE = LeaseSettings(duration=0.5, renew_every=0.15, wait=10.0)


async def open_store(spec: str, key: object) -> CryptoStore:
    if spec.startswith("postgresql://"):
        dsn, account = spec.split("#")
        return await PostgresStore.open(
            dsn, KEY if key is KEY else OTHER_KEY, account=account, lease=LEASE
        )
    return await SqliteStore.open(spec, KEY if key is KEY else OTHER_KEY, lease=LEASE)


async def main() -> None:
    spec, kill_at = sys.argv[1], sys.argv[2]
    store = await open_store(spec, KEY)
    done = 0

    def progress(count: int) -> None:
        nonlocal done
        done += count
        if kill_at != "committed" and done == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    await store.rekey(OTHER_KEY, progress=progress)
    os.kill(os.getpid(), signal.SIGKILL)  # "committed": dies right after the commit


if __name__ == "__main__":
    asyncio.run(main())
