"""The first encrypted send to a room with other devices, on a real Synapse, beside matrix-nio.

The ``count`` other devices belong to ``count`` users registered on the server,
each with really signed device and one-time keys uploaded. olmstead (a
``Client`` on a SQLite store) and matrix-nio each get a room of their own with
all of them, synced, members and device keys already known (nio's
``joined_members`` and ``keys_query`` are done beforehand, as olmstead's sync
did its query). Timed for both: the send call, which claims one-time keys,
makes the Olm sessions, shares the room key to every device, encrypts and sends
the event. Both first send once to a small room so that neither pays for warm-up;
each run is a new sending device of each library, the two taking turns to go first,
the server idle for a second before each timed send, and the best of up to five runs
of each is kept.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import vodozemac
from nio import AsyncClient, AsyncClientConfig, RoomCreateResponse, RoomSendResponse

from benchmarks.peers import KEY
from benchmarks.table import Row, time_row
from benchmarks.timing import Stopwatch
from olmstead import Client, Session, SqliteStore
from olmstead.olm import account as own

__all__ = ["run"]

ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}
#: seconds the server gets to finish its work on the setup before each timed send
SETTLE = 1.0
MESSAGE = {"msgtype": "m.text", "body": "hello, everyone"}


def _register(http: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = {
        "auth": {"type": "m.login.dummy"},
        "username": f"bench-{uuid.uuid4().hex[:12]}",
        "password": uuid.uuid4().hex,
    }
    answer = http.post("/_matrix/client/v3/register", json=body)
    if answer.status_code == 401 and "session" in answer.json():
        body["auth"]["session"] = answer.json()["session"]
        answer = http.post("/_matrix/client/v3/register", json=body)
    answer.raise_for_status()
    user: dict[str, Any] = answer.json()
    return {**user, "password": body["password"]}


def _recipients(http: httpx.Client, count: int, one_time_keys: int) -> list[dict[str, Any]]:
    """``count`` users, each one device with signed device keys and its one-time keys."""
    users = []
    for _ in range(count):
        user = _register(http)
        account = vodozemac.Account()
        account.generate_one_time_keys(one_time_keys)
        body = {
            "device_keys": own.device_keys(account, user["user_id"], user["device_id"]),
            "one_time_keys": own.signed_one_time_keys(account, user["user_id"], user["device_id"]),
        }
        auth = {"Authorization": f"Bearer {user['access_token']}"}
        http.post("/_matrix/client/v3/keys/upload", json=body, headers=auth).raise_for_status()
        users.append(user)
    return users


def _join(http: httpx.Client, room_id: str, users: list[dict[str, Any]]) -> None:
    for user in users:
        auth = {"Authorization": f"Bearer {user['access_token']}"}
        http.post(f"/_matrix/client/v3/join/{room_id}", json={}, headers=auth).raise_for_status()


class ServerClock(httpx.AsyncBaseTransport):
    """The real network, timing how long each request waits for the server's answer."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.ms = 0.0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        response = await self.inner.handle_async_request(request)
        await response.aread()
        self.ms += (time.perf_counter() - started) * 1000
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _olmstead(
    url: str,
    http: httpx.Client,
    directory: Path,
    warm: list[dict[str, Any]],
    users: list[dict[str, Any]],
) -> tuple[float, int, float]:
    me = _register(http)
    store = await SqliteStore.open(directory / "olmstead.db", KEY)
    server = ServerClock()
    client = Client(url, store=store, transport=server)
    client.restore(Session(url, me["user_id"], me["device_id"], me["access_token"]))
    try:
        await client.init_crypto()
        rooms = []
        for members in (warm, users):
            room = await client.create_room(invite=[u["user_id"] for u in members])
            _join(http, room, members)
            rooms.append(room)
        await client.sync_once()  # members and their device keys, as any client's sync
        await client.room_send(rooms[0], "m.room.message", MESSAGE)
        server.ms = 0.0
        await asyncio.sleep(SETTLE)
        with Stopwatch() as watch:
            await client.room_send(rooms[1], "m.room.message", MESSAGE)
        waited = server.ms
        assert client.machine is not None
        outbound = await client.machine.store.get_outbound_group_session(rooms[1])
        assert outbound is not None
        given = sum(1 for d in outbound.shared_with.values() for i in d.values() if i >= 0)
    finally:
        await client.close()
        await store.close()
    return watch.ms, given, waited


