"""The to-device outbox: what the machine promised to send, kept until the server confirms it.

Room key shares, ``m.room_key.withheld`` notices and ``m.dummy`` messages are
committed to the store (``Changes.outbox``) in the same transaction as the
ratchet steps that made their ciphertext, before the request leaves the machine;
each is removed (``Changes.outbox_sent``) only in the transaction that records
the server's confirmation. After a crash, ``take_unsent`` hands every one of them
out again, unchanged: the same transaction ID (the server drops a repeat it
already has) and the same ciphertext. A share's recipients count as holding the
key only once its request is confirmed (``OlmMachine`` records them then). A
request that failed goes out again after a backoff of its own (2 s doubling to
5 minutes, or the server's ``retry_after``), so a server that refuses it does not
get it again in the same round, and the others are not held back.
"""

from __future__ import annotations

from olmstead.backoff import Backoff
from olmstead.errors import MatrixHttpError, OlmsteadError
from olmstead.requests import ToDeviceRequest
from olmstead.store.base import Changes, CryptoStore, OutboxEntry

__all__ = ["Outbox"]


class Outbox:
    def __init__(self) -> None:
        self._entries: dict[str, OutboxEntry] = {}
        self._unsent: list[str] = []
        #: entries that failed: not handed out again before their backoff allows
        self._backoff: dict[str, Backoff] = {}
        self._loaded = False

    async def load(self, store: CryptoStore) -> None:
        """Read the outbox (at start, and after a reload): every entry is handed out again."""
        entries = await store.get_outbox()
        self._entries = {entry.request_id: entry for entry in entries}
        self._unsent = [entry.request_id for entry in entries]
        self._backoff.clear()
        self._loaded = True

    @property
    def loaded(self) -> bool:
        return self._loaded

    def forget(self) -> None:
        """Drop what is in memory; the next ``load`` reads the store again."""
        self._entries.clear()
        self._unsent.clear()
        self._backoff.clear()
        self._loaded = False

    def add(self, entry: OutboxEntry, changes: Changes) -> ToDeviceRequest:
        """Put ``entry`` in ``changes``; call ``committed`` once they are committed."""
        changes.outbox.append(entry)
        return request_of(entry)

    def committed(self, entries: list[OutboxEntry], *, hand_out: bool = False) -> None:
        """The entries are in the store: handed out by the caller that made them, or by
        the next ``take_unsent`` if ``hand_out``."""
        for entry in entries:
            self._entries[entry.request_id] = entry
            if hand_out:
                self._unsent.append(entry.request_id)

    def owns(self, request_id: str) -> bool:
        return request_id in self._entries

    def get(self, request_id: str) -> OutboxEntry | None:
        return self._entries.get(request_id)

    def take_unsent(self, now: float) -> list[ToDeviceRequest]:
        """Entries not handed out since they were loaded or failed, oldest first; one that
        failed only once its backoff passed (``now``: seconds, the machine's clock)."""
        ready: list[str] = []
        waiting: list[str] = []
        for request_id in self._unsent:
            if request_id not in self._entries:
                continue
            backoff = self._backoff.get(request_id)
            (ready if backoff is None or backoff.ready(now) else waiting).append(request_id)
        self._unsent = waiting
        return [request_of(self._entries[r]) for r in ready]

    def failed(self, request_id: str, error: OlmsteadError, now: float) -> None:
        """The request got no answer or an error: it goes out again, unchanged, after a
        backoff (at least the ``retry_after`` a rate-limited answer asked for)."""
        if request_id not in self._entries:
            return
        wait = error.retry_after if isinstance(error, MatrixHttpError) else None
        self._backoff.setdefault(request_id, Backoff()).failed(now, wait or 0.0)
        if request_id not in self._unsent:
            self._unsent.append(request_id)

    def confirm(self, request_id: str, changes: Changes) -> OutboxEntry | None:
        """Record in ``changes`` that the server confirmed ``request_id``; call ``settled``
        once they are committed."""
        entry = self._entries.get(request_id)
        if entry is not None:
            changes.outbox_sent.add(request_id)
        return entry

    def settled(self, request_id: str) -> None:
        self._entries.pop(request_id, None)
        self._backoff.pop(request_id, None)
        if request_id in self._unsent:
            self._unsent.remove(request_id)

    def pending_recipients(self, room_id: str, session_id: str) -> dict[str, dict[str, int]]:
        """Who unconfirmed shares of a session go to: user -> device -> message index."""
        found: dict[str, dict[str, int]] = {}
        for entry in self._entries.values():
            if (entry.room_id, entry.session_id) == (room_id, session_id):
                for user_id, devices in entry.recipients.items():
                    found.setdefault(user_id, {}).update(devices)
        return found


def request_of(entry: OutboxEntry) -> ToDeviceRequest:
    return ToDeviceRequest(entry.request_id, entry.event_type, entry.messages)
