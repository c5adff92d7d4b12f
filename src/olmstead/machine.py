"""``OlmMachine``: the end-to-end-encryption state machine. It never touches the network.

The caller pushes in what the server said (``receive_sync_changes``), pulls out
what must be sent (``outgoing_requests``) and reports each answer
(``mark_request_as_sent``). Sub-machines are plain attributes (``keys_upload``
decides which keys to make and send, ``upload_guard`` whether and when an upload may
go out and what a failed one means, ``devices`` whose device lists we follow, ``olm``
the Olm sessions with other devices, ``megolm`` room keys, ``outbox`` the to-device
requests kept until the server confirms them, ``delivery`` the room events waiting
for their key); other users' cross-signing identities and the trust levels of their
devices come from ``identities``; the machine alone commits to the store.

Every change follows one pattern: copy the state, change the copy, commit it with
``store.save_changes``, and only then adopt it and let anything leave. A crash at
any point leaves the store with either the old state or the new one, and nothing
the server saw is missing from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import vodozemac

from olmstead import boundary, key_export, key_state, metrics
from olmstead.backoff import Backoff
from olmstead.cross_signing import secret_storage
from olmstead.cross_signing.machine import CrossSigningMachine, CrossSigningStatus
from olmstead.cross_signing.record import CrossSigningRecord
from olmstead.delivery import DeliverySettings, RoomEventQueue, WaitingResult
from olmstead.errors import (
    DecryptionError,
    DeviceIdentityConflict,
    DeviceIdInUse,
    DeviceKeysReplaced,
    DeviceUnusable,
    InsecureDevice,
    KeyStateError,
    LocalProtocolError,
    MalformedEvent,
    MatrixHttpError,
    OlmSessionError,
    OlmsteadError,
    OneTimeKeyConflict,
    RemoteProtocolError,
    StoreCorrupt,
    StoreMismatch,
)
from olmstead.identities.device import Device
from olmstead.identities.tracker import DeviceTracker
from olmstead.identities.trust import (
    SharingStrategy,
    TrustLevel,
    device_trust,
    is_verified,
    split_recipients,
)
from olmstead.identities.user_identity import IdentityChanged, UserIdentity, apply_identities
from olmstead.keys_upload import KeySettings, KeysUpload
from olmstead.olm import account as own
from olmstead.outbox import Outbox
from olmstead.requests import (
    AccountDataRequest,
    KeysClaimRequest,
    KeysUploadRequest,
    OutgoingRequest,
    ToDeviceRequest,
)
from olmstead.sessions.group_sessions import (
    MEGOLM_ALGORITHM,
    DecryptedRoomEvent,
    GroupSessions,
    RoomSettings,
    payload_bytes,
)
from olmstead.sessions.olm_sessions import OLM_ALGORITHM, DecryptedToDevice, OlmSessions
from olmstead.sessions.withheld import WITHHELD_TYPE, read_withheld
from olmstead.store.base import (
    AccountRecord,
    Changes,
    CryptoStore,
    InboundGroupSessionRecord,
    OlmSessionRecord,
    OutboundGroupSessionRecord,
    OutboxEntry,
    is_storable_text,
)
from olmstead.upload_guard import OneTimeKeysDrained, UploadGuard, UploadPolicy

__all__ = ["OlmMachine", "UndecryptableToDevice"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UndecryptableToDevice:
    """An encrypted to-device event that could not be decrypted or was refused."""

    event: Mapping[str, Any]
    error: DecryptionError


ToDeviceResult = DecryptedToDevice | UndecryptableToDevice | Mapping[str, Any]

#: a device whose Olm session broke gets a new one (and an m.dummy) at most this often
UNWEDGE_INTERVAL = 3600.0
#: unknown devices with a broken session waiting for their user's device list, at most
MAX_WEDGED_UNKNOWN = 1000
#: users whose devices are kept in memory (a bridge's busiest rooms)
DEVICE_CACHE_USERS = 5000
#: requests handed out before a reload whose answers are still recognised (and dropped)
STALE_REQUESTS = 1000


class OlmMachine:
    """One device's end-to-end-encryption state, over one store."""

    def __init__(
        self,
        store: CryptoStore,
        record: AccountRecord,
        generation: int,
        settings: KeySettings,
        policy: UploadPolicy,
        tracked_users: Mapping[str, bool],
        clock: Callable[[], float],
        delivery: DeliverySettings | None = None,
        cross_signing: CrossSigningRecord | None = None,
    ) -> None:
        self.store = store
        self.keys_upload = KeysUpload(settings, claim=not policy.replace_existing_device)
        self.upload_guard = UploadGuard(policy, record.user_id, record.device_id)
        self.devices = DeviceTracker(record.user_id, record.device_id, tracked_users)
        self.olm = OlmSessions(store, record.user_id, record.device_id)
        self.megolm = GroupSessions(store)
        self.outbox = Outbox()
        self.delivery = RoomEventQueue(delivery or DeliverySettings())
        #: which devices get our room keys, unless ``share_room_key`` is given another
        self.sharing_strategy = SharingStrategy.ALL_DEVICES
        #: refuse decrypted events whose device is not cross-signed by its owner (MSC4153)
        self.only_cross_signed_senders = False
        self._identity_changes: list[IdentityChanged] = []
        self._device_keys: dict[str, Any] | None = None
        self.cross_signing = CrossSigningMachine(
            record.user_id,
            record.device_id,
            cross_signing,
            Backoff(policy.first_delay, policy.max_delay),
        )
        self._outbound: dict[str, OutboundGroupSessionRecord] = {}
        self._session_claims: dict[str, list[Device]] = {}
        # the stored devices of recent users, whole; _device_epoch moves with every
        # commit of devices, so a read that raced one is not cached
        self._device_cache: OrderedDict[str, dict[str, Device]] = OrderedDict()
        self._device_epoch = 0
        # unwedging: devices whose session broke, when each was last tried, claims for them,
        # and committed m.dummy messages waiting to be handed out
        self._to_unwedge: dict[str, Device] = {}
        self._unwedged_at: dict[str, float] = {}
        self._unwedge_claims: set[str] = set()
        #: Curve25519 keys of unknown devices whose session broke -> their user, queried
        self._wedged_unknown: dict[str, str] = {}
        self._pending_to_device: list[ToDeviceRequest] = []
        # the key-state marker for the server's account data, once an upload succeeded
        self._pending_marker: AccountDataRequest | None = None
        self._latest_marker = ""
        self._marker_backoff = Backoff(policy.first_delay, policy.max_delay)
        #: the marker the server held when we last looked (a drain records it answered)
        self._marker_seen: key_state.KeyStateMarker | None = None
        #: requests handed out before a reload, oldest first (at most STALE_REQUESTS kept)
        self._stale_requests: dict[str, None] = {}
        #: requests whose unusable answer was already recorded as a failure
        self._settled: OrderedDict[str, None] = OrderedDict()
        self._reports: list[OneTimeKeysDrained] = []
        self._record = record
        self._identity: dict[str, str] | None = None
        self._generation = generation
        #: the lease generation of a commit that failed (its outcome unknown), until reloaded
        self._failed_commit_at: int | None = None
        self._clock = clock
        self._in_flight: dict[str, OutgoingRequest] = {}
        self._mutex = _Exclusive(self._drop_caches)
        # set while no /keys/query is in flight: a share waits on it (see wait_for_key_query)
        self._query_settled = asyncio.Event()
        self._query_settled.set()

    @classmethod
    async def open(
        cls,
        store: CryptoStore,
        user_id: str,
        device_id: str,
        *,
        key_settings: KeySettings | None = None,
        upload_policy: UploadPolicy | None = None,
        clock: Callable[[], float] = time.time,
        delivery: DeliverySettings | None = None,
    ) -> OlmMachine:
        """Load the device's account from ``store``, or create and commit a new one.

        A new account is committed before anything about it can leave the machine.
        ``delivery`` bounds the queue of room events waiting for their key.
        Raises ``StoreMismatch`` if the store holds another user's or device's account.
        """
        generation = await store.ensure_lease()
        record = await store.load_account()
        if record is None:
            record = AccountRecord(user_id, device_id, vodozemac.Account())
            await store.save_changes(Changes(account=record), generation=generation)
            log.info("created a new Olm account for %s %s", user_id, device_id)
        elif (record.user_id, record.device_id) != (user_id, device_id):
            raise StoreMismatch(
                store.name, (record.user_id, record.device_id), (user_id, device_id)
            )
        return cls(
            store,
            record,
            generation,
            key_settings or KeySettings(),
            upload_policy or UploadPolicy(),
            await store.get_tracked_users(),
            clock,
            delivery,
            await store.load_cross_signing(),
        )

    # --- who we are ----------------------------------------------------------------------------

    @property
    def user_id(self) -> str:
        return self._record.user_id

    @property
    def device_id(self) -> str:
        return self._record.device_id

    @property
    def identity_keys(self) -> dict[str, str]:
        """Our Curve25519 and Ed25519 public keys, base64."""
        # kept: every encryption names them, and a device's identity keys never change
        if self._identity is None:
            self._identity = own.identity_keys(self._record.account)
        return self._identity

    @property
    def device_keys_shared(self) -> bool:
        """Whether the server has confirmed our device keys."""
        return self._record.shared

    @property
    def server_key_count(self) -> int | None:
        """The server's last reported count of our one-time keys (``None``: not yet known)."""
        return self._record.server_key_count

    @property
    def key_problem(self) -> KeyStateError | None:
        """Why uploads stopped (``DeviceIdInUse``, ``DeviceIdentityConflict``, …), if they did."""
        return self.upload_guard.problem

    def ensure_may_encrypt(self) -> None:
        """Raise ``DeviceUnusable`` if this device must not encrypt: its ID or keys on the
        server were found to be another identity's, so recipients would check our messages
        against keys that are not ours. ``share_room_key``, ``encrypt_room_events`` and
        ``encrypt_to_devices`` call it first."""
        problem = self.upload_guard.problem
        if isinstance(problem, DeviceIdInUse | DeviceIdentityConflict | DeviceKeysReplaced):
            raise DeviceUnusable(self.user_id, self.device_id, problem)

    def take_reports(self) -> list[OneTimeKeysDrained]:
        """Repairs done since the last call (stale keys drained), for the application."""
        reports, self._reports = self._reports, []
        return reports

    async def check_key_state(self, marker_content: Any) -> int:
        """Compare our key-state marker from the server's account data with the store.

        Pass the content of the ``key_state.marker_type(device_id)`` account data
        event (``None`` if the server has none). If the server was given one-time keys
        this store never issued, the store was rolled back: the stale keys are drained
        before anything else goes out. Returns how many published keys the store lacks
        (0: no sign of a rollback).
        """
        async with self._mutex:
            await self._refresh()
            if not self._record.shared:
                return 0
            marker = key_state.read_marker(marker_content)
            self._marker_seen = marker
            drained = await self.store.get_value(key_state.DRAINED)
            lost = key_state.keys_lost_to_rollback(marker, self._record.account, drained)
            if lost:
                log.warning(
                    "the server was given one-time keys up to #%d, but this store has issued "
                    "%d fewer: it was restored from an older copy; draining the stale keys",
                    marker.published_through if marker else -1,
                    lost,
                )
                self.upload_guard.start_drain()
            return lost

    def device_keys(self) -> dict[str, Any]:
        """Our signed device keys, as ``/keys/upload`` and ``/keys/query`` carry them."""
        # kept: a device's keys never change, and every Olm payload carries them (MSC4147)
        if self._device_keys is None:
            self._device_keys = own.device_keys(self._record.account, self.user_id, self.device_id)
        return dict(self._device_keys)

    # --- cross-signing: our identity (the cross_signing sub-machine decides) --------------------

    @property
    def cross_signing_status(self) -> CrossSigningStatus:
        """What this store holds of our cross-signing identity."""
        return self.cross_signing.status()

    def _sign_with_device(self, obj: dict[str, Any]) -> dict[str, Any]:
        return own.sign_json(self._record.account, self.user_id, self.device_id, obj)

    async def bootstrap_cross_signing(
        self,
        own_keys: Mapping[str, Any],
        *,
        passphrase: str | None = None,
        iterations: int = secret_storage.PBKDF2_ITERATIONS,
    ) -> str:
        """Create our cross-signing keys and secret storage; returns the recovery key.

        ``own_keys`` is the ``/keys/query`` answer for our own user. The private keys
        and every request (``DeviceSigningUploadRequest``, ``SignaturesUploadRequest``,
        the secret storage ``AccountDataRequest``s) are committed before
        ``outgoing_requests`` hands them out, after our device keys are on the server.
        Called again after a crash, it resumes with the same keys and recovery key.
        Raises ``CrossSigningExists`` if the server has a master key we do not hold.
        """
        async with self._mutex:
            await self._refresh()
            record, recovery_key = self.cross_signing.bootstrap(
                own_keys, self.device_keys(), self._sign_with_device, passphrase, iterations
            )
            if record is not None:
                await self._commit(Changes(cross_signing=record))
                self.cross_signing.adopt(record, fresh=True)
            return recovery_key

    async def recover_cross_signing(
        self,
        own_keys: Mapping[str, Any],
        account_data: Mapping[str, Any],
        *,
        recovery_key: str | None = None,
        passphrase: str | None = None,
    ) -> None:
        """Take our cross-signing keys from secret storage, and sign this device with them.

        ``account_data``: account data type -> content for ``m.secret_storage.default_key``,
        ``m.secret_storage.key.<id>`` and the three ``m.cross_signing.*`` secrets (absent
        ones left out); ``own_keys``: the ``/keys/query`` answer for our own user. Raises
        ``InvalidRecoveryKey``, ``WrongRecoveryKey``, ``WrongPassphrase``,
        ``SecretStorageMissing``, ``SecretsMismatch``, ``CrossSigningMissing`` or
        ``InvalidSignature``, storing and sending nothing.
        """
        key = None if recovery_key is None else secret_storage.decode_recovery_key(recovery_key)
        async with self._mutex:
            await self._refresh()
            record = self.cross_signing.recover(
                own_keys, account_data, key, passphrase, self.device_keys(), self._sign_with_device
            )
            await self._commit(Changes(cross_signing=record))
            self.cross_signing.adopt(record, fresh=True)

    async def sign_user(self, user_id: str, master_key: Mapping[str, Any]) -> None:
        """Sign ``user_id``'s master key (as ``/keys/query`` gave it) with our user-signing
        key, the end of a verification; the signature upload is committed and handed out
        by ``outgoing_requests``."""
        async with self._mutex:
            await self._refresh()
            record = self.cross_signing.sign_user(user_id, master_key)
            await self._commit(Changes(cross_signing=record))
            self.cross_signing.adopt(record)

    # --- what the server said ------------------------------------------------------------------

    async def receive_sync_changes(
        self,
        *,
        one_time_key_counts: Mapping[str, int] | None = None,
        unused_fallback_key_types: Sequence[str] | None = None,
        device_lists: Mapping[str, Any] | None = None,
        to_device_events: Sequence[Mapping[str, Any]] = (),
        sync_token: str | None = None,
        values: Mapping[str, str | None] | None = None,
    ) -> list[ToDeviceResult]:
        """Take what a ``/sync`` response says about keys, and its to-device events.

        Pass the ``device_one_time_keys_count`` object as it came (a missing
        algorithm counts as 0), ``device_unused_fallback_key_types`` and
        ``device_lists`` (``changed`` and ``left``) as they came; ``None`` means the
        response did not carry that field at all.

        Every section is checked before anything is taken: one of the wrong shape
        raises ``RemoteProtocolError`` naming it (``.field``) and changes nothing
        (``boundary.SyncSections`` sorts a sync's sections out beforehand, as the
        client does). A to-device event fails alone: it comes back as
        ``UndecryptableToDevice``, the rest are processed.

        Returns the to-device events in order: Olm-encrypted ones decrypted
        (``DecryptedToDevice``) or refused (``UndecryptableToDevice``), the rest as
        they came; a pre-key message delivered a second time is dropped. Every
        ratchet step is committed before this returns, in the same transaction as
        ``sync_token`` (the response's ``next_batch``) when it is given. A caller
        with a room timeline to deliver passes the token in a second call, once the
        timeline reached the application: a crash then brings the sync back rather
        than losing its events. ``values`` (the client's per-room timeline
        positions) are committed in the same transaction.
        """
        counts_given = boundary.key_counts(one_time_key_counts)
        fallback_types = boundary.fallback_key_types(unused_fallback_key_types)
        lists = boundary.device_lists(device_lists)
        events = boundary.to_device_events(to_device_events, "to_device_events")
        if sync_token is not None:
            boundary.identifier(sync_token, "next_batch")
        async with self._mutex:
            await self._refresh()
            changes = Changes()
            working, results = await self._decrypt_to_device(events, changes)
            reveals_fallback = fallback_types is not None and not self._record.fallback_supported
            if working is None and reveals_fallback:
                working = self._record.copy(self.store.pickle_key)
            target = working or self._record
            self.keys_upload.on_sync_counts(
                target,
                None if counts_given is None else {"signed_curve25519": counts_given},
                fallback_types,
            )
            if lists is not None:
                if self.user_id in lists[0]:
                    self.upload_guard.watch_own_device()  # is our device still ours?
                marked, dropped = self.devices.on_device_lists(*lists)
                changes.tracked_users.update(marked)
                changes.untracked_users |= dropped
            if working is not None:  # fallback support seen, or inbound sessions used keys
                changes.account = working
            if values:
                changes.values.update(values)
            if sync_token is not None:
                changes.values["sync_token"] = sync_token
            await self._commit(changes)
            if working is not None:
                self._record = working
            return results

    async def _decrypt_to_device(
        self, events: Sequence[Any], changes: Changes
    ) -> tuple[AccountRecord | None, list[ToDeviceResult]]:
        """Each event on its own: refused ones change nothing. The account copy that new
        inbound sessions used keys from (``None``: none did), and the results."""
        results: list[ToDeviceResult] = []
        working: AccountRecord | None = None
        now = self._clock()
        for position, event in enumerate(events):
            if not isinstance(event, Mapping):
                error = MalformedEvent(
                    f"to-device event #{position} is not an object", field="to_device.events"
                )
                log.warning("%s", error)
                results.append(UndecryptableToDevice({}, error))
                continue
            content = event.get("content")
            if event.get("type") == WITHHELD_TYPE:
                notice = await read_withheld(self.store, event.get("sender"), content)
                if notice is not None:
                    changes.withheld.append(notice)
                results.append(event)
                continue
            if event.get("type") != "m.room.encrypted" or not (
                isinstance(content, Mapping) and content.get("algorithm") == OLM_ALGORITHM
            ):
                results.append(event)
                continue
            account = working or self._record
            result, found = await self.olm.decrypt(event, self.identity_keys, account, now)
            if result is None:
                continue  # delivered before: dropped (see OlmSessions.decrypt)
            if isinstance(result, DecryptionError):
                log.warning("to-device event from %.80r: %s", event.get("sender"), result)
                results.append(UndecryptableToDevice(event, result))
                if isinstance(result, OlmSessionError) and result.sender_key is not None:
                    await self._note_wedged(result.sender_key, now, event.get("sender"), changes)
                continue
            changes.olm_sessions.extend(found.olm_sessions)
            if found.account is not None:
                working = found.account
            result = await self._with_trust(result)
            # room keys are kept whatever the sender's trust: the room events they open
            # are refused one by one, each with its reason
            if (
                self.only_cross_signed_senders
                and result.type != "m.room_key"
                and not result.trust.cross_signed
            ):
                refused = _insecure(result.sender, result.sender_key, result.trust)
                log.warning("to-device %s from %s: %s", result.type, result.sender, refused)
                results.append(UndecryptableToDevice(event, refused))
                continue
            if result.type == "m.room_key":
                room_key = await self.megolm.accept_room_key(result)
                if room_key is not None:
                    changes.inbound_group_sessions.append(room_key)
            elif result.type == WITHHELD_TYPE:
                notice = await read_withheld(
                    self.store, result.sender, result.content, olm_sender_key=result.sender_key
                )
                if notice is not None:
                    changes.withheld.append(notice)
            results.append(result)
        return working, results

    async def _note_wedged(
        self, sender_key: str, now: float, sender: Any = None, changes: Changes | None = None
    ) -> None:
        """Ask for a new session with a device whose messages no session decrypts.

        A device we do not know (a store restored from a copy older than the peer's
        device) is looked up first: its user's devices are queried, and the repair
        follows the answer.
        """
        if isinstance(self.upload_guard.problem, DeviceIdInUse | DeviceIdentityConflict):
            return  # an unusable device sends nothing encrypted, not even an m.dummy
        device = await self.store.get_device_by_curve25519(sender_key)
        if device is None and is_storable_text(sender) and changes is not None:
            if len(self._wedged_unknown) < MAX_WEDGED_UNKNOWN:
                self._wedged_unknown[sender_key] = sender
                marked = (
                    self.devices.track([sender]) or self.devices.on_device_lists([sender], [])[0]
                )
                changes.tracked_users.update(marked)
            return
        if device is None or now - self._unwedged_at.get(sender_key, -UNWEDGE_INTERVAL) < (
            UNWEDGE_INTERVAL
        ):
            return
        if len(self._unwedged_at) >= DEVICE_CACHE_USERS:  # months of wedged devices: bounded
            self._unwedged_at = {
                k: t for k, t in self._unwedged_at.items() if now - t < UNWEDGE_INTERVAL
            }
        self._unwedged_at[sender_key] = now
        self._to_unwedge[sender_key] = device
        log.warning(
            "the Olm session with %s %s is wedged: opening a new one",
            device.user_id,
            device.device_id,
        )

    async def _send_dummies(self, devices: list[Device]) -> None:
        """Encrypt m.dummy over the new sessions, committed, to be handed out next."""
        messages: dict[str, dict[str, dict[str, Any]]] = {}
        stepped = []
        now = self._clock()
        dummy = self.olm.payload(self.identity_keys, "m.dummy", {}, self.device_keys())
        for device in devices:
            sealed = await self.olm.encrypt(self.identity_keys, device, dummy, now)
            if sealed is not None:
                messages.setdefault(device.user_id, {})[device.device_id] = sealed[0]
                stepped.append(sealed[1])
        if messages:
            changes = Changes(olm_sessions=stepped)
            entry = OutboxEntry(f"dummy-{uuid.uuid4().hex}", "m.room.encrypted", messages, now)
            self.outbox.add(entry, changes)
            await self._commit(changes)
            self.outbox.committed([entry], hand_out=True)

    # --- trust -----------------------------------------------------------------------------

    async def _with_trust(self, event: DecryptedToDevice) -> DecryptedToDevice:
        """The event with its sending device's trust level filled in."""
        device = await self.store.get_device_by_curve25519(event.sender_key)
        if not event.verified or device is None:
            # not a device we know: its MSC4147 description, checked on decryption, may be
            device = event.sender_device_keys
        if device is None or (device.user_id, device.ed25519) != (
            event.sender,
            event.sender_ed25519,
        ):
            return event
        levels = await self._trust_levels([device])
        return replace(event, trust=levels[device.user_id, device.device_id])

    async def _trust_levels(self, devices: Iterable[Device]) -> dict[tuple[str, str], TrustLevel]:
        """The trust level of each device, by (user ID, device ID); one store read."""
        devices = list(devices)
        identities = await self.store.get_user_identities_of(
            [self.user_id, *(d.user_id for d in devices)]
        )
        judge = self._judge(identities)
        return {(d.user_id, d.device_id): judge(d) for d in devices}

    def _judge(
        self, identities: Mapping[str, UserIdentity | None]
    ) -> Callable[[Device], TrustLevel]:
        """A device's trust level from the identities read (each user's verification once)."""
        own_identity = identities.get(self.user_id)
        verified = {user: self._verified(i, own_identity) for user, i in identities.items()}
        return lambda d: device_trust(d, identities.get(d.user_id), verified.get(d.user_id, False))

    def _verified(self, identity: UserIdentity | None, own_identity: UserIdentity | None) -> bool:
        own_device = (self.user_id, self.device_id, self.identity_keys["ed25519"])
        return identity is not None and is_verified(identity, own_identity, own_device)

    async def get_user_identity(self, user_id: str) -> UserIdentity | None:
        """``user_id``'s pinned cross-signing identity (``None``: none known).

        ``identity.changed_to`` holds a new identity the server lists, not adopted until
        ``acknowledge_identity_change``.
        """
        return await self.store.get_user_identity(user_id)

    async def is_identity_verified(self, user_id: str) -> bool:
        """Whether we verified ``user_id``'s pinned identity (see ``TrustLevel.VERIFIED``)."""
        identities = await self.store.get_user_identities_of([self.user_id, user_id])
        identity = identities.get(user_id)
        return self._verified(identity, identities.get(self.user_id))

    async def get_device_trust(self, user_id: str, device_id: str) -> TrustLevel:
        """The trust level of a device we know; ``UNKNOWN_DEVICE`` if we know none by that ID."""
        if (user_id, device_id) == (self.user_id, self.device_id):
            return TrustLevel.VERIFIED  # this device
        device = (await self.store.get_devices(user_id)).get(device_id)
        if device is None or device.deleted:
            return TrustLevel.UNKNOWN_DEVICE
        return (await self._trust_levels([device]))[user_id, device_id]

    def take_identity_changes(self) -> list[IdentityChanged]:
        """Master key changes seen since the last call, for the application: the newest
        per user (an earlier one not yet taken was replaced by it)."""
        changes, self._identity_changes = self._identity_changes, []
        return changes

    async def acknowledge_identity_change(
        self, user_id: str, new_master_key: str | None = None
    ) -> UserIdentity:
        """Adopt the changed identity of ``user_id`` the server lists: pin its new master key.

        Room keys go to the user's devices again (as the sharing strategy allows); the new
        identity is not verified, whatever the old one was. ``new_master_key``: the key
        the application was shown (``IdentityChanged.new_master_key``); if the server
        changed it again since, nothing is adopted. Raises ``LocalProtocolError`` if no
        change of that user is waiting, or it waits with another key.
        """
        async with self._mutex:
            await self._refresh()
            identity = await self.store.get_user_identity(user_id)
            if identity is None or identity.changed_to is None:
                raise LocalProtocolError(
                    f"no identity change of {user_id} is waiting to be acknowledged"
                )
            adopted = identity.changed_to
            if new_master_key is not None and adopted.master.key != new_master_key:
                raise LocalProtocolError(
                    f"the identity of {user_id} changed again: the server lists master key "
                    f"{adopted.master.key}, not {new_master_key}; nothing was adopted"
                )
            await self._commit(Changes(user_identities=[adopted]))
            log.info("adopted the new master key %s of %s", adopted.master.key, user_id)
            return adopted

    async def _apply_identities(
        self, response: Mapping[str, Any], users: list[str], changes: Changes
    ) -> list[IdentityChanged]:
        """Add the cross-signing identities of a ``/keys/query`` answer to ``changes``."""
        stored = await self.store.get_user_identities_of([self.user_id, *users])
        own_identity = stored.get(self.user_id)
        outcome = apply_identities(
            response,
            users,
            {user: stored.get(user) for user in users},
            lambda identity: self._verified(identity, own_identity),
        )
        changes.user_identities.extend(outcome.identities)
        return outcome.changes

    async def _commit(self, changes: Changes) -> None:
        """Commit, fenced by the generation our state was read under.

        If the commit fails or is cancelled, whether it landed is unknown: the next
        operation reloads everything from the store, so memory never runs ahead of it.
        """
        unique = {(r.sender_key, r.session_id): r for r in changes.olm_sessions}
        changes.olm_sessions = list(unique.values())
        try:
            await self.store.save_changes(changes, generation=self._generation)
        except BaseException:
            if self._generation != -1:
                self._failed_commit_at = self._generation
            self._generation = -1  # forces _refresh to reload
            self._drop_caches()
            raise
        self.megolm.committed(changes.inbound_group_sessions)
        self.delivery.sessions_committed(
            (r.room_id, r.session_id) for r in changes.inbound_group_sessions
        )
        self.delivery.notices_committed(changes.withheld)
        if changes.devices:
            self._device_epoch += 1
            for device in changes.devices:
                cached = self._device_cache.get(device.user_id)
                if cached is not None:  # a user is cached whole: keep it whole
                    self._device_cache[device.user_id] = {**cached, device.device_id: device}

    def _drop_caches(self) -> None:
        """Forget what is cached from the store: after a failed commit, or an operation that
        stopped between a ratchet step (in a cached session) and its commit, the cache may
        be ahead of the store; what is needed is read again."""
        self.olm.forget()
        self.megolm.forget()
        self._forget_devices()
        self._outbound.clear()

    # --- Megolm: room keys and room events ------------------------------------------------------

    async def share_room_key(
        self,
        room_id: str,
        user_ids: Iterable[str],
        settings: RoomSettings | None = None,
        strategy: SharingStrategy | None = None,
    ) -> list[ToDeviceRequest]:
        """Make sure every current device of ``user_ids`` holds our room key for ``room_id``.

        Which devices count is the ``strategy`` (default: ``self.sharing_strategy``);
        the devices it leaves out, and every device of a user whose verified identity
        changed unacknowledged, get ``m.room_key.withheld`` (``m.unverified``) once per
        session. Rotates the session first if it is spent, too old, or a device that had
        it is no longer among the recipients. Devices we have no Olm session with get
        ``m.room_key.withheld`` (``m.no_olm``): claim sessions first with
        ``get_missing_sessions``. The requests are committed to the outbox with the
        ratchet steps that made them before they return; their recipients count as
        holding the key once ``mark_request_as_sent`` confirms them (until then a
        new share skips them, and after a restart ``outgoing_requests`` hands the
        same requests out again).
        Raises ``DeviceUnusable`` if the device ID or its keys were found to be another
        identity's (``key_problem``).
        """
        room_id = _room(room_id)
        user_ids = boundary.api_strings(user_ids, "user_ids")
        if settings is not None and not isinstance(settings, RoomSettings):
            raise LocalProtocolError("settings must be a RoomSettings")
        self.ensure_may_encrypt()
        async with self._mutex:
            await self._refresh()
            now = self._clock()
            record = await self._outbound_session(room_id)
            devices, refused = await self._recipients(user_ids, strategy or self.sharing_strategy)
            await self.olm.load(device.curve25519 for device in devices)
            wanted = {(d.user_id, d.device_id) for d in devices}
            # a device refused now that never had the key (withheld before) is no reason to
            # rotate; one that had it is
            had = {
                (u, d)
                for u, ds in (record.shared_with if record else {}).items()
                for d, index in ds.items()
                if index >= 0 or (u, d) not in refused
            }
            if record is not None:  # on their way count as had: a leaver's share means rotation
                sending = self.outbox.pending_recipients(room_id, record.session.session_id)
                had |= {
                    (u, d)
                    for u, ds in sending.items()
                    for d, index in ds.items()
                    if index >= 0 or (u, d) not in refused
                }
            changes = Changes()
            if record is None or self.megolm.expired(record, now) or (had - wanted):
                record = self.megolm.new_outbound(room_id, settings or RoomSettings(), now)
                own = InboundGroupSessionRecord(
                    room_id,
                    self.identity_keys["curve25519"],
                    self.identity_keys["ed25519"],
                    vodozemac.InboundGroupSession(record.session.session_key),
                )
                changes.inbound_group_sessions.append(own)  # so we read our own messages
            key = self.megolm.room_key_content(record)
            payload = self.olm.payload(self.identity_keys, "m.room_key", key, self.device_keys())
            session_id = record.session.session_id
            pending = self.outbox.pending_recipients(room_id, session_id)
            encrypted: dict[str, dict[str, dict[str, Any]]] = {}
            withheld: dict[str, dict[str, dict[str, Any]]] = {}
            given_key: dict[str, dict[str, int]] = {}
            told_withheld: dict[str, dict[str, int]] = {}
            for device in devices:
                given = record.shared_with.get(device.user_id, {}).get(device.device_id)
                if given is not None and given >= 0:
                    continue
                on_way = pending.get(device.user_id, {}).get(device.device_id)
                if on_way is not None and on_way >= 0:
                    continue  # the key is on its way to it
                sealed = await self.olm.encrypt(self.identity_keys, device, payload, now)
                if sealed is None:
                    if given is None and on_way is None:
                        withheld.setdefault(device.user_id, {})[device.device_id] = self._withheld(
                            room_id, session_id, "m.no_olm", "no Olm session with this device"
                        )
                        told_withheld.setdefault(device.user_id, {})[device.device_id] = -1
                    continue
                encrypted.setdefault(device.user_id, {})[device.device_id] = sealed[0]
                changes.olm_sessions.append(sealed[1])
                index = record.session.message_index
                given_key.setdefault(device.user_id, {})[device.device_id] = index
            for (user_id, device_id), why in refused.items():
                given = record.shared_with.get(user_id, {}).get(device_id)
                if given is None and pending.get(user_id, {}).get(device_id) is None:
                    withheld.setdefault(user_id, {})[device_id] = self._withheld(
                        room_id, session_id, "m.unverified", why
                    )
                    told_withheld.setdefault(user_id, {})[device_id] = -1
            entries = []
            if encrypted:
                entries.append(
                    OutboxEntry(
                        f"room_key-{uuid.uuid4().hex}",
                        "m.room.encrypted",
                        encrypted,
                        now,
                        room_id,
                        session_id,
                        given_key,
                    )
                )
            if withheld:
                entries.append(
                    OutboxEntry(
                        f"withheld-{uuid.uuid4().hex}",
                        "m.room_key.withheld",
                        withheld,
                        now,
                        room_id,
                        session_id,
                        told_withheld,
                    )
                )
            requests = [self.outbox.add(entry, changes) for entry in entries]
            changes.outbound_group_sessions.append(record)
            try:
                await self._commit(changes)
            except BaseException:
                self._outbound.pop(room_id, None)  # the cached copy ran ahead of the store
                raise
            self._outbound[room_id] = record
            self.outbox.committed(entries)
            self._in_flight.update((r.request_id, r) for r in requests)
            return requests

    async def _share_confirmed(self, entry: OutboxEntry, changes: Changes) -> None:
        """A share reached the server: its recipients now hold the key (in ``changes``)."""
        if not entry.room_id:
            return
        record = await self._outbound_session(entry.room_id)
        if record is None or record.session.session_id != entry.session_id:
            return  # rotated away meanwhile: nothing to record
        shared = {user: dict(devices) for user, devices in record.shared_with.items()}
        for user_id, devices in entry.recipients.items():
            for device_id, index in devices.items():
                known = shared.setdefault(user_id, {}).get(device_id)
                if known is None or known < 0 or (0 <= index < known):
                    shared[user_id][device_id] = index
        changes.outbound_group_sessions.append(replace(record, shared_with=shared))

    def _withheld(self, room_id: str, session_id: str, code: str, reason: str) -> dict[str, Any]:
        """The ``m.room_key.withheld`` content for our session ``session_id`` of ``room_id``."""
        return {
            "algorithm": MEGOLM_ALGORITHM,
            "room_id": room_id,
            "session_id": session_id,
            "sender_key": self.identity_keys["curve25519"],
            "code": code,
            "reason": reason,
        }

    async def _recipients(
        self, user_ids: Iterable[str], strategy: SharingStrategy
    ) -> tuple[list[Device], dict[tuple[str, str], str]]:
        """The devices that get the room key, and those refused with why (the strategy)."""
        devices = [
            device
            for by_id in (await self._current_devices_of(user_ids)).values()
            for device in by_id.values()
        ]
        users = {d.user_id for d in devices}
        identities = await self.store.get_user_identities_of([self.user_id, *users])
        blocked = [
            user
            for user in users
            if (identity := identities.get(user)) is not None and identity.was_verified
        ]
        share, withheld = split_recipients(devices, strategy, self._judge(identities), blocked)
        return share, {(w.device.user_id, w.device.device_id): w.reason for w in withheld}

    async def encrypt_room_event(
        self, room_id: str, event_type: str, content: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Megolm-encrypted content for ``room_id``; the ratchet step is committed first."""
        (encrypted,) = await self.encrypt_room_events(room_id, [(event_type, content)])
        return encrypted

    async def encrypt_room_events(
        self, room_id: str, events: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Megolm-encrypted contents for ``(event_type, content)`` pairs, in order.

        A content's ``m.relates_to`` is also put in the clear on its encrypted content
        (spec: "Relationships and encryption"), so the server can aggregate and thread it.
        One commit for the batch, before any ciphertext is returned. A batch that
        would run past the session's rotation limit is refused whole: share a new
        key (``share_room_key``) or send fewer. Raises ``DeviceUnusable`` as
        ``share_room_key`` does.
        """
        room_id = _room(room_id)
        if not isinstance(events, Sequence) or isinstance(events, str | bytes):
            raise LocalProtocolError("events must be a sequence of (event_type, content) pairs")
        for pair in events:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise LocalProtocolError(f"not an (event_type, content) pair: {pair!r:.80}")
            boundary.api_mapping(pair[1], "content")
        self.ensure_may_encrypt()
        async with self._mutex:
            await self._refresh()
            record = await self._outbound_session(room_id)
            if record is None or self.megolm.expired(record, self._clock()):
                raise LocalProtocolError(
                    f"no current room key for {room_id}: call share_room_key() before sending"
                )
            left = record.rotation_msgs - record.session.message_index
            if len(events) > left:
                raise LocalProtocolError(
                    f"the room key for {room_id} has {left} messages left before it must "
                    f"rotate, fewer than the {len(events)} to encrypt: send fewer, then call "
                    "share_room_key() for a new key"
                )
            own_keys, device_id = self.identity_keys, self.device_id
            # every payload first: content that cannot be serialised fails the batch before
            # a single ratchet step, so the cached session never runs ahead of the store
            payloads = [payload_bytes(room_id, t, content) for t, content in events]
            try:
                encrypted = [
                    self.megolm.encrypt_payload(
                        record, payload, own_keys, device_id, _relation(content)
                    )
                    for payload, (_type, content) in zip(payloads, events, strict=True)
                ]
                await self._commit(Changes(outbound_group_sessions=[record]))
            except BaseException:
                self._outbound.pop(room_id, None)
                raise
            return encrypted

    async def decrypt_room_event(
        self, room_id: str, event: Mapping[str, Any]
    ) -> DecryptedRoomEvent:
        """Decrypt an ``m.room.encrypted`` room event; raises a ``DecryptionError``."""
        (result,) = await self.decrypt_room_events(room_id, [event])
        if isinstance(result, DecryptionError):
            raise result
        return result

    async def decrypt_room_events(
        self, room_id: str, events: Sequence[Mapping[str, Any]]
    ) -> list[DecryptedRoomEvent | DecryptionError]:
        """Decrypt room events of ``room_id`` in order: each result, or why it failed.

        The message indices of the whole batch are committed once, before any
        plaintext is returned; an index used twice within the batch by different
        events is refused as a replay, as one used before it is. Each event is checked on
        its own: a malformed one is a ``MalformedEvent`` in its place.
        """
        room_id = _room(room_id)
        if not isinstance(events, Sequence) or isinstance(events, str | bytes | Mapping):
            raise LocalProtocolError("events must be a sequence of room events")
        async with self._mutex:
            await self._refresh()
            results, changes = await self.megolm.decrypt_many(room_id, events)
            await self._commit(changes)
            results = await self._room_events_trust(results)
            for result in results:
                metrics.room_event(
                    type(result).__name__ if isinstance(result, DecryptionError) else "decrypted"
                )
            return results

    async def _room_events_trust(
        self, results: list[DecryptedRoomEvent | DecryptionError]
    ) -> list[DecryptedRoomEvent | DecryptionError]:
        """Each decrypted event with its device's trust level; refused if the policy says."""
        own_key = self.identity_keys["curve25519"]
        senders: dict[str, Device] = {}
        for result in results:
            if (
                isinstance(result, DecryptedRoomEvent)
                and result.verified
                and result.sender_key not in senders
                and result.sender_key != own_key
            ):
                device = await self.store.get_device_by_curve25519(result.sender_key)
                if device is not None:
                    senders[result.sender_key] = device
        levels = await self._trust_levels(senders.values()) if senders else {}
        out: list[DecryptedRoomEvent | DecryptionError] = []
        for result in results:
            if not isinstance(result, DecryptedRoomEvent):
                out.append(result)
                continue
            if result.sender_key == own_key and result.signing_key == self.identity_keys["ed25519"]:
                trust = TrustLevel.VERIFIED  # our own messages
            elif result.verified and result.sender_key in senders:
                device = senders[result.sender_key]
                trust = levels[device.user_id, device.device_id]
            else:
                trust = TrustLevel.UNKNOWN_DEVICE
            if self.only_cross_signed_senders and not trust.cross_signed:
                out.append(_insecure(result.sender, result.sender_key, trust))
            else:
                out.append(replace(result, trust=trust))
        return out

    # --- room events waiting for their key -----------------------------------------------------

    async def retry_waiting_events(self) -> list[WaitingResult]:
        """Kept room events that can now be delivered or must be reported, oldest first.

        Decrypts again the kept events of every session whose room key or withheld
        notice was committed since the last call (all kept events after a start or
        a reload, and whenever one's ``DeliverySettings.key_wait`` ran out). Each
        result is delivered (``DecryptedRoomEvent``), reported as final (a
        ``DecryptionError`` with ``final`` set: the wait ended, or the key came and
        does not decrypt it), or reported while it still waits (``RoomKeyWithheld``
        with ``final`` unset, when a notice came). Pass the ``(room_id, event_id)``
        of those that ``settle`` to ``commit_deliveries`` once the application has
        them; until then a crash brings them back. The message indices are committed
        before this returns.
        """
        async with self._mutex:
            await self._refresh()
            now = self._clock()
            entries, over = await self.delivery.candidates(self.store, now)
            if not entries:
                self.delivery.settled()
                return []
            by_room: dict[str, list[int]] = {}
            for n, entry in enumerate(entries):
                by_room.setdefault(entry.room_id, []).append(n)
            results: list[DecryptedRoomEvent | DecryptionError] = [
                DecryptionError("not decrypted")
            ] * len(entries)
            changes = Changes()
            for room_id, positions in by_room.items():
                found, indices = await self.megolm.decrypt_many(
                    room_id, [entries[n].event for n in positions]
                )
                changes.message_indices.extend(indices.message_indices)
                for n, result in zip(positions, found, strict=True):
                    results[n] = result
            await self._commit(changes)
            results = await self._room_events_trust(results)
            return self.delivery.outcomes(entries, results, over, now)

    async def commit_deliveries(
        self,
        *,
        keep: Sequence[tuple[str, Mapping[str, Any]]] = (),
        settled: Iterable[tuple[str, str]] = (),
        sync_token: str | None = None,
        values: Mapping[str, str | None] | None = None,
    ) -> None:
        """Commit, in one transaction: room events to keep until their key comes,
        kept events that were delivered or finally reported, and the sync token.

        ``keep``: ``(room_id, event)`` pairs of room events whose decryption raised
        ``UnknownRoomKey`` or ``RoomKeyWithheld``, in timeline order (an event kept
        before keeps its first record). ``settled``: ``(room_id, event_id)`` of kept
        events the application now has (delivered or reported as final); delivered
        timeline events may be passed too. ``sync_token``: the ``next_batch`` of the
        response that brought them, once its events reached the application;
        ``values``: the driver's own small values to commit with it (``None`` deletes).
        """
        async with self._mutex:
            await self._refresh()
            records = self.delivery.records(keep, self._clock())
            changes = Changes(waiting_events=records, settled_events=set(settled))
            if values:
                changes.values.update(values)
            if sync_token is not None:
                changes.values["sync_token"] = sync_token
            await self._commit(changes)
            self.delivery.kept(records)
            self.delivery.settled()

    async def _outbound_session(self, room_id: str) -> OutboundGroupSessionRecord | None:
        if room_id not in self._outbound:
            record = await self.store.get_outbound_group_session(room_id)
            if record is None:
                return None
            self._outbound[room_id] = record
        return self._outbound[room_id]

    # --- room key export files ------------------------------------------------------------------

    async def export_room_keys(
        self,
        passphrase: str,
        *,
        rounds: int = key_export.DEFAULT_ROUNDS,
        progress: Callable[[int], object] | None = None,
    ) -> str:
        """Every room key we hold, as an encrypted key export file (Element's format)."""
        records = []
        async for record in self.store.inbound_group_sessions():
            records.append(record)
            if progress is not None:
                progress(1)
        entries = key_export.export_entries(records)
        return key_export.encrypt_key_file(key_export.entries_json(entries), passphrase, rounds)

    async def import_room_keys(
        self,
        armoured: str,
        passphrase: str,
        *,
        progress: Callable[[int], object] | None = None,
    ) -> tuple[int, int]:
        """Import a key export file; how many sessions were new or better, and how many skipped."""
        records, skipped = key_export.read_key_file(armoured, passphrase)
        return await self.add_room_keys(records, progress=progress), skipped

    async def add_room_keys(
        self,
        records: list[InboundGroupSessionRecord],
        *,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Store room keys from elsewhere (an import); how many were new or better.

        A session we already hold from an earlier message index is kept as it is.
        """
        added = 0
        async with self._mutex:
            await self._refresh()
            for start in range(0, len(records), 500):
                page = records[start : start + 500]
                better = []
                for record in page:
                    known = await self.store.get_inbound_group_session(
                        record.room_id, record.session_id
                    )
                    first = record.session.first_known_index
                    if known is not None and (known.sender_key, known.signing_key) != (
                        record.sender_key,
                        record.signing_key,
                    ):
                        log.warning(
                            "skipped an imported room key for session %s of %s: it names "
                            "another sharing device than the key we hold",
                            record.session_id,
                            record.room_id,
                        )
                    elif known is None or known.session.first_known_index > first:
                        better.append(record)
                await self._commit(Changes(inbound_group_sessions=better))
                added += len(better)
                if progress is not None:
                    progress(len(page))
        return added

    # --- Olm sessions and to-device encryption ------------------------------------------------

    async def get_missing_sessions(self, user_ids: Iterable[str]) -> KeysClaimRequest | None:
        """A ``/keys/claim`` for every known device of ``user_ids`` we have no session with."""
        user_ids = boundary.api_strings(user_ids, "user_ids")
        async with self._mutex:
            await self._refresh()
            missing = []
            current = await self._current_devices_of(user_ids)
            await self.olm.load(d.curve25519 for by_id in current.values() for d in by_id.values())
            for by_id in current.values():
                for device in by_id.values():
                    if not await self.olm.sessions_for(device.curve25519):
                        missing.append(device)
            if not missing:
                return None
            request = self.olm.claim_request(missing)
            self._session_claims[request.request_id] = missing
            self._in_flight[request.request_id] = request
            return request

    async def encrypt_to_devices(
        self, devices: Iterable[Device], event_type: str, content: Mapping[str, Any]
    ) -> tuple[ToDeviceRequest | None, list[Device]]:
        """Olm-encrypt one event for each device; the request, and the devices with no session.

        The stepped sessions are committed before the request is returned. Raises
        ``DeviceUnusable`` as ``share_room_key`` does.
        """
        if isinstance(devices, Mapping | str | bytes) or not hasattr(devices, "__iter__"):
            raise LocalProtocolError("devices must be an iterable of Device")
        devices = list(devices)
        if not all(isinstance(d, Device) for d in devices):
            raise LocalProtocolError("devices must be an iterable of Device")
        if not isinstance(event_type, str):
            raise LocalProtocolError("event_type must be a string")
        content = boundary.api_mapping(content, "content")
        self.ensure_may_encrypt()
        async with self._mutex:
            await self._refresh()
            messages: dict[str, dict[str, dict[str, Any]]] = {}
            stepped: list[OlmSessionRecord] = []
            without: list[Device] = []
            now = self._clock()
            payload = self.olm.payload(self.identity_keys, event_type, content, self.device_keys())
            for device in devices:
                encrypted = await self.olm.encrypt(self.identity_keys, device, payload, now)
                if encrypted is None:
                    without.append(device)
                    continue
                messages.setdefault(device.user_id, {})[device.device_id] = encrypted[0]
                stepped.append(encrypted[1])
            if not messages:
                return None, without
            await self._commit(Changes(olm_sessions=stepped))
            request = ToDeviceRequest(f"olm-{uuid.uuid4().hex}", "m.room.encrypted", messages)
            self._in_flight[request.request_id] = request
            return request, without

    async def update_tracked_users(self, user_ids: Iterable[str]) -> None:
        """Follow the devices of ``user_ids`` (members of our encrypted rooms) from now on."""
        user_ids = boundary.api_strings(user_ids, "user_ids")
        async with self._mutex:
            await self._refresh()
            await self._commit(Changes(tracked_users=self.devices.track(user_ids)))

    def outdated_users(self, user_ids: Iterable[str]) -> set[str]:
        """Those of ``user_ids`` whose device lists changed since they were last queried.

        A room key shared now would miss their new devices: query them first
        (``outgoing_requests`` hands out the query) or wait for the query in flight
        (``wait_for_key_query``).
        """
        return set(user_ids) & self.devices.outdated

    @property
    def key_query_in_flight(self) -> bool:
        """Whether a ``/keys/query`` was handed out and its answer has not been reported."""
        return self.devices.in_flight

    async def wait_for_key_query(self) -> None:
        """Wait until no ``/keys/query`` is in flight (at once if none is).

        Another task (a sync loop) that handed the query out reports its answer or
        failure, which ends the wait; so does a reload of the machine, which drops the
        query. Bound it with ``asyncio.timeout``.
        """
        await self._query_settled.wait()

    async def get_user_devices(self, user_id: str) -> dict[str, Device]:
        """The known, current devices of ``user_id`` (checked keys only), by device ID."""
        (user_id,) = boundary.api_strings([user_id], "user_id")
        return await self._current_devices(user_id)

    async def _current_devices(self, user_id: str) -> dict[str, Device]:
        # straight from the store: called outside the mutex, so not through the cache,
        # which is checked against the lease only under it
        return self._current(await self.store.get_devices_of([user_id]))[user_id]

    async def _current_devices_of(self, user_ids: Iterable[str]) -> dict[str, dict[str, Device]]:
        """The current devices of each user (cached, the rest in one store read)."""
        return self._current(await self._stored_devices_of(user_ids))

    def _current(self, stored: Mapping[str, dict[str, Device]]) -> dict[str, dict[str, Device]]:
        return {
            user_id: {
                device_id: device
                for device_id, device in devices.items()
                if not device.deleted and (user_id, device_id) != (self.user_id, self.device_id)
            }
            for user_id, devices in stored.items()
        }

    async def _stored_devices_of(self, user_ids: Iterable[str]) -> dict[str, dict[str, Device]]:
        """Every stored device of each user, deleted ones too: from the cache or one read.

        The cache holds users whole and follows our own commits; what a read returns
        is cached only if no commit of devices landed while it was under way.
        """
        wanted = list(dict.fromkeys(user_ids))
        found = {u: self._device_cache[u] for u in wanted if u in self._device_cache}
        missing = [u for u in wanted if u not in found]
        if missing:
            epoch = self._device_epoch
            read = await self.store.get_devices_of(missing)
            found.update(read)
            if epoch == self._device_epoch:
                self._device_cache.update(read)
                while len(self._device_cache) > DEVICE_CACHE_USERS:
                    self._device_cache.popitem(last=False)
        for user_id in found:
            if user_id in self._device_cache:
                self._device_cache.move_to_end(user_id)
        return {u: found[u] for u in wanted}

    def _forget_devices(self) -> None:
        self._device_cache.clear()
        self._device_epoch += 1

    # --- what to send, and what came back --------------------------------------------------------

    async def outgoing_requests(self) -> list[OutgoingRequest]:
        """The requests to send now. Everything they carry is already committed.

        A check of our device comes before a new account's first upload, and a drain
        of stale keys before a retried one; uploads that failed go out again only as
        the ``UploadPolicy`` allows.
        """
        async with self._mutex:
            await self._refresh()
            now = self._clock()
            requests: list[OutgoingRequest] = []
            requests.extend(self.outbox.take_unsent(now))
            requests.extend(self._pending_to_device)
            self._pending_to_device.clear()
            if self._pending_marker is not None and self._marker_backoff.ready(now):
                requests.append(self._pending_marker)
                self._pending_marker = None
            if self._to_unwedge and not self._unwedge_claims:
                claim = self.olm.claim_request(list(self._to_unwedge.values()))
                self._session_claims[claim.request_id] = list(self._to_unwedge.values())
                self._unwedge_claims.add(claim.request_id)
                self._to_unwedge.clear()
                requests.append(claim)
            query = self.devices.next_request(now)
            if query is not None:
                self._query_settled.clear()
                requests.append(query)
            guard_request = self.upload_guard.next_request(self._record.shared, now)
            if guard_request is not None:
                requests.append(guard_request)
            elif self.upload_guard.may_upload(now):
                if self.keys_upload.wanted(self._record, now) != (0, False):
                    record = self._record.copy(self.store.pickle_key)
                    self.keys_upload.top_up(record, now)
                    await self._commit(Changes(account=record))
                    self._record = record
                upload = self.keys_upload.pending_request(self._record)
                if upload is not None:
                    self.upload_guard.upload_handed_out(now)
                    requests.append(upload)
            if self._record.shared and self.upload_guard.problem is None:
                identity_request = self.cross_signing.next_request(now)
                if identity_request is not None:
                    requests.append(identity_request)
            self._in_flight.update((r.request_id, r) for r in requests)
            for request in requests:  # a retry under the same ID waits for its own answer
                self._settled.pop(request.request_id, None)
            return requests

    async def mark_request_as_sent(self, request_id: str, response: Mapping[str, Any]) -> None:
        """Record the server's success response to the request ``request_id``.

        Send only success responses here; after an error answer call
        ``mark_request_as_failed``, and the request goes out again as its kind allows.

        An answer is judged before anything is recorded. One that cannot be used (not
        a JSON object, a ``/keys/query`` answer without ``device_keys``, …) raises
        ``RemoteProtocolError`` after the request was settled as failed, exactly as
        ``mark_request_as_failed`` would have done: it is retried after a backoff or
        dropped, never stranded. (Calling ``mark_request_as_failed`` for it afterwards
        is harmless.) A ``/keys/upload`` success without ``one_time_key_counts`` is a
        success: the keys count as published and the count comes with the next sync.
        Raises ``LocalProtocolError`` for a ``request_id`` that was never handed out.
        """
        boundary.api_strings([request_id], "request_id")
        async with self._mutex:
            await self._refresh()
            kind = self._kind_of(request_id)
            try:
                answer = boundary.response_mapping(response, request_id.split("-", 1)[0])
                await self._on_answer(kind, request_id, answer)
            except RemoteProtocolError as error:
                log.warning("the answer to %s is unusable: %s", request_id, error)
                self._on_failure(kind, request_id, error)
                self._settled[request_id] = None
                while len(self._settled) > 1000:
                    self._settled.popitem(last=False)
                raise

    def _kind_of(self, request_id: str) -> str:
        """Which part of the machine a request belongs to (and whose answer it waits for)."""
        if request_id in self._settled:  # until it is handed out again
            return "settled"
        if self.outbox.owns(request_id):  # even from before a reload: the server has it
            return "outbox"
        if self.cross_signing.owns(request_id):  # its own outbox, committed before it left
            return "cross_signing"
        request = self._in_flight.get(request_id)
        if request_id in self._session_claims:
            return "claim"
        if self.devices.owns(request_id):
            return "query"
        if self.upload_guard.owns(request_id):
            return "guard"
        if isinstance(request, AccountDataRequest):
            return "marker"
        if isinstance(request, ToDeviceRequest):
            return "to_device"
        current = self.keys_upload.pending_request(self._record)
        if current is not None and current.request_id == request_id:
            return "upload"
        if isinstance(request, KeysUploadRequest):
            return "old_upload"
        if request_id in self._stale_requests:
            return "stale"
        raise LocalProtocolError(
            f"no request {request_id!r} is waiting for a response; pass the "
            "request_id of a request from outgoing_requests()"
        )

    async def _on_answer(self, kind: str, request_id: str, response: Mapping[str, Any]) -> None:
        if kind == "outbox":
            self._stale_requests.pop(request_id, None)
            changes = Changes()
            entry = self.outbox.confirm(request_id, changes)
            assert entry is not None
            await self._share_confirmed(entry, changes)
            await self._commit(changes)
            for record in changes.outbound_group_sessions:
                self._outbound[record.room_id] = record
            self.outbox.settled(request_id)
        elif kind == "marker":
            self._marker_backoff.succeeded()
        elif kind == "claim":
            claimed_for = self._session_claims[request_id]
            created = await self.olm.sessions_from_claim(
                self._record.account, claimed_for, response, self._clock()
            )
            await self._commit(Changes(olm_sessions=created))
            del self._session_claims[request_id]
            if request_id in self._unwedge_claims:
                self._unwedge_claims.discard(request_id)
                fresh = {r.sender_key for r in created}
                await self._send_dummies([d for d in claimed_for if d.curve25519 in fresh])
        elif kind == "query":
            try:
                queried = self.devices.queried_users()
                stored = await self._stored_devices_of(queried)
                outcome = self.devices.on_response(response, stored, self._clock())
                changes = Changes(devices=outcome.devices, tracked_users=outcome.tracked_users)
                reported = await self._apply_identities(response, queried, changes)
                await self._commit(changes)
            finally:
                self._query_settled.set()
            for key, user_id in list(self._wedged_unknown.items()):
                if user_id in stored:  # asked about: repaired now if the device is there
                    del self._wedged_unknown[key]
                    await self._note_wedged(key, self._clock())
            # reported once committed: a change is never told before it is stored. A newer
            # change of a user replaces one not yet taken (that one no longer waits): a
            # server flipping keys cannot grow the list without bound
            newer = {change.user_id for change in reported}
            self._identity_changes = [
                c for c in self._identity_changes if c.user_id not in newer
            ] + reported
        elif kind == "cross_signing":
            self._in_flight.pop(request_id, None)
            identity, refused = self.cross_signing.on_response(request_id, response)
            await self._commit(Changes(cross_signing=identity))
            self.cross_signing.adopt(identity)
            if refused is not None:
                raise refused
        elif kind == "guard":
            self._in_flight.pop(request_id, None)
            report = self.upload_guard.on_response(
                request_id, response, self.identity_keys["ed25519"]
            )
            if report is not None:
                await self._after_drain(report)
        elif kind == "upload":
            current = self.keys_upload.pending_request(self._record)
            assert current is not None
            await self._mark_keys_uploaded(response)
            metrics.key_upload("ok")
            self.upload_guard.on_upload_success()
            if self._record.shared:  # not after the claim: the full upload follows
                self._note_published(current)
        elif kind == "old_upload":
            # The keys are no longer pending here (published by another holder of the
            # store, or reloaded state): the server has them, nothing to record.
            log.warning("a response to %s came after its keys stopped pending", request_id)
            self.upload_guard.on_upload_success()
        elif kind == "stale":
            self._stale_requests.pop(request_id, None)
            log.warning("dropped the answer to %s: it was sent before a reload", request_id)
        elif kind == "settled":
            log.warning("dropped a second answer to %s: it was settled already", request_id)
        # delivered to-device messages need nothing: their sessions were committed before
        self._in_flight.pop(request_id, None)

    async def mark_request_as_failed(self, request_id: str, error: OlmsteadError) -> None:
        """Report that the request ``request_id`` got an error (or no answer at all).

        The request stays pending. A duplicate one-time key error starts the repair
        (or raises ``DeviceIdentityConflict``); any failure slows later uploads down.
        Raises ``LocalProtocolError`` for a ``request_id`` that was never handed out.
        """
        boundary.api_strings([request_id], "request_id")
        if not isinstance(error, OlmsteadError):
            raise LocalProtocolError(f"error must be an OlmsteadError, not {type(error).__name__}")
        async with self._mutex:
            await self._refresh()
            kind = self._kind_of(request_id)
            self._on_failure(kind, request_id, error)

    def _on_failure(self, kind: str, request_id: str, error: OlmsteadError) -> None:
        request = self._in_flight.pop(request_id, None)
        if kind == "outbox":  # committed: it goes out again, unchanged
            self._stale_requests.pop(request_id, None)
            self.outbox.failed(request_id, error, self._clock())
        elif kind == "cross_signing":
            self.cross_signing.on_failure(request_id, self._clock())
        elif kind == "claim":
            wedged = self._session_claims.pop(request_id)
            if request_id in self._unwedge_claims:
                self._unwedge_claims.discard(request_id)
                for device in wedged:  # try again when it next fails, past the interval
                    self._unwedged_at.pop(device.curve25519, None)
            # otherwise the devices are still missing a session: claimed again when asked
        elif kind == "marker":
            assert isinstance(request, AccountDataRequest)
            self._marker_failed(request, error)
        elif kind == "to_device":
            # its ciphertext was made from committed ratchets and its recipients are
            # recorded as served: it must reach them, so it goes out again, same txn ID
            assert isinstance(request, ToDeviceRequest)
            self._pending_to_device.append(request)
        elif kind == "query":
            self.devices.on_failure(self._clock())
            self._query_settled.set()
        elif kind == "guard":
            self.upload_guard.on_failure(request_id, self._clock())
        elif kind in ("upload", "old_upload"):
            metrics.key_upload("conflict" if isinstance(error, OneTimeKeyConflict) else "failed")
            self.upload_guard.on_upload_failure(error, self._clock(), self.identity_keys["ed25519"])
        elif kind == "stale":
            self._stale_requests.pop(request_id, None)
        # "settled": its answer was refused and the failure recorded then

    async def _after_drain(self, report: OneTimeKeysDrained) -> None:
        """Our stale keys are gone from the server: refill, and remember what was answered."""
        self._reports.append(report)
        metrics.keys_drained(report.drained)
        self._record.server_key_count = 0  # a drain claims every one-time key we had
        # the fallback key may be as stale as the rest (its claim proves only our
        # signature, not that the store still has its private half): replace it
        self.keys_upload.replace_fallback_key()
        if self._marker_seen is not None:
            await self._commit(Changes(values={key_state.DRAINED: self._marker_seen.token()}))

    def _marker_failed(self, request: AccountDataRequest, error: OlmsteadError) -> None:
        """A marker write failed: again after a backoff, unless refused for good or outdated."""
        status = error.status if isinstance(error, MatrixHttpError) else None
        if status is not None and 400 <= status < 500 and status != 429:
            log.warning(
                "the server refuses our key-state marker (%s): a rolled-back store will be "
                "found only when an upload collides",
                error,
            )
            return
        delay = self._marker_backoff.failed(self._clock())
        if request.request_id == self._latest_marker:  # an older one is outdated
            self._pending_marker = request
            log.info("writing the key-state marker failed (%s); again in %.0f s", error, delay)

    def _note_published(self, upload: KeysUploadRequest) -> None:
        """After a confirmed upload of one-time keys, tell the server how far they got."""
        if not upload.one_time_keys:
            return
        through = max(key_state.key_number(k.split(":", 1)[1]) for k in upload.one_time_keys)
        self._pending_marker = AccountDataRequest(
            f"key_state-{uuid.uuid4().hex[:12]}",
            self.user_id,
            key_state.marker_type(self.device_id),
            key_state.marker_content(self.identity_keys["ed25519"], through, self._clock()),
        )
        self._latest_marker = self._pending_marker.request_id

    async def _mark_keys_uploaded(self, response: Mapping[str, Any]) -> None:
        record = self._record.copy(self.store.pickle_key)
        self.keys_upload.on_upload_response(record, response)
        await self._commit(Changes(account=record))
        self._record = record

    # --- the store may have moved on ------------------------------------------------------------

    async def _refresh(self) -> None:
        """Reload cached state if the store's lease passed through other hands."""
        generation = await self.store.ensure_lease()
        if generation == self._generation:
            if not self.outbox.loaded:
                await self.outbox.load(self.store)
            return
        record = await self.store.load_account()
        if record is None:
            raise StoreCorrupt(
                self.store.name, "the account vanished while another process held it"
            )
        tracked = await self.store.get_tracked_users()  # read all before changing anything
        failed_at, self._failed_commit_at = self._failed_commit_at, None
        if failed_at == generation:
            log.warning(
                "%s: a commit failed, and whether it landed is unknown; reloaded the state "
                "from the store (the lease stayed ours, generation %d)",
                self.store.name,
                generation,
            )
        else:
            log.warning(
                "%s changed hands (lease generation %d -> %d); reloaded the account",
                self.store.name,
                self._generation if failed_at is None else failed_at,
                generation,
            )
        self._record = record
        self._generation = generation
        # requests handed out before belong to state that may be gone: answers to them
        # are logged and dropped, and whatever is still needed is asked for again
        kept: dict[str, OutgoingRequest] = {}
        if failed_at == generation:
            # nobody else wrote: to-device messages made from committed ratchets must
            # still reach their devices, and are sent (or retried) as before
            kept = {k: r for k, r in self._in_flight.items() if isinstance(r, ToDeviceRequest)}
        for request_id in [*self._in_flight, *self._session_claims]:
            if request_id not in kept:
                self._stale_requests[request_id] = None
        while len(self._stale_requests) > STALE_REQUESTS:  # answers that never came
            del self._stale_requests[next(iter(self._stale_requests))]
        self._in_flight = kept
        self._session_claims.clear()
        self._unwedge_claims.clear()
        if failed_at != generation:
            self._pending_to_device.clear()
            self._pending_marker, self._latest_marker = None, ""  # the next holder's is newer
        self._outbound.clear()
        self.olm.forget()
        self.megolm.forget()
        self.delivery.forget()
        self._forget_devices()
        self._identity = None
        await self.outbox.load(self.store)
        self._device_keys = None
        self.cross_signing.forget(await self.store.load_cross_signing())
        self.devices = DeviceTracker(record.user_id, record.device_id, tracked)
        self._query_settled.set()  # the query in flight, if any, was dropped with the rest


class _Exclusive:
    """The machine's lock: one operation at a time. An operation that raises drops the
    caches on its way out, whatever it raised (a store that failed mid-way, a cancelled
    task), so a session stepped in memory but never committed is not used again."""

    def __init__(self, on_failure: Callable[[], None]) -> None:
        self._lock = asyncio.Lock()
        self._on_failure = on_failure

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is not None:
                self._on_failure()
        finally:
            self._lock.release()


def _relation(content: Mapping[str, Any]) -> Mapping[str, Any] | None:
    relation = content.get("m.relates_to")
    return relation if isinstance(relation, Mapping) else None


def _insecure(sender: str, sender_key: str, trust: TrustLevel) -> InsecureDevice:
    why = {
        TrustLevel.NOT_SIGNED: "its owner has not cross-signed it",
        TrustLevel.OWNER_HAS_NO_IDENTITY: "its owner has no cross-signing identity",
    }.get(trust, "it is not a device we know")
    return InsecureDevice(
        f"an event from {sender} was refused: the sending device ({sender_key}) is not "
        f"cross-signed by its owner ({why}), and this machine refuses such devices. The "
        "sender can fix it by verifying the device from another of their devices.",
        sender,
        sender_key,
        trust.value,
    )


def _room(room_id: object) -> str:
    """A room ID argument (``LocalProtocolError`` if it is not a usable identifier)."""
    (checked,) = boundary.api_strings([room_id], "room_id")
    return checked
