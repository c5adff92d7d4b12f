"""A sync's rooms sections as a hostile server may send them: the client goes on.

The real Synapse drives these paths in tests/integration (test_gaps.py,
test_invites_and_rooms.py); here httpx's mock transport answers what Synapse never
would, to check that no field of ``rooms.join``, ``rooms.invite`` or ``rooms.leave``
can raise out of ``sync_once`` or leave a wrong room state behind.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import httpx
import pytest

from olmstead import Client, Invite, MemoryDatabase, MemoryStore, Session, TimelineGap
from olmstead.client.gaps import POSITION_PREFIX
from olmstead.client.rooms import RoomEvent
from olmstead.http import RetryPolicy
from olmstead.store.base import CryptoStore
from tests.conftest import FAST_LEASE, KEY, Backend

ME = "@bot:x"
ROOM = "!room:x"


def member(user: str, membership: str) -> dict[str, Any]:
    return {"type": "m.room.member", "state_key": user, "content": {"membership": membership}}


def message(n: int) -> dict[str, Any]:
    return {"type": "m.room.message", "event_id": f"$m{n}", "sender": "@a:x", "content": {}}


async def client_with(handler: Any, store: CryptoStore | None = None) -> Client:
    """A logged-in client without crypto, its server answered by ``handler``."""
    if store is None:
        store = await MemoryStore.open(KEY, MemoryDatabase(), lease=FAST_LEASE)
    client = Client(
        "https://hs.example",
        store=store,
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(attempts=1),
    )
    client.restore(Session("https://hs.example", ME, "DEV", "token"))
    return client


async def client_answering(*syncs: Any, messages: Any = None) -> tuple[Client, list[str]]:
    answers = iter(syncs)
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path.endswith("/sync"):
            return httpx.Response(200, content=json.dumps(next(answers)).encode())
        if request.url.path.endswith("/messages"):
            return httpx.Response(200, content=json.dumps(messages).encode())
        if request.url.path.endswith("/join"):
            return httpx.Response(200, json={"room_id": ROOM})
        if request.url.path.endswith("/state"):
            return httpx.Response(200, json=[member(ME, "join"), "junk", 7])
        return httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "no"})

    return await client_with(handler), asked


#: an invite for us from alice, as rooms.invite carries it
INVITE = {
    "invite_state": {
        "events": [
            {
                "type": "m.room.member",
                "state_key": ME,
                "sender": "@alice:x",
                "content": {"membership": "invite"},
            }
        ]
    }
}

HOSTILE_ROOMS: list[Any] = [
    None,
    [],
    "rooms",
    {"join": [], "invite": "x", "leave": 5},
    {"join": {ROOM: None}, "invite": {ROOM: []}, "leave": {ROOM: "gone"}},
    {"join": {ROOM: {"timeline": {"events": "x", "limited": "yes", "prev_batch": 4}}}},
    {"join": {ROOM: {"timeline": {"events": [None, 3, "e"]}, "state": {"events": {}}}}},
    {"join": {ROOM: {"state": {"events": [member(ME, "join"), {"type": 5, "state_key": []}]}}}},
    {"invite": {ROOM: {"invite_state": {"events": [{"type": "m.room.member"}, None]}}}},
]


@pytest.mark.parametrize("rooms", HOSTILE_ROOMS)
async def test_malformed_rooms_sections_raise_nothing(rooms: Any) -> None:
    client, _ = await client_answering({"next_batch": "s1", "rooms": rooms})
    client.auto_join = True
    seen: list[Any] = []
    client.on_room_event(seen.append)
    client.on_invite(seen.append)
    client.on_gap(seen.append)
    await client.sync_once()
    assert client.store is not None
    assert await client.store.get_value("sync_token") == "s1"
    assert all(isinstance(e, RoomEvent) for e in seen)
    assert [e for e in seen if isinstance(e, RoomEvent) and e.type == "m.room.message"] == []


async def test_an_invite_is_told_once_joined_and_the_room_followed() -> None:
    sync = {"next_batch": "s1", "rooms": {"invite": {ROOM: INVITE}}}
    client, asked = await client_answering(sync, {**sync, "next_batch": "s2"})
    client.auto_join = True
    told: list[Invite] = []
    client.on_invite(told.append)
    await client.sync_once()
    await client.sync_once()  # a server repeating the invite: told once
    assert [(i.room_id, i.inviter, i.encrypted) for i in told] == [(ROOM, "@alice:x", False)]
    assert asked.count(f"/_matrix/client/v3/rooms/{ROOM}/join") == 1
    room = client.room(ROOM)
    assert room is not None
    assert room.joined == frozenset({ME})  # the junk in /state was skipped


async def test_a_looping_messages_answer_becomes_a_reported_gap() -> None:
    first = {"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": [message(1)]}}}}}
    limited = {
        "next_batch": "s2",
        "rooms": {
            "join": {
                ROOM: {"timeline": {"events": [message(9)], "limited": True, "prev_batch": "p"}}
            }
        },
    }
    loop = {"chunk": [message(8), message(7)], "end": "p"}
    client, asked = await client_answering(first, limited, messages=loop)
    seen: list[Any] = []
    client.on_room_event(seen.append)
    client.on_gap(seen.append)
    await client.sync_once(limit=1)
    await client.sync_once()
    gap = next(e for e in seen if isinstance(e, TimelineGap))
    assert (gap.after_event_id, gap.fetched, gap.before_event_id) == ("$m1", 2, "$m7")
    assert "repeated" in gap.reason
    order = [e.event_id if isinstance(e, RoomEvent) else "gap" for e in seen]
    assert order == ["$m1", "gap", "$m7", "$m8", "$m9"]
    assert asked.count(f"/_matrix/client/v3/rooms/{ROOM}/messages") == 1
    assert client.store is not None
    assert await client.store.get_value(POSITION_PREFIX + ROOM) == "$m9"


async def test_unhashable_event_ids_and_types_in_a_limited_timeline_raise_nothing() -> None:
    first = {"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": [message(1)]}}}}}
    junk: list[Any] = [
        {"type": "m.room.message", "event_id": ["$m1"]},
        {"type": ["m.room.member"], "event_id": "$t", "state_key": ""},
        {"type": "m.room.message", "event_id": {"id": 1}},
        message(9),
    ]
    limited = {
        "next_batch": "s2",
        "rooms": {
            "join": {ROOM: {"timeline": {"events": junk, "limited": True, "prev_batch": "p"}}}
        },
    }
    client, _ = await client_answering(
        first, limited, messages={"chunk": [message(5), message(1)], "end": "q"}
    )
    seen: list[Any] = []
    client.on_room_event(seen.append)
    client.on_gap(seen.append)
    await client.sync_once()
    await client.sync_once()
    delivered = [
        e.event_id for e in seen if isinstance(e, RoomEvent) and e.event_id.startswith("$m")
    ]
    assert delivered == ["$m1", "$m5", "$m9"]  # the gap filled, the junk skipped by the fill
    assert not any(isinstance(e, TimelineGap) for e in seen)
    assert client.store is not None
    assert await client.store.get_value("sync_token") == "s2"
    assert await client.store.get_value(POSITION_PREFIX + ROOM) == "$m9"


@pytest.mark.parametrize("prev_batch", [None, 7, ["p"]])
async def test_a_limited_timeline_without_prev_batch_is_reported(prev_batch: Any) -> None:
    first = {"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": [message(1)]}}}}}
    timeline: dict[str, Any] = {"events": [message(9)], "limited": True}
    if prev_batch is not None:
        timeline["prev_batch"] = prev_batch
    limited = {"next_batch": "s2", "rooms": {"join": {ROOM: {"timeline": timeline}}}}
    client, asked = await client_answering(first, limited)
    seen: list[Any] = []
    client.on_room_event(seen.append)
    client.on_gap(seen.append)
    await client.sync_once()
    await client.sync_once()
    order = [e.event_id if isinstance(e, RoomEvent) else "gap" for e in seen]
    assert order == ["$m1", "gap", "$m9"]
    gap = seen[1]
    assert (gap.after_event_id, gap.before_event_id, gap.fetched, gap.token) == (
        "$m1",
        "$m9",
        0,
        None,
    )
    assert not any(path.endswith("/messages") for path in asked)


async def test_a_limited_timeline_with_no_events_is_filled_and_moves_the_position() -> None:
    first = {"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": [message(1)]}}}}}
    empty = {
        "next_batch": "s2",
        "rooms": {"join": {ROOM: {"timeline": {"events": [], "limited": True, "prev_batch": "p"}}}},
    }
    # limited again: had the empty sync not moved the position to $m5, $m4 and $m5 came twice
    timeline = {"events": [message(6)], "limited": True, "prev_batch": "p2"}
    after = {"next_batch": "s3", "rooms": {"join": {ROOM: {"timeline": timeline}}}}
    history = {"chunk": [message(5), message(4), message(1)], "end": "q"}
    client, asked = await client_answering(first, empty, after, messages=history)
    seen: list[Any] = []
    client.on_room_event(seen.append)
    client.on_gap(seen.append)
    for _ in range(3):
        await client.sync_once()
    assert [e.event_id if isinstance(e, RoomEvent) else "gap" for e in seen] == [
        "$m1",
        "$m4",
        "$m5",
        "$m6",
    ]
    assert client.store is not None
    assert await client.store.get_value(POSITION_PREFIX + ROOM) == "$m6"
    assert asked.count(f"/_matrix/client/v3/rooms/{ROOM}/messages") == 2


async def test_close_during_a_gap_fill_ends_start_and_commits_nothing() -> None:
    first = {"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": [message(1)]}}}}}
    timeline = {"events": [message(9)], "limited": True, "prev_batch": "p"}
    limited = {"next_batch": "s2", "rooms": {"join": {ROOM: {"timeline": timeline}}}}
    syncs = iter([first, limited])
    in_gap, closed = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sync"):
            return httpx.Response(200, json=next(syncs, {"next_batch": "s9"}))
        in_gap.set()
        await closed.wait()  # the first page is out when the application closes
        return httpx.Response(200, json={"chunk": [message(8)], "end": "more"})

    client = await client_with(handler)
    store = client.store
    assert store is not None
    seen: list[Any] = []
    client.on_room_event(seen.append)
    client.on_gap(seen.append)
    running = asyncio.create_task(client.start(timeout_ms=0))
    await asyncio.wait_for(in_gap.wait(), 5)
    await client.close()
    closed.set()
    await asyncio.wait_for(running, 2)  # no RuntimeError, and no 5 s pause after the error
    assert [e.event_id for e in seen] == ["$m1"]  # nothing of the interrupted sync, no gap
    assert await store.get_value("sync_token") == "s1"  # it comes again on the next start
    assert await store.get_value(POSITION_PREFIX + ROOM) == "$m1"


async def test_a_sync_that_failed_after_its_gap_was_filled_fills_it_again() -> None:
    first = {"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": [message(1)]}}}}}
    timeline = {"events": [message(9)], "limited": True, "prev_batch": "p"}
    limited = {"next_batch": "s2", "rooms": {"join": {ROOM: {"timeline": timeline}}}}
    history = {"chunk": [message(5), message(1)], "end": "q"}
    client, _ = await client_answering(first, limited, limited, messages=history)
    seen: list[str] = []

    def fails_once(event: RoomEvent) -> None:
        if event.event_id == "$m5" and "failed" not in seen:
            seen.append("failed")
            raise RuntimeError("the application failed")
        seen.append(event.event_id)

    client.on_room_event(fails_once)
    await client.sync_once()
    with pytest.raises(RuntimeError):
        await client.sync_once()  # nothing committed: the same sync comes again
    await client.sync_once()
    # the position the failed sync moved to ($m9) was dropped: the gap is filled again
    assert seen == ["$m1", "failed", "$m5", "$m9"]
    assert client.store is not None
    assert await client.store.get_value(POSITION_PREFIX + ROOM) == "$m9"


async def test_an_invite_repeated_by_the_server_is_told_once_until_the_room_is_left() -> None:
    invited = {"rooms": {"invite": {ROOM: INVITE}}}
    rejected = {"next_batch": "s3", "rooms": {"leave": {ROOM: {}}}}
    syncs = [{**invited, "next_batch": "s1"}, {**invited, "next_batch": "s2"}, rejected]
    client, asked = await client_answering(*syncs, {**invited, "next_batch": "s4"})
    told: list[Invite] = []
    client.on_invite(told.append)
    for _ in range(4):
        await client.sync_once()
    assert [i.room_id for i in told] == [ROOM, ROOM]  # once, and again after the leave
    assert not any(path.endswith("/join") for path in asked)  # no auto_join


async def test_a_room_left_and_joined_again_has_no_gap_for_the_time_away() -> None:
    first = {"next_batch": "s1", "rooms": {"join": {ROOM: {"timeline": {"events": [message(1)]}}}}}
    left = {"next_batch": "s2", "rooms": {"leave": {ROOM: {}}}}
    timeline = {"events": [message(9)], "limited": True, "prev_batch": "p"}
    back = {"next_batch": "s3", "rooms": {"join": {ROOM: {"timeline": timeline}}}}
    away = {"chunk": [message(5), message(1)], "end": "q"}  # what happened while away
    client, asked = await client_answering(first, left, back, messages=away)
    seen: list[Any] = []
    client.on_room_event(seen.append)
    client.on_gap(seen.append)
    for _ in range(3):
        await client.sync_once()
    assert [e.event_id for e in seen] == ["$m1", "$m9"]
    assert not any(path.endswith("/messages") for path in asked)


async def test_a_joined_room_whose_state_cannot_be_read_does_not_stop_the_sync_loop() -> None:
    by_since = {
        None: {"next_batch": "s1", "rooms": {"join": {"!good:x": {"timeline": {"events": []}}}}},
        "s1": {
            "next_batch": "s2",
            "rooms": {
                "join": {
                    "!gone:x": {"timeline": {"events": [message(2)]}},
                    "!good:x": {"timeline": {"events": [message(3)]}},
                }
            },
        },
        "s2": {"next_batch": "s3", "rooms": {"join": {"!good:x": {"timeline": {"events": []}}}}},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sync"):  # an honest server: the same token, same answer
            return httpx.Response(200, json=by_since[request.url.params.get("since")])
        if "gone" in request.url.path:
            return httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "not in room"})
        return httpx.Response(200, json=[member(ME, "join")])

    client = await client_with(handler)
    store = client.store
    assert store is not None
    seen: list[str] = []
    client.on_room_event(lambda event: seen.append(event.event_id))
    for _ in range(3):
        await client.sync_once()
    assert seen == ["$m2", "$m3"]  # its events are delivered all the same
    assert await store.get_value("sync_token") == "s3"
    assert set(client.rooms) == {"!good:x"}  # not followed until its state can be read


@pytest.mark.parametrize(
    "bad_room",
    ["!" + secrets.token_hex(4000) + ":x", "!\ud800:x"],  # too long to index; no UTF-8
)
async def test_a_room_id_the_spec_does_not_allow_never_stops_the_sync_loop(
    backend: Backend, bad_room: str
) -> None:
    by_since = {
        None: {
            "next_batch": "s1",
            "rooms": {
                "join": {
                    bad_room: {"timeline": {"events": [message(1)]}},
                    ROOM: {"timeline": {"events": [message(2)]}},
                },
                "leave": {bad_room: {}},
            },
        },
        "s1": {"next_batch": "s2", "rooms": {"join": {ROOM: {"timeline": {"events": []}}}}},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sync"):
            body = json.dumps(by_since[request.url.params.get("since")])
            return httpx.Response(200, content=body.encode())
        return httpx.Response(200, json=[])

    store = await backend.open()
    client = await client_with(handler, store)
    seen: list[str] = []
    client.on_room_event(lambda event: seen.append(event.event_id))
    for _ in range(2):
        await client.sync_once()
    assert seen == ["$m2"]
    assert await store.get_value("sync_token") == "s2"
    assert set(client.rooms) == {ROOM}
    assert await store.get_value(POSITION_PREFIX + ROOM) == "$m2"


async def test_a_cancelled_sync_cancels_its_long_poll() -> None:
    polling, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        polling.set()
        try:
            await asyncio.sleep(3600)  # the server holds the long-poll
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return httpx.Response(200, json={"next_batch": "never"})

    client = await client_with(handler)
    syncing = asyncio.create_task(client.start())
    await asyncio.wait_for(polling.wait(), 5)
    syncing.cancel()  # an application shutting down cancels its sync task
    with pytest.raises(asyncio.CancelledError):
        await syncing
    await asyncio.wait_for(cancelled.wait(), 5)  # not left running, unawaited
