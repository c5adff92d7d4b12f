"""Gaps in a room's timeline against the real Synapse (issue 13, item 6).

The receiver is stopped while more events are sent than its sync filter's
timeline limit; when it starts again its first sync is ``limited``, and the
client fetches the rest with ``/messages``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from olmstead.client import gaps
from olmstead.client.gaps import TimelineGap
from olmstead.client.rooms import RoomEvent
from tests.conftest import record_commits
from tests.integration.harness import Wire, close_client, open_client, session_of
from tests.integration.test_messaging import messages, two_in_a_room

MESSAGES_PATH = "/messages"
LIMIT = 5


async def restarted(
    url: str, path: Path, user: dict[str, Any]
) -> tuple[Any, list[Any], list[TimelineGap], Wire]:
    wire = Wire()
    client = await open_client(url, path, session_of(url, user), wire)
    await client.init_crypto()
    seen: list[Any] = []
    found: list[TimelineGap] = []
    client.on_room_event(seen.append)
    client.on_decryption_failure(lambda room, event, error: seen.append(error))
    client.on_gap(found.append)
    return client, seen, found, wire


async def run_until(client: Any, seen: list[Any], count: int) -> None:
    """``start()`` (its first sync has the timeline limit) until ``count`` messages came."""
    enough = asyncio.Event()

    def count_them(_event: RoomEvent) -> None:
        if len(messages(seen)) >= count:
            enough.set()

    client.on_room_event(count_them)
    running = asyncio.create_task(client.start(initial_sync_limit=LIMIT, timeout_ms=500))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(enough.wait(), 30)
    await asyncio.sleep(1.0)  # a few more syncs: nothing may come twice
    client.stop()
    await asyncio.wait_for(running, 10)


async def test_events_sent_while_stopped_arrive_once_and_in_order(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    a_user, b_user = new_user(), new_user()
    (alice, _), (bob, _), room = await two_in_a_room(url, tmp_path, a_user, b_user)
    await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "before"})
    await bob.sync_once()
    await close_client(bob)

    sent = [f"while stopped {n}" for n in range(6 * LIMIT)]
    for body in sent:
        await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": body})

    bob, seen, found, wire = await restarted(url, tmp_path / "bob.db", b_user)
    assert bob.store is not None
    committed = record_commits(bob.store)
    await run_until(bob, seen, len(sent))
    assert [body for _s, body, _e in messages(seen)] == sent  # once each, in order
    assert all(encrypted for _s, _b, encrypted in messages(seen))
    assert [e for e in seen if not isinstance(e, RoomEvent)] == []
    assert found == []
    assert any(path.endswith(MESSAGES_PATH) for _m, path, _p in wire.requests)
    # the gap and the sync's own timeline were decrypted in one batch
    assert next(len(c.message_indices) for c in committed if c.message_indices) == len(sent)
    await close_client(alice)
    await close_client(bob)


async def test_what_the_bound_leaves_out_is_reported_as_a_gap(
    homeserver: Any, new_user: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = homeserver.base_url
    a_user, b_user = new_user(), new_user()
    (alice, _), (bob, _), room = await two_in_a_room(url, tmp_path, a_user, b_user)
    before = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "before"})
    await bob.sync_once()
    await close_client(bob)
    sent = [f"while stopped {n}" for n in range(6 * LIMIT)]
    for body in sent:
        await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": body})

    monkeypatch.setattr(gaps, "GAP_PAGE_SIZE", 4)
    monkeypatch.setattr(gaps, "MAX_GAP_PAGES", 2)
    monkeypatch.setattr(gaps, "MAX_GAP_EVENTS", 8)
    bob, seen, found, _wire = await restarted(url, tmp_path / "bob.db", b_user)
    await run_until(bob, seen, 8 + LIMIT)
    got = [body for _s, body, _e in messages(seen)]
    assert got == sent[-(8 + LIMIT) :]  # the newest, once each, in order
    (gap,) = found
    assert (gap.room_id, gap.fetched) == (room, 8)
    assert gap.token is not None
    assert gap.after_event_id == before  # the last event bob took before he stopped
    first_after = next(e for e in seen if isinstance(e, RoomEvent) and e.type == "m.room.message")
    assert gap.before_event_id == first_after.event_id
    await close_client(alice)
    await close_client(bob)
