"""The store interface every backend implements, and what all of them share.

A backend provides narrow reads by key and one write, ``save_changes``, that is
a single transaction. Secrets are pickled here, with the key the store proved at
open; backends only ever see pickles. The writer lease (one device, one writer)
is driven here too; backends provide its atomic primitives.

Backends: ``MemoryStore`` (tests, ephemeral bots) and ``SqliteStore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import vodozemac

from olmstead import metrics
from olmstead.cross_signing.record import CrossSigningRecord, SealedSecrets
from olmstead.errors import LocalProtocolError, StoreCorrupt, StoreLocked, StoreLockLost
from olmstead.identities.device import Device
from olmstead.identities.user_identity import UserIdentity
from olmstead.store.pickle_key import DerivedKey, PickleKey

__all__ = [
    "AccountRecord",
    "Changes",
    "CryptoStore",
    "InboundGroupSessionRecord",
    "Inspection",
    "LeaseSettings",
    "LockRow",
    "MessageIndex",
    "OlmSessionRecord",
    "OutboundGroupSessionRecord",
    "OutboxEntry",
    "SerializedChanges",
    "WaitingRoomEvent",
    "WithheldRecord",
    "account_from_row",
    "is_storable_text",
    "new_holder_name",
    "next_lock_row",
]

log = logging.getLogger(__name__)


@dataclass
class AccountRecord:
    """The device's Olm account with what olmstead knows about its keys on the server."""

    user_id: str
    device_id: str
    account: vodozemac.Account
    #: the server confirmed our device keys (a /keys/upload with them succeeded)
    shared: bool = False
    #: the server's last reported count of our signed_curve25519 one-time keys
    server_key_count: int | None = None
    #: the server has shown it knows fallback keys (it reported unused fallback key types)
    fallback_supported: bool = False
    #: when the newest fallback key was generated (seconds since the epoch)
    fallback_created_at: float | None = None
    #: a new device's ID is claimed: its first one-time keys (no device keys) are on the
    #: server, so a second fresh account's upload collides instead of replacing ours
    claimed: bool = False

    def state_json(self) -> str:
        return json.dumps(
            {
                "shared": self.shared,
                "server_key_count": self.server_key_count,
                "fallback_supported": self.fallback_supported,
                "fallback_created_at": self.fallback_created_at,
                "claimed": self.claimed,
            },
            sort_keys=True,
        )

    def copy(self, pickle_key: bytes) -> AccountRecord:
        """A deep copy, to change and commit before adopting it (commit, then adopt)."""
        clone = vodozemac.Account.from_pickle(self.account.pickle(pickle_key), pickle_key)
        return AccountRecord(
            self.user_id,
            self.device_id,
            clone,
            self.shared,
            self.server_key_count,
            self.fallback_supported,
            self.fallback_created_at,
            self.claimed,
        )


@dataclass
class OlmSessionRecord:
    """An Olm session with one other device, known by that device's Curve25519 key."""

    sender_key: str
    session: vodozemac.Session
    created_at: float
    last_used: float

    @property
    def session_id(self) -> str:
        return self.session.session_id


@dataclass
class InboundGroupSessionRecord:
    """A Megolm session someone shared with us, for one room."""

    room_id: str
    #: the Curve25519 key of the device that sent it (over Olm)
    sender_key: str
    #: the Ed25519 key that device claimed; room events under this session are its
    signing_key: str
    session: vodozemac.InboundGroupSession

    @property
    def session_id(self) -> str:
        return self.session.session_id


