"""One process taking an SQLite store's writer lease, for test_lock_processes.py.

    lock_driver.py STORE EVENTS NAME --hold S --wait S

STORE is an SQLite path, or ``postgresql://…#account`` for a PostgreSQL account.

Appends JSON events (fsynced) to EVENTS: ``acquired`` (with the generation, what
the previous writer left and the device's ed25519 key), ``released``, or
``locked`` (with the holder that kept it out). Exits 3 on ``StoreLocked``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from olmstead import Changes, CryptoStore, LeaseSettings, OlmMachine, SqliteStore, StoreLocked
from olmstead.store.postgres import PostgresStore
from tests.conftest import KEY


def event(path: str, **fields: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"t": time.time(), "pid": os.getpid(), **fields}) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("events")
    parser.add_argument("name")
    parser.add_argument("--hold", type=float, required=True)
    parser.add_argument("--wait", type=float, required=True)
    args = parser.parse_args()
    lease = LeaseSettings(duration=1.0, renew_every=0.3, wait=args.wait, poll=0.05)
    try:
        if args.store.startswith("postgresql://"):
            dsn, account = args.store.split("#")
            store: CryptoStore = await PostgresStore.open(
                dsn, KEY, account=account, lease=lease, holder=args.name
            )
        else:
            store = await SqliteStore.open(args.store, KEY, lease=lease, holder=args.name)
    except StoreLocked as exc:
        event(args.events, event="locked", name=args.name, holder=exc.holder, since=exc.since)
        return 3
    machine = await OlmMachine.open(store, "@lock:example.org", "LOCKDEV")
    event(
        args.events,
        event="acquired",
        name=args.name,
        generation=store.generation,
        previous_writer=await store.get_value("writer"),
        ed25519=machine.identity_keys["ed25519"],
    )
    await store.save_changes(Changes(values={"writer": args.name}))
    await asyncio.sleep(args.hold)
    event(args.events, event="releasing", name=args.name)
    await store.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
