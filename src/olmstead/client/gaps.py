"""Gaps in a room's timeline: fetched with ``/messages``, or reported.

A sync's timeline for a joined room is ``limited`` when more events happened
since the last sync than it carries (spec "Syncing": ``prev_batch`` then points
just before its first event). The client remembers, per room, the last event it
took from the timeline (``POSITION_PREFIX`` + room ID among the store's values,
committed with the sync token), and fills the gap by paging back with
``GET /rooms/{roomId}/messages?dir=b&from=<prev_batch>`` until it meets that
event. The events found are delivered in order before the sync's own timeline.

Bounded: at most ``MAX_GAP_PAGES`` pages of ``GAP_PAGE_SIZE`` events and
``MAX_GAP_EVENTS`` events per room and sync. What is not fetched (the bound was
reached, the server failed or answered nonsense, or repeated a token) is reported
as a ``TimelineGap``. A room seen for the first time has no position, so its
limited timeline is where the client's history starts, not a gap.

Every field of an answer is checked: ``chunk`` must be a list (items that are not
events with a string ``event_id`` and ``type``, or that name another room, are
skipped), ``end`` a string or absent (absent: the room's history ends there).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from olmstead.errors import RemoteProtocolError, TransportError
from olmstead.http.endpoints import CLIENT_V3
from olmstead.http.transport import MatrixHttp
from olmstead.store.base import CryptoStore

__all__ = ["GAP_PAGE_SIZE", "MAX_GAP_EVENTS", "MAX_GAP_PAGES", "TimelineGap", "Timelines"]

log = logging.getLogger(__name__)

#: events asked for per ``/messages`` page
GAP_PAGE_SIZE = 100
#: pages fetched per room and sync, at most
MAX_GAP_PAGES = 10
#: events kept per room and sync, at most (the newest; older ones are reported)
MAX_GAP_EVENTS = 1000
#: the store value naming the last event taken from a room's timeline
POSITION_PREFIX = "timeline_position:"

Event = Mapping[str, Any]


@dataclass(frozen=True)
class TimelineGap:
    """Events of a room the client could not fetch, between two it delivered.

    The missing events lie after ``after_event_id`` (the last event delivered
    before) and before ``before_event_id`` (the first delivered after, ``None`` if
    the sync brought no event with an ID). The server does not say how many they
    are: ``fetched`` events of the gap were delivered (the newest ones), the rest
    are missing, at least one. ``token`` is where paging back stopped
    (``GET /rooms/{roomId}/messages?dir=b&from=<token>``), ``None`` when no page
    came; ``reason`` says why it stopped.
    """

    room_id: str
    after_event_id: str
    before_event_id: str | None
    fetched: int
    token: str | None
    reason: str


class Timelines:
    """Where each room's timeline was last read, and the gap filling."""

    def __init__(self, http: MatrixHttp, store: CryptoStore | None) -> None:
        self.http = http
        self.store = store
        self._positions: dict[str, str | None] = {}
        self._moved: dict[str, str | None] = {}

    async def position(self, room_id: str) -> str | None:
        """The last event taken from ``room_id``'s timeline (``None``: never seen)."""
        if room_id in self._moved:
            return self._moved[room_id]
        if room_id not in self._positions:
            stored = None
            if self.store is not None:
                stored = await self.store.get_value(POSITION_PREFIX + room_id)
            self._positions[room_id] = stored
        return self._positions[room_id]

    def moved(self, room_id: str, events: Sequence[Event]) -> None:
        """The events of a room's timeline were taken; the newest is its position."""
        for event in reversed(events):
            event_id = event.get("event_id")
            if isinstance(event_id, str):
                self._moved[room_id] = event_id
                return

    def left(self, room_id: str) -> None:
        """We left the room: what happens there until we are back is no gap of ours."""
        self._moved[room_id] = None

    def changes(self) -> dict[str, str | None]:
        """The positions to commit with the sync token (``Changes.values``)."""
        return {POSITION_PREFIX + room_id: event_id for room_id, event_id in self._moved.items()}

    def committed(self) -> None:
        self._positions.update(self._moved)
        self._moved.clear()

    def forget(self) -> None:
        """Drop positions not committed (the sync that moved them failed)."""
        self._moved.clear()

    async def fill(
        self, room_id: str, section: Any, timeline: Sequence[Event]
    ) -> tuple[list[Event], TimelineGap | None]:
        """The events missing before a sync's timeline for ``room_id``, oldest first.

        ``section`` is the room's ``timeline`` object from the sync, ``timeline``
        its events. Nothing is fetched unless it is ``limited``, the room has a
        position and that event is not in the timeline; a ``limited`` timeline
        without a string ``prev_batch`` is reported as a gap at once.
        """
        if not isinstance(section, Mapping) or section.get("limited") is not True:
            return [], None
        token, last = section.get("prev_batch"), await self.position(room_id)
        if last is None:
            return [], None
        # only string IDs: a hostile event_id (a list, an object) is unhashable
        in_sync = {e["event_id"] for e in timeline if isinstance(e.get("event_id"), str)}
        if last in in_sync:
            return [], None
        first = next((e["event_id"] for e in timeline if isinstance(e.get("event_id"), str)), None)
        if not isinstance(token, str):  # events were skipped, and nowhere to page back from
            log.warning("a gap in %s after %s: the sync gave no prev_batch", room_id, last)
            why = "the sync's limited timeline has no prev_batch to page back from"
            return [], TimelineGap(room_id, last, first, 0, None, why)
        found, token, reason = await self._page_back(room_id, token, last, in_sync)
        found.reverse()
        gap = None
        if reason is not None:
            gap = TimelineGap(
                room_id,
                last,
                found[0]["event_id"] if found else first,
                len(found),
                token,
                reason,
            )
            log.warning("a gap in %s after %s: %s", room_id, last, reason)
        return found, gap

    async def _page_back(
        self, room_id: str, token: str, last: str, in_sync: set[str]
    ) -> tuple[list[Event], str | None, str | None]:
        """Events newest first until ``last``; the token reached; why it stopped early."""
        found: list[Event] = []
        seen = set(in_sync)
        tokens = {token}
        path = f"{CLIENT_V3}/rooms/{quote(room_id)}/messages"
        for _ in range(MAX_GAP_PAGES):
            params = {"dir": "b", "from": token, "limit": str(GAP_PAGE_SIZE)}
            try:
                answer = await self.http.request("GET", path, params=params)
            except (TransportError, RemoteProtocolError) as error:
                return found, token, f"the server did not answer /messages: {error}"
            chunk, end = answer.get("chunk"), answer.get("end")
            if not isinstance(chunk, list):
                return found, token, "the server's /messages answer has no chunk list"
            for event in chunk:
                if not _is_event(event, room_id) or event["event_id"] in seen:
                    continue
                if event["event_id"] == last:
                    return found, token, None
                if len(found) >= MAX_GAP_EVENTS:
                    return found, token, f"more than {MAX_GAP_EVENTS} events are missing"
                seen.add(event["event_id"])
                found.append(event)
            if end is None:
                return found, token, None  # the room's history ends here
            if not isinstance(end, str):
                return found, token, "the server's /messages answer has an end that is no string"
            if end in tokens:
                return found, token, "the server repeated a /messages token"
            tokens.add(end)
            token = end
        return found, token, f"not reached within {MAX_GAP_PAGES} pages of /messages"


def _is_event(event: Any, room_id: str) -> bool:
    return (
        isinstance(event, Mapping)
        and isinstance(event.get("event_id"), str)
        and isinstance(event.get("type"), str)
        and event.get("room_id", room_id) == room_id
    )