@dataclass
class OutboundGroupSessionRecord:
    """Our Megolm session for one room: what it encrypted and who has its key."""

    room_id: str
    session: vodozemac.GroupSession
    created_at: float
    #: user -> device -> the message index they were given the key at
    shared_with: dict[str, dict[str, int]] = field(default_factory=dict)
    #: the room's rotation settings when the session was made
    rotation_msgs: int = 100
    rotation_ms: int = 7 * 24 * 3600 * 1000

    def state_json(self) -> str:
        return json.dumps(
            {
                "created_at": self.created_at,
                "shared_with": self.shared_with,
                "rotation_msgs": self.rotation_msgs,
                "rotation_ms": self.rotation_ms,
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class MessageIndex:
    """Which event first used a Megolm message index: a second use is a replay."""

    session_id: str
    index: int
    event_id: str
    origin_ts: int


def is_storable_text(value: Any) -> TypeGuard[str]:
    """A string every store can keep as text. JSON allows NUL (PostgreSQL refuses it in
    text) and lone surrogates (not UTF-8: SQLite and PostgreSQL refuse them); an ID or a
    code from the network that is not storable is refused where it enters."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class WaitingRoomEvent:
    """An encrypted room event kept until its room key arrives (the delivery queue)."""

    room_id: str
    event_id: str
    #: the Megolm session whose key it waits for
    session_id: str
    #: the event as the server sent it
    event: dict[str, Any]
    #: when it first reached us (seconds since the epoch, the machine's clock)
    received_at: float
    #: its place among the events received at the same time (timeline order)
    position: int = 0


@dataclass(frozen=True)
class WithheldRecord:
    """An ``m.room_key.withheld`` notice: a sender will not give us a session's key.

    ``m.no_olm`` may name no room or session: then ``room_id`` and ``session_id``
    are empty and the notice covers every session of that sending device.
    """

    room_id: str
    session_id: str
    #: the Curve25519 key of the device that withholds the key
    sender_key: str
    #: the user who sent the notice
    sender: str
    #: ``m.blacklisted``, ``m.unverified``, ``m.unauthorised``, ``m.unavailable``, ``m.no_olm``
    code: str
    reason: str


@dataclass(frozen=True)
class OutboxEntry:
    """A to-device request committed before it leaves, removed once the server confirmed it.

    A room key share also names its room, session and recipients (user -> device ->
    the message index they get, -1 for a withheld notice): they count as holding
    the key only once the request is confirmed.
    """

    request_id: str
    event_type: str
    #: user -> device -> content, exactly as it goes out (ciphertext included)
    messages: dict[str, dict[str, dict[str, Any]]]
    created_at: float
    room_id: str = ""
    session_id: str = ""
    recipients: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "event_type": self.event_type,
                "messages": self.messages,
                "room_id": self.room_id,
                "session_id": self.session_id,
                "recipients": self.recipients,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, request_id: str, created_at: float, data: str) -> OutboxEntry:
        fields = json.loads(data)
        return cls(
            request_id,
            fields["event_type"],
            fields["messages"],
            created_at,
            fields["room_id"],
            fields["session_id"],
            fields["recipients"],
        )


@dataclass
class Changes:
    """Everything one ``save_changes`` call commits, all or nothing."""

    account: AccountRecord | None = None
    #: small named values (the sync token, …); ``None`` deletes the value
    values: dict[str, str | None] = field(default_factory=dict)
    #: other devices to store (a device marked deleted stays, flagged)
    devices: list[Device] = field(default_factory=list)
    #: users to track, with whether their device list is outdated
    tracked_users: dict[str, bool] = field(default_factory=dict)
    untracked_users: set[str] = field(default_factory=set)
    olm_sessions: list[OlmSessionRecord] = field(default_factory=list)
    inbound_group_sessions: list[InboundGroupSessionRecord] = field(default_factory=list)
    outbound_group_sessions: list[OutboundGroupSessionRecord] = field(default_factory=list)
    #: rooms whose outbound session is discarded (rotated away)
    discarded_outbound: set[str] = field(default_factory=set)
    #: first uses of message indices; an index already recorded keeps its first event
    message_indices: list[MessageIndex] = field(default_factory=list)
    #: room events to keep until their key comes; one already kept keeps its first record
    waiting_events: list[WaitingRoomEvent] = field(default_factory=list)
    #: (room_id, event_id) of kept events that were delivered or finally reported
    settled_events: set[tuple[str, str]] = field(default_factory=set)
    #: withheld notices; a newer notice for the same session and sender replaces the older
    withheld: list[WithheldRecord] = field(default_factory=list)
    #: to-device requests to keep until the server confirms them
    outbox: list[OutboxEntry] = field(default_factory=list)
    #: request IDs of outbox entries the server confirmed
    outbox_sent: set[str] = field(default_factory=set)
    #: other users' cross-signing identities (pinned, and any change awaiting acknowledgement)
    user_identities: list[UserIdentity] = field(default_factory=list)
    #: our cross-signing keys and their outbox, replaced whole
    cross_signing: CrossSigningRecord | None = None

    def is_empty(self) -> bool:
        return not (
            self.account
            or self.cross_signing
            or self.values
            or self.devices
            or self.tracked_users
            or self.untracked_users
            or self.olm_sessions
            or self.inbound_group_sessions
            or self.outbound_group_sessions
            or self.discarded_outbound
            or self.message_indices
            or self.waiting_events
            or self.settled_events
            or self.withheld
            or self.outbox
            or self.outbox_sent
            or self.user_identities
        )


@dataclass(frozen=True)
class SerializedChanges:
    """``Changes`` as a backend writes them: pickles and plain values only."""

    account: tuple[str, str, str, str] | None  # user_id, device_id, pickle, state JSON
    values: dict[str, str | None]
    devices: list[tuple[str, str, str, str]]  # user_id, device_id, curve25519, data JSON
    tracked_users: dict[str, bool]
    untracked_users: set[str]
    #: sender_key, session_id, pickle, created_at, last_used
    olm_sessions: list[tuple[str, str, str, float, float]]
    #: room_id, session_id, sender_key, signing_key, pickle
    inbound_group_sessions: list[tuple[str, str, str, str, str]]
    #: room_id, pickle, state JSON
    outbound_group_sessions: list[tuple[str, str, str]]
    discarded_outbound: set[str]
    #: session_id, index, event_id, origin_ts
    message_indices: list[tuple[str, int, str, int]]
    #: room_id, event_id, session_id, event JSON, received_at, position
    waiting_events: list[tuple[str, str, str, str, float, int]] = field(default_factory=list)
    #: (room_id, event_id)
    settled_events: set[tuple[str, str]] = field(default_factory=set)
    #: room_id, session_id, sender_key, sender, code, reason
    withheld: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)
    #: request_id, created_at, data JSON
    outbox: list[tuple[str, float, str]] = field(default_factory=list)
    outbox_sent: set[str] = field(default_factory=set)
    #: user_id, identity JSON
    user_identities: list[tuple[str, str]] = field(default_factory=list)
    #: sealed secrets, state JSON
    cross_signing: tuple[str, str] | None = None


@dataclass(frozen=True)
class LockRow:
    """The lease row as the store holds it."""

    holder: str
    acquired_at: float
    expires_at: float
    generation: int


@dataclass(frozen=True)
class Inspection:
    """A store as diagnosis sees it: read with no lease, no migration and no write."""

    name: str
    #: the fingerprint of the key that opened it
    fingerprint: str
    record: AccountRecord | None
    schema_version: int
    latest_version: int
    #: the writer lease as it stands, and the store's clock when it was read
    lock: LockRow | None
    now: float
    #: the key-state marker a drain already answered (``key_state.DRAINED``)
    drained_marker: str | None = None


@dataclass(frozen=True)
class LeaseSettings:
    """How long a lease lasts, how often it is renewed, how long ``open`` waits."""

    duration: float = 3.0
    renew_every: float = 1.0
    wait: float = 10.0
    poll: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.renew_every < self.duration:
            raise LocalProtocolError("the lease must be renewed more often than it lasts")


def account_from_row(row: tuple[str, str, str, str], key: bytes, store: str) -> AccountRecord:
    """The account a store row holds (user_id, device_id, pickle, state JSON)."""
    user_id, device_id, pickle, state_json = row
    try:
        account = vodozemac.Account.from_pickle(pickle, key)
        state: dict[str, Any] = json.loads(state_json)
    except (ValueError, TypeError) as exc:
        raise StoreCorrupt(
            store, f"the account does not unpickle although the pickle key matches ({exc})"
        ) from None
    return AccountRecord(
        user_id,
        device_id,
        account,
        shared=bool(state.get("shared", False)),
        server_key_count=state.get("server_key_count"),
        fallback_supported=bool(state.get("fallback_supported", False)),
        fallback_created_at=state.get("fallback_created_at"),
        claimed=bool(state.get("claimed", False)),
    )


def new_holder_name() -> str:
    """Who holds a lease: host, process and a random tag, readable in error messages."""
    return f"{socket.gethostname()}:pid {os.getpid()}:{uuid.uuid4().hex[:8]}"


class CryptoStore(ABC):
    """A crypto store opened with a proven pickle key and holding the writer lease."""

    def __init__(self, name: str, key: DerivedKey, lease: LeaseSettings, holder: str) -> None:
        self.name = name
        self._key = key
        self._lease_settings = lease
        self.holder = holder
        self._lock: LockRow | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False

    # --- what backends provide ---------------------------------------------------------

    @abstractmethod
    async def _load_account_row(self) -> tuple[str, str, str, str] | None:
        """user_id, device_id, pickle and state JSON of the account, if there is one."""

    @abstractmethod
    async def _write(self, changes: SerializedChanges, holder: str, generation: int) -> None:
        """Commit ``changes`` in one transaction, only if (holder, generation) holds the lease.

        Raises ``StoreLockLost`` (naming the new holder) and writes nothing otherwise.
        """

    @abstractmethod
    async def get_value(self, key: str) -> str | None:
        """A small named value (``Changes.values``), or ``None``."""

    @abstractmethod
    async def _device_rows(self, user_id: str) -> list[tuple[str, str]]:
        """device_id and data JSON of every stored device of ``user_id``."""

    @abstractmethod
    async def _device_row_by_curve25519(self, key: str) -> tuple[str, str, str] | None:
        """user_id, device_id and data JSON of the device with this Curve25519 key."""

    @abstractmethod
    async def _identity_rows_of(self, user_ids: list[str]) -> list[tuple[str, str]]:
        """user_id and identity JSON of each of ``user_ids`` that has a stored identity."""

    @abstractmethod
    async def _cross_signing_row(self) -> tuple[str, str] | None:
        """Sealed secrets and state JSON of our cross-signing identity, if there is one."""

    @abstractmethod
    async def get_tracked_users(self) -> dict[str, bool]:
        """Every tracked user, with whether their device list is outdated."""

    @abstractmethod
    async def _olm_session_rows(self, sender_key: str) -> list[tuple[str, float, float]]:
        """pickle, created_at, last_used of each session with ``sender_key``."""

    @abstractmethod
    async def _inbound_group_row(
        self, room_id: str, session_id: str
    ) -> tuple[str, str, str] | None:
        """sender_key, signing_key, pickle of one inbound group session."""

    @abstractmethod
    async def _outbound_group_row(self, room_id: str) -> tuple[str, str] | None:
        """pickle and state JSON of the room's outbound group session."""

    @abstractmethod
    async def _inbound_group_page(
        self, after: tuple[str, str], limit: int
    ) -> list[tuple[str, str, str, str, str]]:
        """room_id, session_id, sender_key, signing_key, pickle of the next ``limit``
        inbound group sessions after ``after`` in (room_id, session_id) order."""

    @abstractmethod
    async def get_message_index(self, session_id: str, index: int) -> MessageIndex | None:
        """The first event recorded under a Megolm session's message index."""

    @abstractmethod
    async def _waiting_rows(
        self, session_ids: list[str] | None
    ) -> list[tuple[str, str, str, str, float, int]]:
        """room_id, event_id, session_id, event JSON, received_at, position of the kept
        room events (of ``session_ids`` only, unless ``None``), oldest first."""

    @abstractmethod
    async def count_waiting_events(self) -> int:
        """How many room events the delivery queue holds."""

    @abstractmethod
    async def _withheld_rows(
        self, room_id: str, session_id: str
    ) -> list[tuple[str, str, str, str]]:
        """sender_key, sender, code, reason of each withheld notice for the session."""

    @abstractmethod
    async def _outbox_rows(self) -> list[tuple[str, float, str]]:
        """request_id, created_at, data JSON of every outbox entry, oldest first."""

    @abstractmethod
    async def _rekey(
        self,
        rewrap: dict[str, Callable[[str], str]],
        key_check: str,
        holder: str,
        generation: int,
        progress: Callable[[int], object] | None,
    ) -> None:
        """In one transaction fenced by the lease: replace every pickle of each kind
        (``account``, ``olm``, ``inbound``, ``outbound``, ``cross_signing``) with
        ``rewrap(pickle)`` and the
        key check with ``key_check``; call ``progress(1)`` after each row."""

    @abstractmethod
    async def count_secrets(self) -> dict[str, int]:
        """How many pickles of each kind (``account``, ``olm``, ``inbound``, ``outbound``,
        ``cross_signing``)."""

    @abstractmethod
    async def _try_lock(self, holder: str, duration: float) -> LockRow:
        """Take or extend the lease for ``holder`` if it is free, expired or its own.

        Atomically; returns the row as it stands afterwards. The generation grows
        whenever the lease passes to another holder.
        """

    @abstractmethod
    async def _unlock(self, holder: str) -> None:
        """Expire the lease if ``holder`` has it; the holder and generation stay."""

    @abstractmethod
    async def _close_backend(self) -> None: ...

    # --- shared behaviour ----------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the pickle key this store is written with."""
        return self._key.fingerprint

    @property
    def pickle_key(self) -> bytes:
        return self._key.key

    @property
    def generation(self) -> int:
        """The lease generation this handle holds; it moves when another holder had it."""
        if self._lock is None:
            raise LocalProtocolError(f"{self.name} is not locked by this handle")
        return self._lock.generation

    async def load_account(self) -> AccountRecord | None:
        row = await self._load_account_row()
        return None if row is None else account_from_row(row, self._key.key, self.name)

    async def load_cross_signing(self) -> CrossSigningRecord | None:
        """Our cross-signing keys and their outbox (spec: "Cross-signing"), if any."""
        row = await self._cross_signing_row()
        if row is None:
            return None
        try:
            return CrossSigningRecord.from_row(row[0], row[1], self._key.key)
        except ValueError as exc:
            raise StoreCorrupt(
                self.name,
                f"the cross-signing keys do not unseal although the pickle key matches ({exc})",
            ) from None

    async def get_devices(self, user_id: str) -> dict[str, Device]:
        """The stored devices of ``user_id`` (deleted ones included, flagged), by device ID."""
        return {
            device_id: Device.from_json(user_id, device_id, data)
            for device_id, data in await self._device_rows(user_id)
        }

    async def get_devices_of(self, user_ids: Iterable[str]) -> dict[str, dict[str, Device]]:
        """``get_devices`` for many users in one read (a room key share, a query answer)."""
        wanted = list(dict.fromkeys(user_ids))
        found: dict[str, dict[str, Device]] = {user_id: {} for user_id in wanted}
        for user_id, device_id, data in await self._device_rows_of(wanted):
            found[user_id][device_id] = Device.from_json(user_id, device_id, data)
        return found

    async def _device_rows_of(self, user_ids: list[str]) -> list[tuple[str, str, str]]:
        """user_id, device_id and data JSON of every stored device of ``user_ids``.

        One read per user here; backends with a round trip per read answer in one.
        """
        return [
            (user_id, device_id, data)
            for user_id in user_ids
            for device_id, data in await self._device_rows(user_id)
        ]

    async def get_user_identity(self, user_id: str) -> UserIdentity | None:
        """The stored cross-signing identity of ``user_id``, if any."""
        return (await self.get_user_identities_of([user_id]))[user_id]

    async def get_user_identities_of(
        self, user_ids: Iterable[str]
    ) -> dict[str, UserIdentity | None]:
        """``get_user_identity`` for many users in one read."""
        wanted = list(dict.fromkeys(user_ids))
        found: dict[str, UserIdentity | None] = dict.fromkeys(wanted)
        for user_id, data in await self._identity_rows_of(wanted):
            try:
                found[user_id] = UserIdentity.from_json(user_id, data)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StoreCorrupt(
                    self.name, f"the identity of {user_id} does not load: {exc}"
                ) from None
        return found

    async def get_message_indices(
        self, session_id: str, indices: Collection[int]
    ) -> dict[int, MessageIndex]:
        """``get_message_index`` for many indices of one session in one read (a timeline).

        One read per index here; backends with a round trip per read answer in one.
        """
        found = {}
        for index in indices:
            seen = await self.get_message_index(session_id, index)
            if seen is not None:
                found[index] = seen
        return found

    async def get_device_by_curve25519(self, key: str) -> Device | None:
        row = await self._device_row_by_curve25519(key)
        return None if row is None else Device.from_json(*row)

    async def get_olm_sessions(self, sender_key: str) -> list[OlmSessionRecord]:
        """The Olm sessions with the device of ``sender_key``, the last used first."""
        return (await self.get_olm_sessions_of([sender_key]))[sender_key]

    async def get_olm_sessions_of(
        self, sender_keys: Iterable[str]
    ) -> dict[str, list[OlmSessionRecord]]:
        """``get_olm_sessions`` for many devices in one read (before a room key share)."""
        wanted = list(dict.fromkeys(sender_keys))
        found: dict[str, list[OlmSessionRecord]] = {key: [] for key in wanted}
        for sender_key, pickle, created_at, last_used in await self._olm_session_rows_of(wanted):
            try:
                session = vodozemac.Session.from_pickle(pickle, self._key.key)
            except ValueError as exc:
                raise StoreCorrupt(self.name, f"an Olm session does not unpickle: {exc}") from None
            found[sender_key].append(OlmSessionRecord(sender_key, session, created_at, last_used))
        for records in found.values():
            records.sort(key=lambda r: r.last_used, reverse=True)
        return found

    async def _olm_session_rows_of(
        self, sender_keys: list[str]
    ) -> list[tuple[str, str, float, float]]:
        """sender_key, pickle, created_at, last_used of each session with ``sender_keys``.

        One read per device here; backends with a round trip per read answer in one.
        """
        return [
            (sender_key, *row)
            for sender_key in sender_keys
            for row in await self._olm_session_rows(sender_key)
        ]

    async def get_inbound_group_session(
        self, room_id: str, session_id: str
    ) -> InboundGroupSessionRecord | None:
        row = await self._inbound_group_row(room_id, session_id)
        if row is None:
            return None
        sender_key, signing_key, pickle = row
        try:
            session = vodozemac.InboundGroupSession.from_pickle(pickle, self._key.key)
        except ValueError as exc:
            raise StoreCorrupt(self.name, f"a Megolm session does not unpickle: {exc}") from None
        return InboundGroupSessionRecord(room_id, sender_key, signing_key, session)

    async def inbound_group_sessions(
        self, page: int = 500
    ) -> AsyncIterator[InboundGroupSessionRecord]:
        """Every inbound group session, a page at a time (for exports and rekeying)."""
        after = ("", "")
        while True:
            rows = await self._inbound_group_page(after, page)
            for room_id, _session_id, sender_key, signing_key, pickle in rows:
                try:
                    session = vodozemac.InboundGroupSession.from_pickle(pickle, self._key.key)
                except ValueError as exc:
                    raise StoreCorrupt(
                        self.name, f"a Megolm session does not unpickle: {exc}"
                    ) from None
                yield InboundGroupSessionRecord(room_id, sender_key, signing_key, session)
            if len(rows) < page:
                return
            after = (rows[-1][0], rows[-1][1])

    async def get_outbound_group_session(self, room_id: str) -> OutboundGroupSessionRecord | None:
        row = await self._outbound_group_row(room_id)
        if row is None:
            return None
        pickle, state_json = row
        try:
            session = vodozemac.GroupSession.from_pickle(pickle, self._key.key)
            state = json.loads(state_json)
        except ValueError as exc:
            raise StoreCorrupt(self.name, f"a Megolm session does not unpickle: {exc}") from None
        return OutboundGroupSessionRecord(
            room_id,
            session,
            state["created_at"],
            state["shared_with"],
            state["rotation_msgs"],
            state["rotation_ms"],
        )

    async def get_waiting_events(
        self, session_ids: Collection[str] | None = None
    ) -> list[WaitingRoomEvent]:
        """The kept room events (of ``session_ids`` only, unless ``None``), oldest first."""
        rows = await self._waiting_rows(None if session_ids is None else sorted(set(session_ids)))
        found = []
        for room_id, event_id, session_id, event, received_at, position in rows:
            try:
                parsed = json.loads(event)
            except ValueError as exc:
                raise StoreCorrupt(self.name, f"a kept room event is not JSON: {exc}") from None
            found.append(
                WaitingRoomEvent(room_id, event_id, session_id, parsed, received_at, position)
            )
        return found

    async def get_withheld(self, room_id: str, session_id: str) -> list[WithheldRecord]:
        """The withheld notices recorded for a session (``""``, ``""``: m.no_olm for any)."""
        return [
            WithheldRecord(room_id, session_id, *row)
            for row in await self._withheld_rows(room_id, session_id)
        ]

    async def get_outbox(self) -> list[OutboxEntry]:
        """Every to-device request still waiting for the server's confirmation, oldest first."""
        try:
            return [OutboxEntry.from_json(*row) for row in await self._outbox_rows()]
        except (ValueError, KeyError) as exc:
            raise StoreCorrupt(self.name, f"an outbox entry does not parse: {exc}") from None

    async def rekey(
        self, new_key: PickleKey, progress: Callable[[int], object] | None = None
    ) -> str:
        """Re-encrypt every secret under ``new_key``; returns its fingerprint.

        One transaction: if it is interrupted anywhere, the store still opens with
        the old key and only with it; once it commits, only with the new one.
        """
        if self._lock is None:
            raise StoreLockLost(self.name, "it expired before the rekey")
        generation = await self.ensure_lease()
        record, derived = new_key.new_key_check()
        old, new = self._key.key, derived.key
        kinds: dict[str, Any] = {
            "account": vodozemac.Account,
            "olm": vodozemac.Session,
            "inbound": vodozemac.InboundGroupSession,
            "outbound": vodozemac.GroupSession,
            "cross_signing": SealedSecrets,
        }

        def rewrapper(kind: Any) -> Callable[[str], str]:
            def rewrap(pickle: str) -> str:
                try:
                    text: str = kind.from_pickle(pickle, old).pickle(new)
                except ValueError as exc:
                    raise StoreCorrupt(self.name, f"a secret does not unpickle: {exc}") from None
                return text

            return rewrap

        rewrap = {name: rewrapper(kind) for name, kind in kinds.items()}
        work = asyncio.ensure_future(self._rekey(rewrap, record, self.holder, generation, progress))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # the transaction may be running on: wait for its outcome, so this handle's
            # key never disagrees with the store's, then let the cancellation go on
            with contextlib.suppress(Exception):
                await work
            if work.done() and not work.cancelled() and work.exception() is None:
                self._key = derived
            raise
        self._key = derived
        return derived.fingerprint

    async def save_changes(self, changes: Changes, *, generation: int | None = None) -> None:
        """Commit ``changes`` in one transaction, fenced by this handle's lease.

        ``generation`` is the lease generation the caller read its state under (the
        machine passes its own): if the lease passed through other hands since, the
        write is refused even if this handle has taken the lease back meanwhile.
        """
        if self._closed:
            raise LocalProtocolError(f"{self.name} is closed")
        if changes.is_empty():
            return
        account = None
        if changes.account is not None:
            record = changes.account
            account = (
                record.user_id,
                record.device_id,
                record.account.pickle(self._key.key),
                record.state_json(),
            )
        # Fence with the generation the caller's state was read under: if the lease
        # passed through other hands meanwhile, refuse rather than overwrite theirs.
        if self._lock is None:
            raise StoreLockLost(self.name, "it expired before this write")
        known = self._lock.generation if generation is None else generation
        now = await self.ensure_lease()
        if now != known:
            raise StoreLockLost(self.name, f"generation moved from {known} to {now}")
        try:
            serialized = SerializedChanges(
                account,
                dict(changes.values),
                [(d.user_id, d.device_id, d.curve25519, d.to_json()) for d in changes.devices],
                dict(changes.tracked_users),
                set(changes.untracked_users),
                [
                    (
                        r.sender_key,
                        r.session_id,
                        r.session.pickle(self._key.key),
                        r.created_at,
                        r.last_used,
                    )
                    for r in changes.olm_sessions
                ],
                [
                    (
                        r.room_id,
                        r.session_id,
                        r.sender_key,
                        r.signing_key,
                        r.session.pickle(self._key.key),
                    )
                    for r in changes.inbound_group_sessions
                ],
                [
                    (r.room_id, r.session.pickle(self._key.key), r.state_json())
                    for r in changes.outbound_group_sessions
                ],
                set(changes.discarded_outbound),
                [(m.session_id, m.index, m.event_id, m.origin_ts) for m in changes.message_indices],
                [
                    (
                        w.room_id,
                        w.event_id,
                        w.session_id,
                        json.dumps(w.event),
                        w.received_at,
                        w.position,
                    )
                    for w in changes.waiting_events
                ],
                set(changes.settled_events),
                [
                    (w.room_id, w.session_id, w.sender_key, w.sender, w.code, w.reason)
                    for w in changes.withheld
                ],
                [(e.request_id, e.created_at, e.to_json()) for e in changes.outbox],
                set(changes.outbox_sent),
                [(i.user_id, i.to_json()) for i in changes.user_identities],
                None
                if changes.cross_signing is None
                else (
                    SealedSecrets(changes.cross_signing.secrets).pickle(self._key.key),
                    changes.cross_signing.state_json(),
                ),
            )
            await self._write(serialized, self.holder, known)
        except StoreLockLost:
            self._lock = None  # the next operation re-takes the lease and reloads
            raise

    async def ensure_lease(self) -> int:
        """The current lease generation, renewing or re-taking the lease first if needed.

        Costs no I/O while the lease is comfortably within its time. A caller that
        sees the generation change must reload whatever it cached from the store.
        """
        lock = self._lock
        remaining = (lock.expires_at - time.time()) if lock else 0.0
        if lock is None or remaining < self._lease_settings.duration - (
            self._lease_settings.renew_every * 1.5
        ):
            await self._acquire()
        assert self._lock is not None
        return self._lock.generation

    async def _acquire(self) -> None:
        settings = self._lease_settings
        deadline = time.monotonic() + settings.wait
        while True:
            row = await self._try_lock(self.holder, settings.duration)
            if row.holder == self.holder:
                if self._lock is not None and row.generation != self._lock.generation:
                    metrics.lease_takeover()
                    log.warning(
                        "%s: lease generation moved from %d to %d; cached state is reloaded",
                        self.name,
                        self._lock.generation,
                        row.generation,
                    )
                self._lock = row
                return
            if time.monotonic() >= deadline:
                raise StoreLocked(self.name, row.holder, row.acquired_at, row.expires_at)
            await asyncio.sleep(settings.poll)

    async def _start(self) -> None:
        """Take the lease (waiting as the settings allow) and start renewing it."""
        await self._acquire()
        self._renewer = asyncio.create_task(self._renew_forever(), name=f"lease {self.name}")

    async def _renew_forever(self) -> None:
        failing = False  # logged once per outage, not once a second
        while True:
            await asyncio.sleep(self._lease_settings.renew_every)
            try:
                row = await self._try_lock(self.holder, self._lease_settings.duration)
            except Exception as error:  # retried; the fence guards writes meanwhile
                if not failing:
                    log.warning(
                        "%s: renewing the lease failed (%s); trying again every %.1f s",
                        self.name,
                        error,
                        self._lease_settings.renew_every,
                    )
                failing = True
                continue
            if failing:
                log.warning("%s: the lease is renewed again", self.name)
                failing = False
            if row.holder == self.holder:
                if self._lock is not None and row.generation != self._lock.generation:
                    metrics.lease_takeover()
                    log.warning(
                        "%s: the lease was lost and taken back (generation %d -> %d); "
                        "writes of state read before are refused",
                        self.name,
                        self._lock.generation,
                        row.generation,
                    )
                self._lock = row
            else:
                log.error("%s: lease lost to %s", self.name, row.holder)
                self._lock = None

    async def close(self) -> None:
        """Stop renewing, release the lease and close the backend. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._lock is not None:
            with contextlib.suppress(Exception):
                await self._unlock(self.holder)
            self._lock = None
        await self._close_backend()

    async def __aenter__(self) -> CryptoStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def next_lock_row(row: LockRow | None, holder: str, duration: float, now: float) -> LockRow:
    """The lease row after ``holder`` asks for it at ``now``: the one rule all backends follow.

    Free or expired: ``holder`` takes it, and the generation grows if the previous
    holder was another. Its own: extended. Held by another, unexpired: unchanged.
    """
    if row is None:
        return LockRow(holder, now, now + duration, 1)
    if row.holder == holder:
        since = row.acquired_at if row.expires_at > now else now
        return LockRow(holder, since, now + duration, row.generation)
    if row.expires_at <= now:
        return LockRow(holder, now, now + duration, row.generation + 1)
    return row
