"""The queue of room events waiting for their room key, kept in the store.

An encrypted room event whose key has not come (``UnknownRoomKey``) or was
withheld (``RoomKeyWithheld``) is kept (``Changes.waiting_events``), committed
with the sync token of the response that brought it, so a restart neither
loses it nor needs the server to send it again. The machine tells the queue
whenever room keys or withheld notices are committed (from a sync, a forwarded
key, an import or a backup restore); the next ``OlmMachine.retry_waiting_events``
decrypts the events of those sessions again. Each kept event ends in exactly
one of two ways, after which the caller settles it (``Changes.settled_events``):

- delivered, once its key decrypts it;
- reported as final: its wait passed ``DeliverySettings.key_wait``, the queue
  grew past ``max_waiting`` (the oldest go first), or the key came and still
  does not decrypt it (a key from a later index, a replay, a forgery).

Nothing here writes: the machine commits what the queue puts in ``Changes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from olmstead.errors import DecryptionError, LocalProtocolError, RoomKeyWithheld, UnknownRoomKey
from olmstead.sessions.group_sessions import DecryptedRoomEvent
from olmstead.store.base import CryptoStore, WaitingRoomEvent, WithheldRecord

__all__ = ["DeliverySettings", "RoomEventQueue", "WaitingResult"]

Pair = tuple[str, str]


@dataclass(frozen=True)
class DeliverySettings:
    """How long and how many room events may wait for their key.

    ``key_wait``: seconds an event waits before it is reported as final (15
    minutes: to-device messages and forwarded keys can lag by minutes, a key
    that has not come by then rarely comes on its own). ``max_waiting``: events
    kept at most; past it the oldest are reported as final first.
    """

    key_wait: float = 900.0
    max_waiting: int = 1000

    def __post_init__(self) -> None:
        if not (self.key_wait >= 0 and self.max_waiting > 0):
            raise LocalProtocolError("key_wait must be >= 0 and max_waiting > 0")


@dataclass(frozen=True)
class WaitingResult:
    """What became of a kept room event: delivered, or reported (final or not)."""

    room_id: str
    event: Mapping[str, Any]
    result: DecryptedRoomEvent | DecryptionError

    @property
    def settles(self) -> bool:
        """Whether the event leaves the queue (delivered, or reported as final)."""
        return not isinstance(self.result, DecryptionError) or self.result.final

    @property
    def event_id(self) -> str:
        return str(self.event.get("event_id", ""))


class RoomEventQueue:
    def __init__(self, settings: DeliverySettings) -> None:
        self.settings = settings
        #: sessions whose key (or a withheld notice) was committed since the last retry
        self._arrived: set[Pair] = set()
        #: a notice that covers every session of a device came: look at every event
        self._arrived_all = False
        #: whose new notices came since the last retry: (room, session, sender), and the
        #: senders of notices for every session; only their events are told again
        self._told: set[tuple[str, str, str]] = set()
        self._told_all: set[str] = set()
        #: read every kept event at the next retry (at start, after a reload)
        self._resume = True
        #: when the oldest kept event runs out of time (inf: none kept)
        self._next_due = 0.0
        #: events were kept since the queue was last counted
        self._grown = True
        #: what the last retry looked at, cleared once its outcomes are committed
        self._looked: tuple[set[Pair], bool, bool] | None = None
        self._looked_told: tuple[set[tuple[str, str, str]], set[str]] = (set(), set())

    # --- what the machine tells it ------------------------------------------------------------

    def sessions_committed(self, pairs: Iterable[Pair]) -> None:
        """Room keys or withheld notices for these (room, session) pairs were committed."""
        for room_id, session_id in pairs:
            if session_id:
                self._arrived.add((room_id, session_id))
            else:  # an m.no_olm for every session of a device
                self._arrived_all = True

    def notices_committed(self, notices: Iterable[WithheldRecord]) -> None:
        """New withheld notices were committed: their sessions are looked at, and the
        events of their senders told of them."""
        notices = list(notices)
        self.sessions_committed((n.room_id, n.session_id) for n in notices)
        for notice in notices:
            if notice.session_id:
                self._told.add((notice.room_id, notice.session_id, notice.sender))
            else:
                self._told_all.add(notice.sender)

    def forget(self) -> None:
        """After a reload: read everything from the store again."""
        self._resume, self._next_due, self._grown, self._looked = True, 0.0, True, None

    # --- keeping events -----------------------------------------------------------------------

    def records(
        self, events: Sequence[tuple[str, Mapping[str, Any]]], now: float
    ) -> list[WaitingRoomEvent]:
        """Queue records for room events to keep (their order is kept)."""
        found = []
        for position, (room_id, event) in enumerate(events):
            content = event.get("content")
            session_id = content.get("session_id") if isinstance(content, Mapping) else None
            event_id = event.get("event_id")
            if not (isinstance(session_id, str) and isinstance(event_id, str)):
                continue  # such an event fails for good; it is never kept
            found.append(
                WaitingRoomEvent(room_id, event_id, session_id, dict(event), now, position)
            )
        return found

    def kept(self, records: Sequence[WaitingRoomEvent]) -> None:
        """``records`` were committed."""
        if records:
            self._grown = True
            due = min(r.received_at for r in records) + self.settings.key_wait
            self._next_due = min(self._next_due, due)

    # --- retrying -----------------------------------------------------------------------------

    async def candidates(
        self, store: CryptoStore, now: float
    ) -> tuple[list[WaitingRoomEvent], int]:
        """The kept events to decrypt again now, and how many of the oldest are over the bound."""
        over = 0
        if self._grown:
            over = max(0, await store.count_waiting_events() - self.settings.max_waiting)
            self._grown = False
        full = self._resume or self._arrived_all or over > 0 or now >= self._next_due
        looked = set(self._arrived)
        self._looked = (looked, full, self._arrived_all)
        self._looked_told = (set(self._told), set(self._told_all))
        if full:
            entries = await store.get_waiting_events()
            wait = self.settings.key_wait
            # those due now are reported and settled by this round: the next due is another's
            pending = [e.received_at + wait for e in entries[over:] if now - e.received_at < wait]
            self._next_due = min(pending, default=math.inf)
            return entries, over
        if not looked:
            return [], 0
        entries = await store.get_waiting_events({session for _room, session in looked})
        return [e for e in entries if (e.room_id, e.session_id) in looked], 0

    def outcomes(
        self,
        entries: Sequence[WaitingRoomEvent],
        results: Sequence[DecryptedRoomEvent | DecryptionError],
        over: int,
        now: float,
    ) -> list[WaitingResult]:
        """What the application is told of each event decrypted again (nothing if it is
        still waiting and nothing new is known of its key)."""
        told, told_all = self._looked_told
        found = []
        for n, (entry, result) in enumerate(zip(entries, results, strict=True)):
            due = n < over or now - entry.received_at >= self.settings.key_wait
            if not isinstance(result, UnknownRoomKey | RoomKeyWithheld):
                found.append(WaitingResult(entry.room_id, entry.event, result))
            elif due:
                found.append(WaitingResult(entry.room_id, entry.event, _final(result, entry, now)))
            elif isinstance(result, RoomKeyWithheld) and (
                (entry.room_id, entry.session_id, result.sender) in told
                or result.sender in told_all
            ):  # its sender's notice came while it waited: told now, still kept
                result.final = False
                found.append(WaitingResult(entry.room_id, entry.event, result))
        return found

    def settled(self) -> None:
        """The outcomes of the last retry were committed: those sessions were looked at."""
        if self._looked is None:
            return
        looked, full, arrived_all = self._looked
        self._arrived -= looked
        if full:
            self._resume = False
        if arrived_all:
            self._arrived_all = False
        self._told -= self._looked_told[0]
        self._told_all -= self._looked_told[1]
        self._looked = None


def _final(
    error: UnknownRoomKey | RoomKeyWithheld, entry: WaitingRoomEvent, now: float
) -> DecryptionError:
    waited = f"gave up after waiting {now - entry.received_at:.0f} s for the key"
    if isinstance(error, RoomKeyWithheld):
        return RoomKeyWithheld(
            f"{error} ({waited})", error.sender, error.session_id, error.code, error.reason
        )
    return UnknownRoomKey(f"{error}; {waited}", error.sender, error.session_id)
