"""Olm sessions with other devices: made from claimed keys, used to encrypt and decrypt.

To-device messages (``m.room.encrypted`` with ``m.olm.v1.curve25519-aes-sha2``)
carry a payload that binds sender and recipient: ``sender``, ``recipient``,
``recipient_keys.ed25519`` (ours) and ``keys.ed25519`` (theirs). Decryption
checks all of them; a payload that fails is refused even though it decrypted.

Payloads also carry the sender's signed device keys, ``sender_device_keys``
(MSC4147), so a recipient that has not queried our keys yet can still tell which
device sent the message and whether its owner cross-signed it. Incoming ones are
checked: a valid self-signature, the sender's user ID, the Curve25519 key the
message came from, the Ed25519 key the payload claims, and the same keys as the
device we know under that ID, if we know it; a payload that fails is refused.

Sessions are read from the store by the sender's Curve25519 key and cached (the
last used first). Encrypting or decrypting steps a ratchet in the cached
session; the machine commits the returned ``Changes`` before any plaintext or
ciphertext leaves it, and calls ``forget`` if that commit fails, so the cache
never runs ahead of the store.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import vodozemac

from olmstead import boundary
from olmstead.errors import (
    DecryptionError,
    MalformedEvent,
    NotForThisDevice,
    OlmSessionError,
    RemoteProtocolError,
    SenderMismatch,
)
from olmstead.identities.device import Device, InvalidDeviceKeys
from olmstead.identities.trust import TrustLevel
from olmstead.olm import checked
from olmstead.olm.signing import verify_signed_json
from olmstead.requests import KeysClaimRequest
from olmstead.store.base import (
    AccountRecord,
    Changes,
    CryptoStore,
    OlmSessionRecord,
)

__all__ = ["OLM_ALGORITHM", "DecryptedToDevice", "OlmPayload", "OlmSessions"]

log = logging.getLogger(__name__)

OLM_ALGORITHM = "m.olm.v1.curve25519-aes-sha2"


@dataclass(frozen=True)
class DecryptedToDevice:
    """A to-device event that arrived Olm-encrypted, decrypted and checked."""

    sender: str
    sender_key: str
    #: the Ed25519 key the payload claims; ``verified`` if it matches a device we know
    sender_ed25519: str
    sender_device: str | None
    verified: bool
    type: str
    content: dict[str, Any]
    #: the device the payload's ``sender_device_keys`` (MSC4147) describe, checked
    sender_device_keys: Device | None = None
    #: the sending device's trust level; the machine fills it in
    trust: TrustLevel = TrustLevel.UNKNOWN_DEVICE


class OlmSessions:
    def __init__(self, store: CryptoStore, user_id: str, device_id: str, cache_size: int = 1000):
        self.store = store
        self.user_id = user_id
        self.device_id = device_id
        self._cache: OrderedDict[str, list[OlmSessionRecord]] = OrderedDict()
        self._cache_size = cache_size

    # --- the cache -------------------------------------------------------------------------

    async def sessions_for(self, sender_key: str) -> list[OlmSessionRecord]:
        """Sessions with the device of ``sender_key``, the last used first (cached)."""
        if sender_key in self._cache:
            self._cache.move_to_end(sender_key)
            return self._cache[sender_key]
        records = await self.store.get_olm_sessions(sender_key)
        self._cache[sender_key] = records
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return records

    async def load(self, sender_keys: Iterable[str]) -> None:
        """Bring the sessions of many devices into the cache in one store read."""
        missing = [key for key in sender_keys if key not in self._cache]
        if not missing:
            return
        for key, records in (await self.store.get_olm_sessions_of(missing)).items():
            self._cache[key] = records
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def forget(self, sender_keys: set[str] | None = None) -> None:
        """Drop cached sessions (all, or these devices') so they are read from the store again."""
        if sender_keys is None:
            self._cache.clear()
        for key in sender_keys or ():
            self._cache.pop(key, None)

    # --- new sessions ----------------------------------------------------------------------

    @staticmethod
    def claim_request(devices: list[Device]) -> KeysClaimRequest:
        wanted: dict[str, dict[str, str]] = {}
        for device in devices:
            wanted.setdefault(device.user_id, {})[device.device_id] = "signed_curve25519"
        return KeysClaimRequest(f"olm_claim-{uuid.uuid4().hex[:12]}", wanted)

    async def sessions_from_claim(
        self,
        account: vodozemac.Account,
        devices: list[Device],
        response: Mapping[str, Any],
        now: float,
    ) -> list[OlmSessionRecord]:
        """Outbound sessions from a ``/keys/claim`` answer; unsigned keys are refused."""
        claimed = response.get("one_time_keys") if isinstance(response, Mapping) else None
        claimed = claimed if isinstance(claimed, Mapping) else {}
        created = []
        for device in devices:
            by_user = claimed.get(device.user_id)
            keys = by_user.get(device.device_id) if isinstance(by_user, Mapping) else None
            if not isinstance(keys, Mapping) or not keys:
                log.warning(
                    "no one-time key for %s %s: no session with it",
                    device.user_id,
                    device.device_id,
                )
                continue
            key = next(iter(keys.values()))
            if not isinstance(key, dict) or not verify_signed_json(
                key, device.user_id, device.device_id, device.ed25519
            ):
                log.warning(
                    "the one-time key claimed for %s %s is not signed by that device; refused",
                    device.user_id,
                    device.device_id,
                )
                continue
            try:
                session = checked.create_outbound_session(
                    account, device.curve25519, key.get("key"), "one_time_keys"
                )
            except RemoteProtocolError as exc:
                log.warning("no session with %s %s: %s", device.user_id, device.device_id, exc)
                continue
            record = OlmSessionRecord(device.curve25519, session, now, now)
            (await self.sessions_for(device.curve25519)).insert(0, record)
            created.append(record)
        return created

    # --- encryption ----------------------------------------------------------------------------

    def payload(
        self,
        own_keys: Mapping[str, str],
        event_type: str,
        content: Mapping[str, Any],
        device_keys: Mapping[str, Any] | None = None,
    ) -> OlmPayload:
        """The payload of one event to many devices, serialised once (see ``OlmPayload``).

        ``device_keys``: our signed device keys, sent as ``sender_device_keys`` (MSC4147).
        """
        shared: dict[str, Any] = {
            "type": event_type,
            "content": dict(content),
            "sender": self.user_id,
            "sender_device": self.device_id,
            "keys": {"ed25519": own_keys["ed25519"]},
        }
        if device_keys is not None:
            shared["sender_device_keys"] = dict(device_keys)
        return OlmPayload(shared)

    async def encrypt(
        self, own_keys: Mapping[str, str], device: Device, payload: OlmPayload, now: float
    ) -> tuple[dict[str, Any], OlmSessionRecord] | None:
        """Encrypted content for ``device`` and the session stepped, or ``None`` without one.

        ``payload`` comes from ``self.payload``: built once for all recipients of an event.
        """
        sessions = await self.sessions_for(device.curve25519)
        if not sessions:
            return None
        record = sessions[0]
        message_type, body = record.session.encrypt(payload.for_device(device)).to_parts()
        record.last_used = now
        encrypted = {
            "algorithm": OLM_ALGORITHM,
            "sender_key": own_keys["curve25519"],
            "ciphertext": {
                device.curve25519: {"type": message_type, "body": _b64(body)},
            },
        }
        return encrypted, record

    # --- decryption ----------------------------------------------------------------------------

    async def decrypt(
        self,
        event: Mapping[str, Any],
        own_keys: Mapping[str, str],
        account: AccountRecord,
        now: float,
    ) -> tuple[DecryptedToDevice | DecryptionError | None, Changes]:
        """Decrypt and check an Olm to-device event.

        Returns the result with the changes to commit *before* it is used: the stepped
        session, and for a new inbound session the copy of ``account`` without the
        one-time key it used (``Changes.account``). Every check runs on copies first,
        so a refused message returns no changes and leaves the cache as it was: it
        uses no one-time key and steps no ratchet.

        ``None``: the message is a pre-key message of a session we already hold that
        no longer decrypts it — the same message delivered again (a sync repeated
        after a crash, a server redelivering). It is dropped: no failure, no new
        session, and the live session is never rebuilt from the old message.
        """
        try:
            return await self._decrypt(event, own_keys, account, now)
        except DecryptionError as error:
            return error, Changes()

    async def _decrypt(
        self,
        event: Mapping[str, Any],
        own_keys: Mapping[str, str],
        account: AccountRecord,
        now: float,
    ) -> tuple[DecryptedToDevice | DecryptionError | None, Changes]:
        changes = Changes()
        sender = boundary.event_identifier(event, "sender")
        sender_key = boundary.event_field(event, "content.sender_key", str, sender=sender)
        try:
            sender_key = boundary.public_key(sender_key, "content.sender_key")
        except RemoteProtocolError as exc:
            raise MalformedEvent(str(exc), sender, None, "content.sender_key") from None
        content = event["content"]
        ciphertext = boundary.event_field(event, "content.ciphertext", Mapping, sender=sender)
        mine = ciphertext.get(own_keys["curve25519"])
        if not isinstance(mine, Mapping):
            return NotForThisDevice(
                "the message has no ciphertext for this device", sender, sender_key
            ), changes
        where = f"content.ciphertext.{own_keys['curve25519']}"
        message_type = _field(mine, "type", int, where, sender, sender_key)
        if message_type not in (0, 1):
            raise MalformedEvent(
                f"the Olm message type is {message_type}, not 0 (pre-key) or 1",
                sender,
                sender_key,
                f"{where}.type",
            )
        body = _field(mine, "body", str, where, sender, sender_key)
        malformed = _malformed(sender, sender_key, f"{where}.body")
        try:
            raw = boundary.decode_base64(body, f"{where}.body")
        except RemoteProtocolError as exc:
            raise malformed(str(exc)) from None
        message = checked.olm_message(message_type, raw, malformed)
        session_id = checked.pre_key_session_id(message)
        del content

        sessions = await self.sessions_for(sender_key)
        for record in sessions:
            if session_id is not None and record.session_id != session_id:
                continue
            trial = self._copy(record.session)  # a refused payload must not step the ratchet
            plaintext = checked.session_decrypt(trial, message)
            if plaintext is None:
                continue  # not this session's message: try the next
            result = await self._check_payload(sender, sender_key, plaintext, own_keys)
            if isinstance(result, DecryptedToDevice):
                record.session, record.last_used = trial, now
                changes.olm_sessions.append(record)
            return result, changes

        if session_id is None:
            return OlmSessionError(
                f"no Olm session with {sender} ({sender_key}) decrypts this message: the "
                "session is wedged. A new session is requested from the sender.",
                sender,
                sender_key,
            ), changes
        if any(record.session_id == session_id for record in sessions):
            # rebuilding it would replace the live session with one at the message's
            # start (possible while the fallback key lasts): peers would fail to read us
            log.info(
                "dropped a pre-key message from %s (%s) delivered again: session %s is "
                "already established",
                sender,
                sender_key,
                session_id,
            )
            return None, changes
        working = account.copy(self.store.pickle_key)  # the key it uses goes only if accepted
        session, plaintext = checked.create_inbound_session(
            working.account,
            checked.curve25519_key(sender_key, "content.sender_key"),
            message,
            lambda why: OlmSessionError(
                f"a new Olm session from {sender} could not be created ({why}); the "
                "one-time key it used is no longer ours",
                sender,
                sender_key,
            ),
        )
        result = await self._check_payload(sender, sender_key, plaintext, own_keys)
        if isinstance(result, DecryptedToDevice):
            record = OlmSessionRecord(sender_key, session, now, now)
            sessions.insert(0, record)
            changes.olm_sessions.append(record)
            changes.account = working
        return result, changes

    def _copy(self, session: vodozemac.Session) -> vodozemac.Session:
        key = self.store.pickle_key
        return vodozemac.Session.from_pickle(session.pickle(key), key)

    async def _check_payload(
        self, sender: str, sender_key: str, plaintext: bytes, own_keys: Mapping[str, str]
    ) -> DecryptedToDevice | DecryptionError:
        try:
            payload = json.loads(plaintext)
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            return SenderMismatch("the decrypted payload is not JSON", sender, sender_key)
        if not isinstance(payload, dict):
            return SenderMismatch("the decrypted payload is not an object", sender, sender_key)
        recipient_keys = payload.get("recipient_keys")
        keys = payload.get("keys")
        claimed = _public_key_or_none(keys.get("ed25519") if isinstance(keys, dict) else None)
        problems = []
        if payload.get("sender") != sender:
            problems.append(
                f"it claims sender {boundary.show(payload.get('sender'))}, the event {sender!r}"
            )
        if payload.get("recipient") != self.user_id:
            problems.append(f"it is addressed to {boundary.show(payload.get('recipient'))}")
        if not isinstance(recipient_keys, dict) or recipient_keys.get("ed25519") != own_keys.get(
            "ed25519"
        ):
            problems.append("it was encrypted for another Ed25519 key than ours")
        if claimed is None:
            problems.append("it names no Ed25519 key of the sender")
        if not isinstance(payload.get("type"), str) or not isinstance(payload.get("content"), dict):
            problems.append("it has no type or content")
        device = await self.store.get_device_by_curve25519(sender_key)
        if device is not None and (device.user_id != sender or device.ed25519 != claimed):
            problems.append(
                f"the device with that Curve25519 key is {device.user_id} {device.device_id} "
                f"with Ed25519 {device.ed25519}, not the key it claims"
            )
        described = None
        if "sender_device_keys" in payload:
            described = _sender_device_keys(
                payload["sender_device_keys"], sender, sender_key, claimed, device, problems
            )
            if described is not None and device is None:
                # a device ID we know under other keys: the description is not that device
                listed = (await self.store.get_devices(sender)).get(described.device_id)
                if listed is not None and listed.ed25519 != described.ed25519:
                    problems.append(
                        f"its sender_device_keys give device {described.device_id} other keys "
                        "than the ones we know"
                    )
        if problems:
            return SenderMismatch(
                f"an Olm message from {sender} was refused: " + "; ".join(problems),
                sender,
                sender_key,
            )
        sender_device = payload.get("sender_device")
        return DecryptedToDevice(
            sender,
            sender_key,
            str(claimed),
            sender_device if isinstance(sender_device, str) else None,
            device is not None,
            payload["type"],
            payload["content"],
            described,
        )


def _sender_device_keys(
    keys: Any,
    sender: str,
    sender_key: str,
    claimed: Any,
    known: Device | None,
    problems: list[str],
) -> Device | None:
    """Check a payload's ``sender_device_keys`` (MSC4147); the device, or ``None`` with why."""
    device_id = keys.get("device_id") if isinstance(keys, dict) else None
    if not isinstance(device_id, str):
        problems.append("its sender_device_keys name no device")
        return None
    try:
        device = Device.from_keys(sender, device_id, keys)
    except InvalidDeviceKeys as exc:
        problems.append(f"its sender_device_keys are refused: {exc}")
        return None
    if device.curve25519 != sender_key:
        problems.append("its sender_device_keys hold another Curve25519 key than it came from")
    if device.ed25519 != claimed:
        problems.append("its sender_device_keys hold another Ed25519 key than it claims")
    if known is not None and (known.device_id, known.ed25519) != (device_id, device.ed25519):
        problems.append(
            f"its sender_device_keys describe device {device_id}, not the known "
            f"{known.device_id} with that Curve25519 key"
        )
    return device


class OlmPayload:
    """An Olm payload for many recipients: the shared part serialised once.

    Only ``recipient`` and ``recipient_keys`` differ between devices; they are
    spliced into the closing brace of the shared part's JSON.
    """

    def __init__(self, shared: dict[str, Any]) -> None:
        # ASCII escapes: a lone surrogate in the content is valid JSON, not valid UTF-8
        self._head = boundary.api_json(shared, "content").decode()[:-1]

    def for_device(self, device: Device) -> bytes:
        recipient = json.dumps(device.user_id)
        key = json.dumps(device.ed25519)
        tail = f',"recipient":{recipient},"recipient_keys":{{"ed25519":{key}}}}}'
        return (self._head + tail).encode()


def _field(
    ciphertext: Mapping[str, Any],
    name: str,
    kind: type,
    where: str,
    sender: str,
    sender_key: str,
) -> Any:
    value = ciphertext.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MalformedEvent(
            f"the Olm message's {name} is {type(value).__name__}, not {kind.__name__}",
            sender,
            sender_key,
            f"{where}.{name}",
        )
    return value


def _malformed(sender: str, sender_key: str, where: str) -> Callable[[str], MalformedEvent]:
    return lambda why: MalformedEvent(
        f"a malformed Olm message from {sender}: {why}", sender, sender_key, where
    )


def _public_key_or_none(value: object) -> str | None:
    """A key the payload claims, canonically spelled; ``None`` if it is not a key."""
    try:
        return boundary.public_key(value, "keys.ed25519")
    except RemoteProtocolError:
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")
