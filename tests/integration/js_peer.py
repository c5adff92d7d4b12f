"""matrix-js-sdk with its Rust crypto (Element's engine) as a peer, run by Node.

``tests/jspeer/driver.mjs`` speaks JSON lines: commands in on stdin, answers and
what the js-sdk saw (decrypted events, failures with their codes, to-device events)
out on stdout. Its install is pinned by ``tests/jspeer/package-lock.json``
(``make jspeer`` runs ``npm ci``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

JSPEER = Path(__file__).resolve().parent.parent / "jspeer"


class JsPeerError(AssertionError):
    """The driver answered a command with an error."""


class JsPeer:
    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.ensure_future(self._read())
        self.user_id = ""
        self.device_id = ""

    @classmethod
    async def login(cls, url: str, user: dict[str, Any], log: Path, name: str = "js-sdk") -> JsPeer:
        if not (JSPEER / "node_modules" / "matrix-js-sdk").is_dir():
            raise RuntimeError("the js-sdk peer is not installed: run `make jspeer` (npm ci)")
        stderr = log.open("ab")
        process = await asyncio.create_subprocess_exec(
            "node",
            str(JSPEER / "driver.mjs"),
            cwd=JSPEER,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            limit=16 * 1024 * 1024,
        )
        stderr.close()
        peer = cls(process, log)
        answer = await peer.call(
            "login",
            base_url=url,
            user_id=user["user_id"],
            password=user["password"],
            device_name=name,
        )
        peer.user_id, peer.device_id = answer["user_id"], answer["device_id"]
        return peer

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            message = json.loads(line)
            if "event" in message:
                self.events.append(message)
                continue
            future = self._waiting.pop(message.get("id"), None)
            if future is None or future.done():
                continue
            if message.get("ok"):
                future.set_result(message.get("result"))
            else:
                future.set_exception(JsPeerError(message.get("error")))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(JsPeerError(f"the driver exited; see {self.log}"))

    async def call(self, cmd: str, within: float = 60.0, **args: Any) -> Any:
        """Run one driver command; its result (``JsPeerError`` if it failed)."""
        assert self.process.stdin is not None
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self.process.stdin.write(json.dumps({"id": request_id, "cmd": cmd, **args}).encode())
        self.process.stdin.write(b"\n")
        await self.process.stdin.drain()
        return await asyncio.wait_for(future, within)

    async def wait_for(
        self, match: Callable[[dict[str, Any]], bool], within: float = 30.0
    ) -> dict[str, Any]:
        """The first event (seen so far or arriving ``within`` seconds) that ``match``es."""
        deadline = time.monotonic() + within
        while True:
            for event in self.events:
                if match(event):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching event within {within} s; saw {self.events}")
            await asyncio.sleep(0.1)

    async def wait_for_device_trust(
        self,
        user_id: str,
        device_id: str,
        match: Callable[[dict[str, Any]], bool],
        within: float = 20.0,
    ) -> dict[str, Any]:
        """How the js-sdk sees a device, once ``match`` holds (or as it stands at the end).

        The js-sdk hears of a device's new signatures from its own sync, a moment later.
        """
        deadline = time.monotonic() + within
        while True:
            trust: dict[str, Any] = await self.call(
                "device_trust", user_id=user_id, device_id=device_id
            )
            if match(trust) or time.monotonic() > deadline:
                return trust
            await asyncio.sleep(0.25)

    def messages(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "message"]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call("stop", within=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.process.wait(), 5)
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
