"""A client process that SIGKILLs itself around its first upload of device keys (the
one after the claim of the device ID).

    crash_client.py SESSION_JSON STORE SENT_LOG before|after

``before``: the upload body is logged, then the process dies before sending it.
``after``: the request reaches Synapse and its answer arrives, then the process
dies before the machine can record it.
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
from tests.integration.harness import UPLOAD_PATH, Wire, open_client


class DyingWire(Wire):
    def __init__(self, log: Path, when: str) -> None:
        super().__init__()
        self.log, self.when = log, when

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != UPLOAD_PATH or b'"device_keys"' not in request.content:
            return await super().handle_async_request(request)
        self.log.write_text(request.content.decode())
        if self.when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        response = await super().handle_async_request(request)
        os.kill(os.getpid(), signal.SIGKILL)
        return response


async def main() -> None:
    session = Session(**json.loads(sys.argv[1]))
    wire = DyingWire(Path(sys.argv[3]), sys.argv[4])
    client = await open_client(session.homeserver, Path(sys.argv[2]), session, wire)
    await client.init_crypto()
    raise SystemExit("the upload never happened")


if __name__ == "__main__":
    asyncio.run(main())
