"""Filling a limited timeline's gap from ``/messages``, with hostile answers.

A real Synapse fills gaps in tests/integration/test_gaps.py; here httpx's mock
transport answers what no honest server would (wrong types, a missing ``end``, a
token repeated forever, endless history) to pin down each bound and check.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from olmstead import Changes, MemoryDatabase, MemoryStore
from olmstead.client.gaps import (
    GAP_PAGE_SIZE,
    MAX_GAP_EVENTS,
    MAX_GAP_PAGES,
    POSITION_PREFIX,
    Timelines,
)
from olmstead.http import MatrixHttp, RetryPolicy
from tests.conftest import FAST_LEASE, KEY

ROOM = "!room:x"
Answer = Callable[[httpx.Request], httpx.Response]


def event(n: int, room_id: str = ROOM) -> dict[str, Any]:
    return {"type": "m.room.message", "event_id": f"$e{n}", "room_id": room_id, "sender": "@a:x"}


def history(newest: int) -> Answer:
    """An honest room: events 0..newest; tokens are positions, paging back."""

    def answer(request: httpx.Request) -> httpx.Response:
        start = int(request.url.params["from"])
        limit = int(request.url.params["limit"])
        assert request.url.params["dir"] == "b"
        chunk = [event(n) for n in range(start, max(start - limit, -1), -1)]
        body: dict[str, Any] = {"chunk": chunk, "start": str(start)}
        if start - limit >= 0:
            body["end"] = str(start - limit)
        return httpx.Response(200, json=body)

    return answer


async def timelines_with(
    answer: Answer, position: str | None = "$e3"
) -> tuple[Timelines, list[Any]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    http = MatrixHttp(
        "https://hs.example", transport=httpx.MockTransport(handler), retry=RetryPolicy(attempts=1)
    )
    store = await MemoryStore.open(KEY, MemoryDatabase(), lease=FAST_LEASE)
    if position is not None:
        await store.save_changes(Changes(values={POSITION_PREFIX + ROOM: position}))
    return Timelines(http, store), seen


def limited(token: str = "9") -> dict[str, Any]:
    return {"limited": True, "prev_batch": token}


async def test_the_gap_is_fetched_back_to_the_last_event_and_given_oldest_first() -> None:
    timelines, seen = await timelines_with(history(9))
    found, gap = await timelines.fill(ROOM, limited(), [event(10), event(11)])
    assert [e["event_id"] for e in found] == ["$e4", "$e5", "$e6", "$e7", "$e8", "$e9"]
    assert gap is None
    assert len(seen) == 1


async def test_nothing_is_fetched_unless_limited_with_a_known_position() -> None:
    timelines, seen = await timelines_with(history(9))
    assert await timelines.fill(ROOM, {"limited": False, "prev_batch": "9"}, [event(10)]) == (
        [],
        None,
    )
    found, gap = await timelines.fill(ROOM, {"limited": True}, [event(10)])
    assert found == []  # nowhere to page back from: nothing fetched, the gap reported
    assert gap is not None
    assert (gap.after_event_id, gap.before_event_id, gap.fetched, gap.token) == (
        "$e3",
        "$e10",
        0,
        None,
    )
    assert "prev_batch" in gap.reason
    assert await timelines.fill(ROOM, limited(), [event(3), event(4)]) == ([], None)  # in the sync
    fresh, seen_fresh = await timelines_with(history(9), position=None)
    assert await fresh.fill(ROOM, limited(), [event(10)]) == ([], None)  # a new room: no gap
    assert seen == seen_fresh == []


async def test_positions_move_with_the_timeline_and_are_committed_with_the_token() -> None:
    timelines, _ = await timelines_with(history(9))
    timelines.moved(ROOM, [event(10), {"type": "x"}, event(11), {"event_id": 5}])
    assert timelines.changes() == {POSITION_PREFIX + ROOM: "$e11"}
    timelines.forget()  # the sync failed before its token was committed
    assert timelines.changes() == {}
    assert await timelines.position(ROOM) == "$e3"
    timelines.moved(ROOM, [event(12)])
    timelines.committed()
    assert await timelines.position(ROOM) == "$e12"
    timelines.left(ROOM)
    assert timelines.changes() == {POSITION_PREFIX + ROOM: None}  # deleted with the token


async def test_a_gap_longer_than_the_bound_keeps_the_newest_and_reports_the_rest() -> None:
    newest = MAX_GAP_EVENTS + 500
    timelines, seen = await timelines_with(history(newest))
    found, gap = await timelines.fill(ROOM, limited(str(newest)), [event(newest + 1)])
    assert len(found) == MAX_GAP_EVENTS
    assert found[-1]["event_id"] == f"$e{newest}"
    assert len(seen) <= MAX_GAP_PAGES
    assert gap is not None
    assert (gap.room_id, gap.after_event_id, gap.fetched) == (ROOM, "$e3", MAX_GAP_EVENTS)
    assert gap.before_event_id == found[0]["event_id"]
    assert gap.token is not None
    assert "pages" in gap.reason


async def test_a_server_that_ignores_the_page_size_is_bounded_by_events() -> None:
    greedy = always({"chunk": [event(n) for n in range(5000, 3, -1)], "end": "x"})
    timelines, seen = await timelines_with(greedy)
    found, gap = await timelines.fill(ROOM, limited(), [event(5001)])
    assert len(found) == MAX_GAP_EVENTS
    assert len(seen) == 1
    assert found[-1]["event_id"] == "$e5000"  # the newest kept
    assert gap is not None
    assert str(MAX_GAP_EVENTS) in gap.reason


def always(body: Any, status: int = 200) -> Answer:
    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=json.dumps(body).encode())

    return answer


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (always({"chunk": [event(8)], "end": "9"}), "repeated"),  # loops on the same token
        (always({"chunk": "events", "end": "1"}), "chunk"),
        (always({"end": "1"}), "chunk"),
        (always({"chunk": [event(8)], "end": 7}), "end"),
        (always([1, 2, 3]), "did not answer"),
        (always({"errcode": "M_FORBIDDEN", "error": "no"}, 403), "did not answer"),
        (always("not json at all"), "did not answer"),
    ],
)
async def test_hostile_answers_stop_the_paging_and_are_reported(
    answer: Answer, reason: str
) -> None:
    timelines, seen = await timelines_with(answer)
    found, gap = await timelines.fill(ROOM, limited(), [event(10)])
    assert gap is not None
    assert reason in gap.reason
    assert gap.after_event_id == "$e3"
    assert len(seen) <= 2
    assert all(e["event_id"] == "$e8" for e in found)


async def test_tokens_that_never_repeat_are_bounded_by_pages() -> None:
    pages = iter(range(10**6))

    def endless(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"chunk": [], "end": f"t{next(pages)}"})

    timelines, seen = await timelines_with(endless)
    found, gap = await timelines.fill(ROOM, limited(), [event(10)])
    assert found == []
    assert gap is not None
    assert len(seen) == MAX_GAP_PAGES
    assert "pages" in gap.reason


async def test_events_that_are_malformed_repeated_or_of_another_room_are_skipped() -> None:
    chunk: list[Any] = [
        event(9),
        event(9),  # a repeat
        event(10),  # already in the sync's timeline
        {"type": "m.room.message", "event_id": 8},
        {"event_id": "$notype"},
        "not an event",
        None,
        event(7, room_id="!other:x"),
        event(6),
        event(3),  # the last delivered: the gap ends here
        event(2),
    ]
    timelines, _ = await timelines_with(always({"chunk": chunk, "end": "x"}))
    found, gap = await timelines.fill(ROOM, limited(), [event(10)])
    assert [e["event_id"] for e in found] == ["$e6", "$e9"]
    assert gap is None


async def test_a_history_that_ends_before_the_last_event_is_no_gap() -> None:
    timelines, _ = await timelines_with(always({"chunk": [event(5), event(4)]}))  # no end
    found, gap = await timelines.fill(ROOM, limited(), [event(10)])
    assert [e["event_id"] for e in found] == ["$e4", "$e5"]
    assert gap is None


def test_the_bounds_are_consistent() -> None:
    assert GAP_PAGE_SIZE * MAX_GAP_PAGES >= MAX_GAP_EVENTS
