"""Relations in an encrypted room against the real Synapse, and from matrix-nio."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from olmstead.client.rooms import RoomEvent
from tests.integration.harness import close_client
from tests.integration.test_attachments import room_with_nio


async def ask(url: str, token: str, path: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.get(path, headers={"Authorization": f"Bearer {token}"})
        answer.raise_for_status()
        body: dict[str, Any] = answer.json()
        return body


async def test_threads_edits_and_reactions_from_olmstead_are_aggregated_by_synapse(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    bot, seen, nio, room = await room_with_nio(homeserver, new_user, tmp_path)
    root = await bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "root"})
    in_thread = await bot.send_thread_reply(room, root, "first in the thread")
    edit = await bot.send_edit(room, in_thread, "first in the thread, edited")
    reaction = await bot.send_reaction(room, root, "👍")
    reply = await bot.send_reply(room, root, "a plain reply")

    url, token, r = homeserver.base_url, nio.client.access_token, quote(room)
    related = await ask(url, token, f"/_matrix/client/v1/rooms/{r}/relations/{quote(root)}")
    assert {e["event_id"] for e in related["chunk"]} >= {in_thread, reaction}
    assert all(e["type"] == "m.room.encrypted" for e in related["chunk"])
    threads = await ask(url, token, f"/_matrix/client/v1/rooms/{r}/threads")
    (thread,) = threads["chunk"]
    assert thread["event_id"] == root
    summary = thread["unsigned"]["m.relations"]["m.thread"]
    assert summary["count"] == 1
    edits = await ask(
        url, token, f"/_matrix/client/v1/rooms/{r}/relations/{quote(in_thread)}/m.replace"
    )
    assert [e["event_id"] for e in edits["chunk"]] == [edit]

    # nio reads them too
    await nio.sync()
    assert "a plain reply" in nio.bodies()
    assert nio.undecryptable == []
    # and olmstead's own sync hands them out with their relations
    await bot.sync_once()
    mine = {e.event_id: e for e in seen if isinstance(e, RoomEvent)}
    assert mine[in_thread].rel_type == "m.thread"
    assert mine[in_thread].relates_to_event == root
    assert mine[edit].rel_type == "m.replace"
    assert mine[edit].content["m.new_content"]["body"] == "first in the thread, edited"
    assert mine[reaction].type == "m.reaction"
    assert mine[reaction].relation == {"rel_type": "m.annotation", "event_id": root, "key": "👍"}
    assert mine[reply].relates_to_event == root
    assert not any(e.relation_mismatch for e in mine.values())
    await nio.close()
    await close_client(bot)


async def test_relations_sent_by_nio_reach_the_application(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    bot, seen, nio, room = await room_with_nio(homeserver, new_user, tmp_path)
    root = await bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "root"})
    await nio.sync()

    async def nio_sends(event_type: str, content: dict[str, Any]) -> str:
        answer = await nio.client.room_send(
            room, event_type, content, ignore_unverified_devices=True
        )
        event_id: str = answer.event_id
        return event_id

    thread = {
        "rel_type": "m.thread",
        "event_id": root,
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": root},
    }
    in_thread = await nio_sends(
        "m.room.message", {"msgtype": "m.text", "body": "nio in thread", "m.relates_to": thread}
    )
    edit = await nio_sends(
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "* again",
            "m.new_content": {"msgtype": "m.text", "body": "again"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": in_thread},
        },
    )
    reaction = await nio_sends(
        "m.reaction", {"m.relates_to": {"rel_type": "m.annotation", "event_id": root, "key": "🎉"}}
    )
    await bot.sync_once()
    got = {e.event_id: e for e in seen if isinstance(e, RoomEvent)}
    assert got[in_thread].encrypted
    assert got[in_thread].relation == thread
    assert got[edit].rel_type == "m.replace"
    assert got[edit].relates_to_event == in_thread
    assert got[reaction].relation == {"rel_type": "m.annotation", "event_id": root, "key": "🎉"}
    assert not any(e.relation_mismatch for e in got.values())
    await nio.close()
    await close_client(bot)
