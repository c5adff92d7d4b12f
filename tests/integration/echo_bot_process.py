"""An echo bot in its own process, for the restart test (and the README's example).

    echo_bot_process.py SESSION_JSON STORE RECEIVED_LOG

Every text it decrypts is appended (fsynced) to RECEIVED_LOG, and answered with
``echo: <text>`` in the same room. It runs until killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from olmstead import Client, LeaseSettings, PickleKey, Session, SqliteStore
from olmstead.client.rooms import RoomEvent


async def main() -> None:
    session = Session(**json.loads(sys.argv[1]))
    # a short lease: the restarted bot waits out the killed one's before it starts
    lease = LeaseSettings(duration=1.0, renew_every=0.3, wait=10.0)
    store = await SqliteStore.open(sys.argv[2], PickleKey(b"i" * 32), lease=lease)
    bot = Client(session.homeserver, store=store, auto_join=True)
    bot.restore(session)
    await bot.init_crypto()
    with open(sys.argv[3] + ".ready", "w") as ready:  # keys are on the server now
        ready.write("ready")
    replies: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_event(event: RoomEvent) -> None:
        body = event.content.get("body")
        if event.type == "m.room.message" and event.sender != session.user_id and body:
            with open(sys.argv[3], "a") as log:
                log.write(json.dumps({"body": body, "encrypted": event.encrypted}) + "\n")
                log.flush()
                os.fsync(log.fileno())
            replies.put_nowait((event.room_id, body))

    async def answer() -> None:
        while True:
            room_id, body = await replies.get()
            await bot.room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": f"echo: {body}"}
            )

    bot.on_room_event(on_event)
    await asyncio.gather(bot.start(timeout_ms=500), answer())


if __name__ == "__main__":
    asyncio.run(main())
