"""A client process that SIGKILLs itself at one step of the room key share of a room_send.

    share_crash_client.py SESSION_JSON STORE ROOM SENT_LOG POINT

``to_device_before``: the share is committed and its request about to leave: the
process dies before sending it. ``to_device_after``: the share reached Synapse and
its answer came back; the process dies before the machine records it.
``message_before``: the share is confirmed; the process dies before the message
itself leaves.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import httpx

from olmstead import Session
from tests.integration.harness import Wire, open_client

POINTS = ("to_device_before", "to_device_after", "message_before")


class DyingWire(Wire):
    def __init__(self, log: Path, point: str) -> None:
        super().__init__()
        self.log, self.point = log, point

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if "/sendToDevice/m.room.encrypted/" in path:
            with open(self.log, "a") as f:  # as the server would receive it
                f.write(json.dumps({"path": path, "body": json.loads(request.content)}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if self.point == "to_device_before":
                os.kill(os.getpid(), signal.SIGKILL)
            response = await super().handle_async_request(request)
            await response.aread()
            if self.point == "to_device_after":
                os.kill(os.getpid(), signal.SIGKILL)
            return response
        if "/send/m.room.encrypted/" in path and self.point == "message_before":
            os.kill(os.getpid(), signal.SIGKILL)
        return await super().handle_async_request(request)


async def main() -> None:
    session = Session(**json.loads(sys.argv[1]))
    wire = DyingWire(Path(sys.argv[4]), sys.argv[5])
    client = await open_client(session.homeserver, Path(sys.argv[2]), session, wire)
    await client.init_crypto()
    await client.sync_once()
    await client.room_send(sys.argv[3], "m.room.message", {"body": "before the crash"})
    raise SystemExit("the share never happened")


if __name__ == "__main__":
    asyncio.run(main())
