"""``Client``: logs in, syncs, and drives the machine over HTTP. The machine's only driver.

It pushes what ``/sync`` says into the machine, sends what the machine hands
out, and reports each answer back. It never reaches into the machine's state.

    client = Client("https://matrix.example.org", store=store)
    await client.login("bot", password)           # a server-assigned device ID
    await client.init_crypto()                     # check the device, upload keys
    await client.start(initial_sync_limit=20)      # sync until client.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from olmstead.errors import KeyStateError, LocalProtocolError, TransportError
from olmstead.http.endpoints import CLIENT_V3
from olmstead.http.transport import MatrixHttp, RetryPolicy
from olmstead.keys_upload import KeySettings
from olmstead.machine import OlmMachine
from olmstead.store.base import Changes, CryptoStore
from olmstead.upload_guard import OneTimeKeysDrained, UploadPolicy

__all__ = ["Client", "Session"]

log = logging.getLogger(__name__)

SYNC_TOKEN = "sync_token"
#: a round of requests never goes on past this: a drain is bounded well below it
_MAX_REQUESTS_PER_ROUND = 1000


@dataclass(frozen=True)
class Session:
    """What a login gives: enough to come back later without logging in again."""

    homeserver: str
    user_id: str
    device_id: str
    access_token: str


class Client:
    def __init__(
        self,
        homeserver: str,
        *,
        store: CryptoStore | None = None,
        key_settings: KeySettings | None = None,
        upload_policy: UploadPolicy | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.homeserver = homeserver
        self.store = store
        self.http = MatrixHttp(homeserver, transport=transport, retry=retry)
        self.session: Session | None = None
        self.machine: OlmMachine | None = None
        self._key_settings = key_settings
        self._upload_policy = upload_policy
        self._drained_callbacks: list[Callable[[OneTimeKeysDrained], object]] = []
        self._stop = asyncio.Event()
        self._reported_problem: KeyStateError | None = None

    # --- who we are ------------------------------------------------------------------------

    async def login(
        self,
        user: str,
        password: str,
        *,
        device_id: str | None = None,
        device_name: str | None = None,
    ) -> Session:
        """Password login. Without ``device_id`` the server assigns a new device."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        }
        if device_id is not None:
            body["device_id"] = device_id
        if device_name is not None:
            body["initial_device_display_name"] = device_name
        answer = await self.http.request("POST", f"{CLIENT_V3}/login", body)
        session = Session(
            self.homeserver, answer["user_id"], answer["device_id"], answer["access_token"]
        )
        self.restore(session)
        return session

    def restore(self, session: Session) -> None:
        """Use a session from an earlier login (its access token) instead of logging in."""
        self.session = session
        self.http.access_token = session.access_token

    async def logout(self) -> None:
        await self.http.request("POST", f"{CLIENT_V3}/logout", {})
        self.session = None
        self.http.access_token = None

    # --- encryption --------------------------------------------------------------------------

    def on_keys_drained(self, callback: Callable[[OneTimeKeysDrained], object]) -> None:
        """Call ``callback`` whenever stale one-time keys of ours were drained and replaced."""
        self._drained_callbacks.append(callback)

    async def init_crypto(self) -> OlmMachine:
        """Open the device's machine and bring its keys on the server up to date.

        A new device is looked up on the server first: ``DeviceIdInUse`` if another
        identity's keys are there, and nothing is uploaded.
        """
        session = self._session()
        if self.store is None:
            raise LocalProtocolError("init_crypto needs a store: Client(..., store=...)")
        self.machine = await OlmMachine.open(
            self.store,
            session.user_id,
            session.device_id,
            key_settings=self._key_settings,
            upload_policy=self._upload_policy,
        )
        await self.process_outgoing()
        return self.machine

    async def process_outgoing(self) -> None:
        """Send what the machine asks for until it asks for nothing more this round.

        A failed request is reported to the machine, which decides when it goes out
        again (it holds it back meanwhile). A ``KeyStateError`` is raised to the caller.
        """
        machine = self._machine()
        for _ in range(_MAX_REQUESTS_PER_ROUND):
            requests = await machine.outgoing_requests()
            if not requests:
                return
            for request in requests:
                try:
                    answer = await self.http.send(request)
                except TransportError as error:
                    await machine.mark_request_as_failed(request.request_id, error)
                    continue
                await machine.mark_request_as_sent(request.request_id, answer)
                for report in machine.take_reports():
                    for callback in self._drained_callbacks:
                        callback(report)
        log.error("stopped a round of requests after %d", _MAX_REQUESTS_PER_ROUND)

    # --- syncing ---------------------------------------------------------------------------

    async def sync_once(self, *, timeout_ms: int = 0, limit: int | None = None) -> dict[str, Any]:
        """One ``/sync``: its key counts go into the machine, then its requests go out."""
        self._session()
        params = {"timeout": str(timeout_ms)}
        since = await self.store.get_value(SYNC_TOKEN) if self.store is not None else None
        if since is not None:
            params["since"] = since
        if limit is not None:
            params["filter"] = json.dumps({"room": {"timeline": {"limit": limit}}})
        answer = await self._until_stopped(
            self.http.request(
                "GET", f"{CLIENT_V3}/sync", params=params, read_timeout=timeout_ms / 1000 + 30
            )
        )
        if answer is None:  # stop() during the long-poll: nothing was received
            return {}
        if self.machine is not None:
            fallback_types = answer.get(
                "device_unused_fallback_key_types",
                answer.get("org.matrix.msc2732.device_unused_fallback_key_types"),
            )
            await self.machine.receive_sync_changes(
                one_time_key_counts=answer.get("device_one_time_keys_count", {}),
                unused_fallback_key_types=fallback_types,
            )
        if self.store is not None and isinstance(answer.get("next_batch"), str):
            await self.store.save_changes(Changes(values={SYNC_TOKEN: answer["next_batch"]}))
        if self.machine is not None:
            try:
                await self.process_outgoing()
            except KeyStateError as problem:
                self._report(problem)
        return answer

    async def start(self, *, initial_sync_limit: int = 20, timeout_ms: int = 30_000) -> None:
        """Sync until ``stop()``. Key problems are logged once; syncing goes on without uploads."""
        self._stop.clear()
        first = True
        while not self._stop.is_set():
            try:
                await self.sync_once(
                    timeout_ms=0 if first else timeout_ms,
                    limit=initial_sync_limit if first else None,
                )
                first = False
            except TransportError as error:  # the HTTP layer already retried with backoff
                log.warning("sync failed: %s", error)
                await asyncio.sleep(5)

    def stop(self) -> None:
        """End ``start()``: a long-poll in progress is abandoned, processing is finished."""
        self._stop.set()

    async def _until_stopped(self, call: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
        """``call``'s answer, or ``None`` if ``stop()`` came first.

        Only the wait for the server is abandoned; what the machine does with an
        answer always runs to its end.
        """
        request = asyncio.ensure_future(call)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({request, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not request.done():
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
            return None
        return request.result()

    async def close(self) -> None:
        self.stop()
        await self.http.close()

    # --- helpers ---------------------------------------------------------------------------

    def _report(self, problem: KeyStateError) -> None:
        if problem is not self._reported_problem:
            self._reported_problem = problem
            log.error("key uploads stopped: %s", problem)

    def _session(self) -> Session:
        if self.session is None:
            raise LocalProtocolError("not logged in: call login() or restore() first")
        return self.session

    def _machine(self) -> OlmMachine:
        if self.machine is None:
            raise LocalProtocolError("encryption is not set up: call init_crypto() first")
        return self.machine
