"""The soak's receiver: an olmstead client in its own process, killed and restarted by the test.

    soak_receiver.py SESSION_JSON STORE LOG

Every line it writes to LOG is fsynced before it goes on: ``start`` when it
begins, ``delivered`` for each message the application receives, ``reported``
for each decryption failure (with ``final``), and ``synced`` after each sync
whose deliveries are committed. A third of its ``/sync`` calls are dropped
(before or after they reach the server), as a flaky network would.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from collections.abc import Mapping
from typing import Any

import httpx

from olmstead import Client, DecryptionError, OlmsteadError, Session, SqliteStore
from olmstead.client.rooms import RoomEvent
from tests.integration.harness import KEY, LEASE

#: how long an event waits for its key in the soak (short: the soak is bounded)
KEY_WAIT = 20.0


class DroppingTransport(httpx.AsyncBaseTransport):
    """The network, losing about a third of the /sync calls."""

    def __init__(self, log: str) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.log = log

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        is_sync = request.url.path.endswith("/sync")
        fate = random.random() if is_sync else 1.0
        if fate < 0.15:  # lost on the way there
            write(self.log, {"kind": "sync_dropped", "reached_server": False})
            raise httpx.ConnectError("dropped by the soak", request=request)
        response = await self.inner.handle_async_request(request)
        if fate < 0.33:  # the server answered; the answer is lost
            await response.aread()
            write(self.log, {"kind": "sync_dropped", "reached_server": True})
            raise httpx.ReadError("answer dropped by the soak", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def write(log: str, entry: dict[str, Any]) -> None:
    with open(log, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def main() -> None:
    session = Session(**json.loads(sys.argv[1]))
    log = sys.argv[3]
    store = await SqliteStore.open(sys.argv[2], KEY, lease=LEASE)
    client = Client(
        session.homeserver, store=store, transport=DroppingTransport(log), key_wait=KEY_WAIT
    )
    client.restore(session)
    write(log, {"kind": "start", "pid": os.getpid()})

    def on_event(event: RoomEvent) -> None:
        if event.type == "m.room.message" and event.sender != session.user_id:
            write(log, {"kind": "delivered", "event_id": event.event_id, "body": event.content})

    def on_failure(room_id: str | None, event: Mapping[str, Any], error: DecryptionError) -> None:
        if room_id is not None:
            write(
                log,
                {
                    "kind": "reported",
                    "event_id": event.get("event_id"),
                    "error": type(error).__name__,
                    "final": error.final,
                },
            )

    client.on_room_event(on_event)
    client.on_decryption_failure(on_failure)
    while True:
        try:
            if client.machine is None:
                await client.init_crypto()
            await client.sync_once(timeout_ms=300, limit=100)
        except OlmsteadError as error:
            write(log, {"kind": "sync_failed", "error": str(error)[:200]})
            continue
        write(log, {"kind": "synced"})


if __name__ == "__main__":
    asyncio.run(main())
