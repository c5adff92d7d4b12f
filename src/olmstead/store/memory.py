"""The in-memory store: for tests and for bots that may lose their device on exit.

It keeps pickles, not live objects, so it behaves like the durable backends: what
a caller changes after ``save_changes`` does not leak into the store. Several
``MemoryStore`` handles may share one ``MemoryDatabase`` to exercise the lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from olmstead.errors import StoreLockLost
from olmstead.store.base import (
    CryptoStore,
    LeaseSettings,
    LockRow,
    MessageIndex,
    SerializedChanges,
    new_holder_name,
    next_lock_row,
)
from olmstead.store.pickle_key import DerivedKey, PickleKey

__all__ = ["MemoryDatabase", "MemoryStore"]


@dataclass
class MemoryDatabase:
    """What a memory store holds; share it between handles to share the store."""

    name: str = "memory store"
    key_check: str | None = None
    account: tuple[str, str, str, str] | None = None
    values: dict[str, str] = field(default_factory=dict)
    #: (user_id, device_id) -> (curve25519, data JSON)
    devices: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    tracked_users: dict[str, bool] = field(default_factory=dict)
    #: (sender_key, session_id) -> (pickle, created_at, last_used)
    olm_sessions: dict[tuple[str, str], tuple[str, float, float]] = field(default_factory=dict)
    #: (room_id, session_id) -> (sender_key, signing_key, pickle)
    inbound_group: dict[tuple[str, str], tuple[str, str, str]] = field(default_factory=dict)
    #: room_id -> (pickle, state JSON)
    outbound_group: dict[str, tuple[str, str]] = field(default_factory=dict)
    message_indices: dict[tuple[str, int], MessageIndex] = field(default_factory=dict)
    #: (room_id, event_id) -> (session_id, event JSON, received_at, position)
    waiting: dict[tuple[str, str], tuple[str, str, float, int]] = field(default_factory=dict)
    #: (room_id, session_id, sender_key) -> (sender, code, reason)
    withheld: dict[tuple[str, str, str], tuple[str, str, str]] = field(default_factory=dict)
    #: request_id -> (created_at, data JSON), in insertion order
    outbox: dict[str, tuple[float, str]] = field(default_factory=dict)
    #: user_id -> identity JSON
    user_identities: dict[str, str] = field(default_factory=dict)
    #: (sealed secrets, state JSON) of our cross-signing identity
    cross_signing: tuple[str, str] | None = None
    lock: LockRow | None = None


class MemoryStore(CryptoStore):
    def __init__(
        self, db: MemoryDatabase, key: DerivedKey, lease: LeaseSettings, holder: str
    ) -> None:
        super().__init__(db.name, key, lease, holder)
        self._db = db

    @classmethod
    async def open(
        cls,
        pickle_key: PickleKey,
        database: MemoryDatabase | None = None,
        *,
        lease: LeaseSettings | None = None,
        holder: str | None = None,
    ) -> MemoryStore:
        db = database if database is not None else MemoryDatabase()
        if db.key_check is None:
            db.key_check, derived = pickle_key.new_key_check()
        else:
            derived = pickle_key.check(db.key_check, db.name)
        store = cls(db, derived, lease or LeaseSettings(), holder or new_holder_name())
        await store._start()
        return store

    async def _load_account_row(self) -> tuple[str, str, str, str] | None:
        return self._db.account

    async def get_value(self, key: str) -> str | None:
        return self._db.values.get(key)

    async def _device_rows(self, user_id: str) -> list[tuple[str, str]]:
        return [(d, data) for (u, d), (_c, data) in self._db.devices.items() if u == user_id]

    async def _device_row_by_curve25519(self, key: str) -> tuple[str, str, str] | None:
        for (user_id, device_id), (curve25519, data) in self._db.devices.items():
            if curve25519 == key:
                return user_id, device_id, data
        return None

    async def _identity_rows_of(self, user_ids: list[str]) -> list[tuple[str, str]]:
        return [(u, self._db.user_identities[u]) for u in user_ids if u in self._db.user_identities]

    async def _cross_signing_row(self) -> tuple[str, str] | None:
        return self._db.cross_signing

    async def get_tracked_users(self) -> dict[str, bool]:
        return dict(self._db.tracked_users)

    async def _olm_session_rows(self, sender_key: str) -> list[tuple[str, float, float]]:
        return [row for (key, _id), row in self._db.olm_sessions.items() if key == sender_key]

    async def _inbound_group_row(
        self, room_id: str, session_id: str
    ) -> tuple[str, str, str] | None:
        return self._db.inbound_group.get((room_id, session_id))

    async def _outbound_group_row(self, room_id: str) -> tuple[str, str] | None:
        return self._db.outbound_group.get(room_id)

    async def _inbound_group_page(
        self, after: tuple[str, str], limit: int
    ) -> list[tuple[str, str, str, str, str]]:
        keys = sorted(k for k in self._db.inbound_group if k > after)[:limit]
        return [(*key, *self._db.inbound_group[key]) for key in keys]

    async def get_message_index(self, session_id: str, index: int) -> MessageIndex | None:
        return self._db.message_indices.get((session_id, index))

    async def _waiting_rows(
        self, session_ids: list[str] | None
    ) -> list[tuple[str, str, str, str, float, int]]:
        wanted = None if session_ids is None else set(session_ids)
        rows = [
            (room_id, event_id, *row)
            for (room_id, event_id), row in self._db.waiting.items()
            if wanted is None or row[0] in wanted
        ]
        return sorted(rows, key=lambda r: (r[4], r[5]))

    async def count_waiting_events(self) -> int:
        return len(self._db.waiting)

    async def _withheld_rows(
        self, room_id: str, session_id: str
    ) -> list[tuple[str, str, str, str]]:
        return [
            (sender_key, *row)
            for (room, session, sender_key), row in self._db.withheld.items()
            if (room, session) == (room_id, session_id)
        ]

    async def _outbox_rows(self) -> list[tuple[str, float, str]]:
        rows = [(request_id, *row) for request_id, row in self._db.outbox.items()]
        return sorted(rows, key=lambda r: r[1])  # stable: insertion order among equals

    async def _write(self, changes: SerializedChanges, holder: str, generation: int) -> None:
        lock = self._db.lock
        if lock is None or lock.holder != holder or lock.generation != generation:
            raise StoreLockLost(self.name, f"now held by {lock.holder if lock else 'nobody'}")
        if changes.account is not None:
            self._db.account = changes.account
        if changes.cross_signing is not None:
            self._db.cross_signing = changes.cross_signing
        for key, value in changes.values.items():
            if value is None:
                self._db.values.pop(key, None)
            else:
                self._db.values[key] = value
        for user_id, device_id, curve25519, data in changes.devices:
            self._db.devices[user_id, device_id] = (curve25519, data)
        self._db.tracked_users.update(changes.tracked_users)
        for user_id in changes.untracked_users:
            self._db.tracked_users.pop(user_id, None)
        for sender_key, session_id, pickle, created_at, last_used in changes.olm_sessions:
            self._db.olm_sessions[sender_key, session_id] = (pickle, created_at, last_used)
        for room_id, session_id, sender_key, signing_key, pickle in changes.inbound_group_sessions:
            known = self._db.inbound_group.get((room_id, session_id))
            if known is not None:  # as the SQL backends: a session keeps its first sharer
                sender_key, signing_key = known[0], known[1]
            self._db.inbound_group[room_id, session_id] = (sender_key, signing_key, pickle)
        for room_id, pickle, state in changes.outbound_group_sessions:
            self._db.outbound_group[room_id] = (pickle, state)
        for room_id in changes.discarded_outbound:
            self._db.outbound_group.pop(room_id, None)
        self._db.user_identities.update(changes.user_identities)
        for session_id, index, event_id, origin_ts in changes.message_indices:
            self._db.message_indices.setdefault(
                (session_id, index), MessageIndex(session_id, index, event_id, origin_ts)
            )
        for room_id, event_id, session_id, event, received_at, position in changes.waiting_events:
            self._db.waiting.setdefault(
                (room_id, event_id), (session_id, event, received_at, position)
            )
        for settled in changes.settled_events:
            self._db.waiting.pop(settled, None)
        for room_id, session_id, sender_key, sender, code, reason in changes.withheld:
            self._db.withheld[room_id, session_id, sender_key] = (sender, code, reason)
        for request_id, created_at, data in changes.outbox:
            self._db.outbox.setdefault(request_id, (created_at, data))
        for request_id in changes.outbox_sent:
            self._db.outbox.pop(request_id, None)

    async def count_secrets(self) -> dict[str, int]:
        return {
            "account": int(self._db.account is not None),
            "olm": len(self._db.olm_sessions),
            "inbound": len(self._db.inbound_group),
            "outbound": len(self._db.outbound_group),
            "cross_signing": int(self._db.cross_signing is not None),
        }

    async def _rekey(
        self,
        rewrap: dict[str, Callable[[str], str]],
        key_check: str,
        holder: str,
        generation: int,
        progress: Callable[[int], object] | None,
    ) -> None:
        lock = self._db.lock
        if lock is None or lock.holder != holder or lock.generation != generation:
            raise StoreLockLost(self.name, f"now held by {lock.holder if lock else 'nobody'}")
        tick = progress or (lambda _n: None)
        # build everything first, then swap: all or nothing, as in the SQL backends
        account = self._db.account
        if account is not None:
            account = (account[0], account[1], rewrap["account"](account[2]), account[3])
            tick(1)
        olm = {}
        for key, (pickle, created, used) in self._db.olm_sessions.items():
            olm[key] = (rewrap["olm"](pickle), created, used)
            tick(1)
        inbound = {}
        for key, (sender, signing, pickle) in self._db.inbound_group.items():
            inbound[key] = (sender, signing, rewrap["inbound"](pickle))
            tick(1)
        outbound = {}
        for room, (pickle, state) in self._db.outbound_group.items():
            outbound[room] = (rewrap["outbound"](pickle), state)
            tick(1)
        cross_signing = self._db.cross_signing
        if cross_signing is not None:
            cross_signing = (rewrap["cross_signing"](cross_signing[0]), cross_signing[1])
            tick(1)
        self._db.account, self._db.olm_sessions = account, olm
        self._db.cross_signing = cross_signing
        self._db.inbound_group, self._db.outbound_group = inbound, outbound
        self._db.key_check = key_check

    async def _try_lock(self, holder: str, duration: float) -> LockRow:
        self._db.lock = next_lock_row(self._db.lock, holder, duration, time.time())
        return self._db.lock

    async def _unlock(self, holder: str) -> None:
        lock = self._db.lock
        if lock is not None and lock.holder == holder:
            self._db.lock = LockRow(lock.holder, lock.acquired_at, 0.0, lock.generation)

    async def _close_backend(self) -> None:
        return None