async def _nio(
    url: str,
    http: httpx.Client,
    directory: Path,
    warm: list[dict[str, Any]],
    users: list[dict[str, Any]],
) -> tuple[float, int]:
    me = _register(http)
    directory.mkdir(parents=True, exist_ok=True)
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
    client = AsyncClient(url, me["user_id"], store_path=str(directory), config=config)
    try:
        await client.login(me["password"], device_name="nio bench")
        await client.sync(timeout=0, full_state=True)
        if client.should_upload_keys:
            await client.keys_upload()
        rooms = []
        for members in (warm, users):
            created = await client.room_create(
                invite=[u["user_id"] for u in members], initial_state=[ENCRYPTION]
            )
            assert isinstance(created, RoomCreateResponse), created
            _join(http, created.room_id, members)
            rooms.append(created.room_id)
        await client.sync(timeout=0, full_state=True)
        for room in rooms:
            await client.joined_members(room)
        if client.should_query_keys:
            await client.keys_query()
        sent = await client.room_send(
            rooms[0], "m.room.message", MESSAGE, ignore_unverified_devices=True
        )
        assert isinstance(sent, RoomSendResponse), sent
        await asyncio.sleep(SETTLE)
        with Stopwatch() as watch:
            sent = await client.room_send(
                rooms[1], "m.room.message", MESSAGE, ignore_unverified_devices=True
            )
        assert isinstance(sent, RoomSendResponse), sent
        assert client.olm is not None
        session = client.olm.outbound_group_sessions[rooms[1]]
        given = len(session.users_shared_with)
    finally:
        await client.close()
    return watch.ms, given


async def run(count: int, homeserver_url: str | None, repeat: int) -> list[Row]:
    server = None
    if homeserver_url is None:
        from olmstead.throwaway_homeserver import ThrowawayHomeserver

        server = ThrowawayHomeserver().start()
        homeserver_url = server.base_url
    ours: list[tuple[float, float]] = []
    theirs: list[float] = []
    try:
        with (
            httpx.Client(base_url=homeserver_url, timeout=60) as http,
            tempfile.TemporaryDirectory(prefix="olmstead-bench-") as tmp,
        ):
            # each run is a new sending device of each library: a first send every time
            warm = _recipients(http, 1, 2 * repeat)
            users = _recipients(http, count, 2 * repeat)
            for n in range(repeat):
                directory = Path(tmp) / f"run{n}"

                async def nio(directory: Path = directory) -> None:
                    ms, given = await _nio(homeserver_url, http, directory / "nio", warm, users)
                    _check(given, count, "matrix-nio")
                    theirs.append(ms)

                async def olmstead(directory: Path = directory) -> None:
                    directory.mkdir(parents=True, exist_ok=True)
                    ms, given, waited = await _olmstead(
                        homeserver_url, http, directory, warm, users
                    )
                    _check(given, count, "olmstead")
                    ours.append((ms, waited))

                first, second = (nio, olmstead) if n % 2 == 0 else (olmstead, nio)
                await first()  # taking turns: neither always meets a server warmed by the other
                await second()
    finally:
        if server is not None:
            server.stop()
            server.cleanup()
    ours_ms, waited = min(ours)
    return [
        time_row(
            f"first encrypted send, {count} devices (Synapse)",
            ours_ms,
            min(theirs),
            "matrix-nio, same server and run",
            100,
            extra=lambda ours, nio: ours <= 0.5 * nio,
            extra_words="<= 0.5x nio",
            note=f"{waited:.0f} ms of olmstead's {ours_ms:.0f} ms waited for Synapse's answers",
        )
    ]


def _check(given: int, count: int, who: str) -> None:
    if given != count:
        raise AssertionError(f"{who}'s room key reached {given} of {count} devices")
