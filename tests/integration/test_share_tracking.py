"""Sharing never races device tracking, against the real Synapse (issue 13, item 5)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from olmstead import Client
from olmstead.client.rooms import RoomEvent
from tests.integration.harness import Wire, close_client, open_client, session_of
from tests.integration.test_messaging import crypto_client, messages

QUERY_PATH = "/_matrix/client/v3/keys/query"


@dataclass
class HeldQueries(Wire):
    """The network, with ``/keys/query`` held back while ``hold`` is set."""

    hold: bool = False
    held: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == QUERY_PATH and self.hold:
            self.hold = False  # only the first: the share's own query passes
            self.held.set()
            await self.release.wait()
        return await super().handle_async_request(request)


async def bot_on_a_held_wire(
    url: str, tmp_path: Path, bot_user: dict[str, Any]
) -> tuple[Client, HeldQueries]:
    wire = HeldQueries()
    bot = await open_client(url, tmp_path / "bot.db", session_of(url, bot_user), wire)
    await bot.init_crypto()
    await bot.sync_once()
    return bot, wire


async def invite_and_join(bot: Client, room: str, member: Client, user: dict[str, Any]) -> None:
    await bot.invite(room, user["user_id"])
    await member.sync_once()
    await member.join(room)


async def send_while_the_query_is_held(
    bot: Client, wire: HeldQueries, room: str, body: str
) -> tuple[asyncio.Task[Any], asyncio.Task[str]]:
    """The bot's sync, its /keys/query held back, and ``room_send(body)`` waiting for it."""
    wire.hold = True
    syncing = asyncio.create_task(bot.sync_once())
    await asyncio.wait_for(wire.held.wait(), 30)
    sending = asyncio.create_task(
        bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": body})
    )
    await asyncio.sleep(1.0)
    assert not sending.done()  # the share waits for the query
    return syncing, sending


async def test_a_member_who_joins_while_the_query_is_held_reads_the_next_message(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    bot_user, carol_user = new_user(), new_user()
    bot, wire = await bot_on_a_held_wire(url, tmp_path, bot_user)
    carol, carol_seen = await crypto_client(url, tmp_path / "carol.db", carol_user)
    room = await bot.create_room()
    await bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "before carol"})

    await invite_and_join(bot, room, carol, carol_user)

    # the bot's sync sees carol join and queries her devices; the query hangs. The echo
    # bot answers at this moment: its share must wait for carol's devices
    syncing, sending = await send_while_the_query_is_held(bot, wire, room, "welcome carol")
    wire.release.set()
    await syncing
    await sending

    await carol.sync_once()
    assert (bot_user["user_id"], "welcome carol", True) in messages(carol_seen)
    await close_client(bot)
    await close_client(carol)


async def test_a_query_abandoned_by_a_cancelled_task_does_not_hold_later_shares(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    bot_user, carol_user = new_user(), new_user()
    bot, wire = await bot_on_a_held_wire(url, tmp_path, bot_user)
    carol, carol_seen = await crypto_client(url, tmp_path / "carol.db", carol_user)
    room = await bot.create_room()
    await invite_and_join(bot, room, carol, carol_user)

    # the application gives its sync a deadline; it passes while carol's query hangs
    wire.hold = True
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bot.sync_once(), 3)
    assert wire.held.is_set()
    machine = bot.machine
    assert machine is not None
    assert not machine.key_query_in_flight  # no answer will ever come for it

    # counted as a failed query: past its backoff (2 s at most after one failure), the
    # next share queries carol's devices itself instead of waiting KEY_QUERY_WAIT (30 s)
    await asyncio.sleep(2.5)
    await asyncio.wait_for(
        bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "hello carol"}), 15
    )
    await carol.sync_once()
    assert (bot_user["user_id"], "hello carol", True) in messages(carol_seen)
    await close_client(bot)
    await close_client(carol)


def session_ids(seen: list[Any], body: str) -> list[str]:
    return [
        e.raw["content"]["session_id"]
        for e in seen
        if isinstance(e, RoomEvent) and e.type == "m.room.message" and e.content["body"] == body
    ]


async def test_a_member_who_leaves_while_the_share_waits_gets_no_key(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    bot_user, carol_user, dave_user, erin_user = new_user(), new_user(), new_user(), new_user()
    bot, wire = await bot_on_a_held_wire(url, tmp_path, bot_user)
    carol, carol_seen = await crypto_client(url, tmp_path / "carol.db", carol_user)
    dave, _ = await crypto_client(url, tmp_path / "dave.db", dave_user)
    erin, erin_seen = await crypto_client(url, tmp_path / "erin.db", erin_user)
    room = await bot.create_room(invite=[carol_user["user_id"], dave_user["user_id"]])
    for member in (carol, dave):
        await member.sync_once()
        await member.join(room)
    await bot.sync_once()
    await bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "before"})

    # erin joins: the bot's sync queries her devices, and the query hangs
    await invite_and_join(bot, room, erin, erin_user)
    syncing, sending = await send_while_the_query_is_held(bot, wire, room, "after dave")
    # dave leaves while the share waits; another sync of the bot's sees it
    await dave.http.request("POST", f"/_matrix/client/v3/rooms/{quote(room)}/leave", {})
    for _ in range(20):
        await bot.sync_once()
        followed = bot.room(room)
        if followed is not None and dave_user["user_id"] not in followed.joined:
            break
    wire.release.set()
    await syncing
    await sending

    await carol.sync_once()
    await erin.sync_once()
    assert (bot_user["user_id"], "after dave", True) in messages(erin_seen)
    (before,), (after,) = session_ids(carol_seen, "before"), session_ids(carol_seen, "after dave")
    assert before != after  # rotated: dave's copy of the old session does not open it
    for client in (bot, carol, dave, erin):
        await close_client(client)
