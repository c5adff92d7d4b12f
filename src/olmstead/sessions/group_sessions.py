"""Megolm: our outbound session per room, and the inbound sessions others shared with us.

Outbound sessions rotate after the room's ``rotation_period_msgs`` messages or
``rotation_period_ms``, and when a device that had the key is no longer among
the recipients (a member left, a device was deleted). The key goes out as an
Olm-encrypted ``m.room_key`` to each device that does not have it yet, and an
``m.room_key.withheld`` (``m.no_olm``) to each device we have no Olm session with.

Inbound sessions are keyed by room and session ID and remember the sender's
Curve25519 key and the Ed25519 key it claimed over Olm. A room event's message
index is recorded with its event ID and timestamp once the event passed every
check: the same index with another event is a replay and is refused, and a
refused event (a copy with a spoofed sender) records nothing, so the genuine
event still decrypts.

Inbound sessions are cached (bounded, the last used kept): the machine hands the
cache what it committed and empties it when it reloads, as it does the Olm cache.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import vodozemac

from olmstead import boundary
from olmstead.errors import (
    DecryptionError,
    MalformedEvent,
    MegolmDecryptionFailed,
    ReplayedMessage,
    SenderMismatch,
    UnknownRoomKey,
)
from olmstead.identities.device import Device
from olmstead.identities.trust import TrustLevel
from olmstead.olm import checked
from olmstead.sessions.olm_sessions import DecryptedToDevice
from olmstead.sessions.withheld import find_withheld
from olmstead.store.base import (
    Changes,
    CryptoStore,
    InboundGroupSessionRecord,
    MessageIndex,
    OutboundGroupSessionRecord,
)

__all__ = [
    "MEGOLM_ALGORITHM",
    "DecryptedRoomEvent",
    "GroupSessions",
    "RoomSettings",
    "payload_bytes",
]

log = logging.getLogger(__name__)

MEGOLM_ALGORITHM = "m.megolm.v1.aes-sha2"


def payload_bytes(room_id: str, event_type: str, content: Mapping[str, Any]) -> bytes:
    """The plaintext of a room event, as Megolm encrypts it (compact: fewer bytes to encrypt)."""
    body = content if isinstance(content, dict) else dict(content)
    payload = {"type": event_type, "content": body, "room_id": room_id}
    # ASCII escapes: content may hold a lone surrogate (text cut mid-emoji), which JSON
    # escapes can carry and UTF-8 cannot
    return boundary.api_json(payload, "content")


@dataclass(frozen=True)
class RoomSettings:
    """A room's ``m.room.encryption`` rotation settings (the spec's defaults)."""

    rotation_period_msgs: int = 100
    rotation_period_ms: int = 7 * 24 * 3600 * 1000

    @classmethod
    def from_content(cls, content: Mapping[str, Any]) -> RoomSettings:
        msgs, ms = content.get("rotation_period_msgs"), content.get("rotation_period_ms")
        return cls(
            msgs if isinstance(msgs, int) and msgs > 0 else cls.rotation_period_msgs,
            ms if isinstance(ms, int) and ms > 0 else cls.rotation_period_ms,
        )


@dataclass(frozen=True)
class DecryptedRoomEvent:
    room_id: str
    event_id: str
    sender: str
    type: str
    content: dict[str, Any]
    session_id: str
    message_index: int
    #: the sharing device's Curve25519 key and the Ed25519 key it claimed
    sender_key: str
    signing_key: str
    #: the sharing device is one we know, of the event's sender, with that Ed25519 key
    verified: bool
    #: the event's ``m.relates_to`` as the server sees it (in the clear on the
    #: ``m.room.encrypted`` content, spec: "Relationships and encryption"), or ``None``
    relation: dict[str, Any] | None = None
    #: the encrypted payload carries another ``m.relates_to`` than the clear one: the
    #: server (or the sender) changed it; ``content`` keeps the sender's encrypted one
    relation_mismatch: bool = False
    #: the sending device's trust level (``UNKNOWN_DEVICE`` unless ``verified``); the
    #: machine fills it in from the cross-signing identities it holds
    trust: TrustLevel = TrustLevel.UNKNOWN_DEVICE


class GroupSessions:
    def __init__(self, store: CryptoStore, cache_size: int = 10_000) -> None:
        self.store = store
        self._inbound: OrderedDict[tuple[str, str], InboundGroupSessionRecord] = OrderedDict()
        self._cache_size = cache_size

    # --- the inbound cache -----------------------------------------------------------------

    async def inbound(self, room_id: str, session_id: str) -> InboundGroupSessionRecord | None:
        """The inbound session, from the cache (the last used kept) or the store."""
        key = (room_id, session_id)
        record = self._inbound.get(key)
        if record is not None:
            self._inbound.move_to_end(key)
            return record
        record = await self.store.get_inbound_group_session(room_id, session_id)
        if record is not None:
            self._remember(record)
        return record

    def committed(self, records: Sequence[InboundGroupSessionRecord]) -> None:
        """Sessions just committed are read from the store next time: what a backend keeps
        of a record it already held (the first sharer's keys) is the store's to say."""
        for record in records:
            self._inbound.pop((record.room_id, record.session_id), None)

    def _remember(self, record: InboundGroupSessionRecord) -> None:
        self._inbound[(record.room_id, record.session_id)] = record
        self._inbound.move_to_end((record.room_id, record.session_id))
        if len(self._inbound) > self._cache_size:
            self._inbound.popitem(last=False)

    def forget(self) -> None:
        """Drop every cached session: read from the store again (after a reload)."""
        self._inbound.clear()

    # --- outbound ------------------------------------------------------------------------------

    @staticmethod
    def expired(record: OutboundGroupSessionRecord, now: float) -> bool:
        return (
            record.session.message_index >= record.rotation_msgs
            or (now - record.created_at) * 1000 >= record.rotation_ms
        )

    @staticmethod
    def new_outbound(
        room_id: str, settings: RoomSettings, now: float
    ) -> OutboundGroupSessionRecord:
        return OutboundGroupSessionRecord(
            room_id,
            vodozemac.GroupSession(),
            now,
            {},
            settings.rotation_period_msgs,
            settings.rotation_period_ms,
        )

    @staticmethod
    def room_key_content(record: OutboundGroupSessionRecord) -> dict[str, Any]:
        return {
            "algorithm": MEGOLM_ALGORITHM,
            "room_id": record.room_id,
            "session_id": record.session.session_id,
            "session_key": record.session.session_key.to_base64(),
        }

    @staticmethod
    def encrypt(
        record: OutboundGroupSessionRecord,
        event_type: str,
        content: Mapping[str, Any],
        own_keys: Mapping[str, str],
        device_id: str,
    ) -> dict[str, Any]:
        """The ``m.room.encrypted`` content; steps the session's ratchet."""
        return GroupSessions.encrypt_payload(
            record, payload_bytes(record.room_id, event_type, content), own_keys, device_id
        )

    @staticmethod
    def encrypt_payload(
        record: OutboundGroupSessionRecord,
        payload: bytes,
        own_keys: Mapping[str, str],
        device_id: str,
        relation: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``m.room.encrypted`` content for a payload from ``payload_bytes``; steps the
        session's ratchet. ``relation`` (the content's ``m.relates_to``) is copied into
        the clear so the server can aggregate and thread the event; the payload keeps it
        too, as matrix-nio and mautrix do, for clients that read only the payload."""
        message = record.session.encrypt(payload)
        content: dict[str, Any] = {
            "algorithm": MEGOLM_ALGORITHM,
            "ciphertext": message.to_base64(),
            "sender_key": own_keys["curve25519"],
            "session_id": record.session.session_id,
            "device_id": device_id,
        }
        if relation is not None:
            content["m.relates_to"] = dict(relation)
        return content

    # --- inbound -------------------------------------------------------------------------------

    async def accept_room_key(self, event: DecryptedToDevice) -> InboundGroupSessionRecord | None:
        """The inbound session an ``m.room_key`` carries, or ``None`` if it is unusable or older."""
        content = event.content
        room_id, session_id = content.get("room_id"), content.get("session_id")
        if content.get("algorithm") != MEGOLM_ALGORITHM or not boundary.is_identifier(room_id):
            log.warning("ignored a room key from %s: not Megolm, or no room", event.sender)
            return None
        assert isinstance(room_id, str)
        try:
            session = checked.inbound_group_session(content.get("session_key"), MalformedEvent)
        except MalformedEvent as exc:
            log.warning("ignored a room key from %s: %s", event.sender, exc)
            return None
        if session.session_id != session_id:
            log.warning("ignored a room key from %s: its session ID does not match", event.sender)
            return None
        known = await self.inbound(room_id, session_id)
        if known is not None:
            if (known.signing_key, known.sender_key) != (event.sender_ed25519, event.sender_key):
                log.warning(
                    "ignored a room key from %s: session %s is another device's",
                    event.sender,
                    session_id,
                )
                return None
            if known.session.first_known_index <= session.first_known_index:
                return None  # what we hold decrypts at least as far back
        return InboundGroupSessionRecord(room_id, event.sender_key, event.sender_ed25519, session)

    async def decrypt(
        self, room_id: str, event: Mapping[str, Any]
    ) -> tuple[DecryptedRoomEvent | DecryptionError, Changes]:
        (result,), changes = await self.decrypt_many(room_id, [event])
        return result, changes

    async def decrypt_many(
        self, room_id: str, events: Sequence[Mapping[str, Any]]
    ) -> tuple[list[DecryptedRoomEvent | DecryptionError], Changes]:
        """Decrypt room events in order; the results and the message indices to commit.

        The replay records of the whole batch are read at once, and an index used
        twice inside the batch is caught like one used before it.
        """
        changes = Changes()
        opened = [await self._open(room_id, event) for event in events]
        wanted: dict[str, set[int]] = {}
        for item in opened:
            if isinstance(item, _Opened):
                wanted.setdefault(item.session_id, set()).add(item.index)
        seen = {
            (session_id, index): first
            for session_id, indices in wanted.items()
            for index, first in (await self.store.get_message_indices(session_id, indices)).items()
        }
        devices: dict[str, Device | None] = {}
        results: list[DecryptedRoomEvent | DecryptionError] = []
        for item in opened:
            if isinstance(item, DecryptionError):
                results.append(item)
                continue
            first = seen.get((item.session_id, item.index))
            if first is not None and (first.event_id, first.origin_ts) != (
                item.event_id,
                item.origin_ts,
            ):
                results.append(
                    ReplayedMessage(
                        f"event {item.event_id} reuses message index {item.index} of session "
                        f"{item.session_id}, first used by {first.event_id}: a replay, refused",
                        item.sender,
                    )
                )
                continue
            sender_key = item.record.sender_key
            if sender_key not in devices:
                devices[sender_key] = await self.store.get_device_by_curve25519(sender_key)
            result = self._check(room_id, item, devices[sender_key])
            if first is None and isinstance(result, DecryptedRoomEvent):
                # recorded only for an event that passed every check: a refused copy with
                # a spoofed sender must not claim the index before the genuine event
                first = MessageIndex(item.session_id, item.index, item.event_id, item.origin_ts)
                seen[(item.session_id, item.index)] = first
                changes.message_indices.append(first)
            results.append(result)
        return results, changes

    async def _open(self, room_id: str, event: Mapping[str, Any]) -> _Opened | DecryptionError:
        """Parse, find the session, decrypt: everything before the replay check."""
        try:
            sender = boundary.event_identifier(event, "sender")
            event_id = boundary.event_identifier(event, "event_id", sender=sender)
            origin_ts = boundary.event_field(event, "origin_server_ts", int, sender=sender)
            boundary.event_field(event, "content", Mapping, sender=sender)
        except MalformedEvent as error:
            return error
        content = event["content"]
        session_id, ciphertext = content.get("session_id"), content.get("ciphertext")
        if content.get("algorithm") != MEGOLM_ALGORITHM:
            return MalformedEvent("not a Megolm event", sender, field="content.algorithm")
        if not boundary.is_identifier(session_id):
            return MalformedEvent("no usable session_id", sender, field="content.session_id")
        assert isinstance(session_id, str)
        record = await self.inbound(room_id, session_id)
        if record is None:
            withheld = await find_withheld(
                self.store, room_id, session_id, sender, content.get("sender_key")
            )
            if withheld is not None:
                return withheld
            return UnknownRoomKey(
                f"no key for session {session_id} in {room_id} (from {sender}) has arrived",
                sender,
                session_id,
            )

        def failed(why: str) -> DecryptionError:
            return MegolmDecryptionFailed(
                f"event {event_id} does not decrypt with session {session_id}: {why}", sender
            )

        try:
            message = checked.megolm_message(ciphertext, failed)
            plaintext, index = checked.group_decrypt(record.session, message, failed)
        except DecryptionError as error:
            return error
        return _Opened(
            sender,
            event_id,
            origin_ts,
            session_id,
            index,
            plaintext,
            record,
            content.get("m.relates_to"),
        )

    @staticmethod
    def _check(
        room_id: str, item: _Opened, device: Device | None
    ) -> DecryptedRoomEvent | DecryptionError:
        """The payload's checks; its message index is recorded only if they pass."""
        sender, event_id = item.sender, item.event_id
        try:
            payload = json.loads(item.plaintext)
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            return MegolmDecryptionFailed("the decrypted payload is not JSON", sender)
        if not isinstance(payload, dict) or payload.get("room_id") != room_id:
            return SenderMismatch(
                f"event {event_id} was encrypted for another room than {room_id}", sender
            )
        if not isinstance(payload.get("type"), str) or not isinstance(payload.get("content"), dict):
            return MegolmDecryptionFailed("the payload has no type or content", sender)
        if device is not None and device.user_id != sender:
            return SenderMismatch(
                f"event {event_id} claims sender {sender}, but its session was shared by "
                f"{device.user_id} {device.device_id}",
                sender,
            )
        record = item.record
        verified = device is not None and device.ed25519 == record.signing_key
        content: dict[str, Any] = payload["content"]
        clear = item.clear_relation if isinstance(item.clear_relation, dict) else None
        inner = content.get("m.relates_to")
        mismatch = inner is not None and inner != clear
        if mismatch:
            log.warning(
                "event %s in %s: the relation in the clear differs from the encrypted one; "
                "reported, not trusted",
                event_id,
                room_id,
            )
        elif clear is not None:
            # the sender left it out of the payload (as the spec allows): the clear one
            # is the event's relation, and the content shows it as sent
            content["m.relates_to"] = clear
        return DecryptedRoomEvent(
            room_id,
            event_id,
            sender,
            payload["type"],
            content,
            item.session_id,
            item.index,
            record.sender_key,
            record.signing_key,
            verified,
            clear,
            mismatch,
        )


@dataclass(frozen=True)
class _Opened:
    """A room event decrypted, its replay check and payload checks still to come."""

    sender: str
    event_id: str
    origin_ts: int
    session_id: str
    index: int
    plaintext: bytes
    record: InboundGroupSessionRecord
    #: ``m.relates_to`` from the clear content, as received (unchecked)
    clear_relation: Any = None
