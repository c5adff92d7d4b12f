"""``Client``: logs in, syncs, and drives the machine over HTTP. The machine's only driver.

It pushes what ``/sync`` says into the machine, sends what the machine hands
out, and reports each answer back. It never reaches into the machine's state.

    client = Client("https://matrix.example.org", store=store)
    await client.login("bot", password)           # a server-assigned device ID
    await client.init_crypto()                     # check the device, upload keys
    client.on_room_event(handle)                   # decrypted events arrive here
    await client.start(initial_sync_limit=20)      # sync until client.stop()

``room_send`` encrypts by itself in encrypted rooms: it brings the members'
devices up to date, opens Olm sessions where missing, shares the room key (with
the devices the sharing strategy allows: ``sharing_strategy``, or per room
``set_room_sharing_strategy``), and only then sends. A peer whose master key
changed is reported to ``on_identity_changed`` callbacks. An event whose room key
has not arrived (or was withheld) is reported at once to ``on_decryption_failure``
(``error.final`` unset), kept in the store with the sync token that brought it,
and delivered when its key comes, across restarts; if the key has not come within
``key_wait`` seconds it is reported again, as final. docs/event-lifecycle.md has
the whole story.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from olmstead import boundary, key_state, metrics, relations
from olmstead.attachments import EncryptedFile, file_content
from olmstead.backoff import Backoff
from olmstead.boundary import SyncSections
from olmstead.client.gaps import TimelineGap, Timelines
from olmstead.client.invites import Invite, read_invites
from olmstead.client.media import FileSource, Media
from olmstead.client.rooms import KEY_STATE_EVENTS, Room, RoomEvent, RoomState, is_identifier
from olmstead.cross_signing import published_identity, secret_storage
from olmstead.cross_signing.machine import SECRET_NAMES
from olmstead.delivery import DeliverySettings
from olmstead.errors import (
    ConnectionFailed,
    CrossSigningExists,
    DecryptionError,
    KeyStateError,
    LocalProtocolError,
    MatrixHttpError,
    OlmsteadError,
    RemoteProtocolError,
    RoomKeyWithheld,
    StoreError,
    TransportError,
    TrustError,
    UnknownRoomKey,
)
from olmstead.http.endpoints import CLIENT_V3, account_data_path, route
from olmstead.http.transport import MatrixHttp, RetryPolicy
from olmstead.identities.trust import SharingStrategy
from olmstead.identities.user_identity import IdentityChanged, UserIdentity
from olmstead.keys_upload import KeySettings
from olmstead.machine import OlmMachine, UndecryptableToDevice
from olmstead.requests import DeviceSigningUploadRequest, OutgoingRequest
from olmstead.sessions.group_sessions import DecryptedRoomEvent
from olmstead.sessions.olm_sessions import DecryptedToDevice
from olmstead.store.base import Changes, CryptoStore
from olmstead.upload_guard import OneTimeKeysDrained, UploadPolicy

__all__ = ["Client", "CrossSigningSettings", "Session"]

RoomEventCallback = Callable[[RoomEvent], object]
FailureCallback = Callable[[str | None, Mapping[str, Any], DecryptionError], object]
ToDeviceCallback = Callable[[DecryptedToDevice], object]
InviteCallback = Callable[[Invite], object]
GapCallback = Callable[[TimelineGap], object]
IdentityCallback = Callable[[IdentityChanged], object]

log = logging.getLogger(__name__)

SYNC_TOKEN = "sync_token"
#: a round of requests never goes on past this: a drain is bounded well below it
_MAX_REQUESTS_PER_ROUND = 1000
#: how long a share waits for the members' device lists (seconds), and in how many rounds
KEY_QUERY_WAIT = 30.0
KEY_QUERY_ROUNDS = 4
#: seconds ``start`` waits after the store failed, doubling with each failure up to the max
STORE_RETRY_FIRST = 0.5
STORE_RETRY_MAX = 15.0


@dataclass(frozen=True)
class CrossSigningSettings:
    """How the client handles our cross-signing identity (spec: "Cross-signing").

    ``bootstrap_on_start``: ``init_crypto`` creates cross-signing keys and secret
    storage if the account has none; the recovery key goes to ``on_recovery_key``
    (printed to stderr when no callback is given), and ``Client.recovery_key`` holds it.
    ``password``: answers the server's user-interactive auth when it asks for it to
    upload the keys (a first upload needs none on spec v1.11 servers).
    ``passphrase``: secret storage keyed by a passphrase (``m.pbkdf2``) as well.
    """

    bootstrap_on_start: bool = False
    password: str | None = None
    passphrase: str | None = None
    on_recovery_key: Callable[[str], object] | None = None


@dataclass(frozen=True)
class Session:
    """What a login gives: enough to come back later without logging in again."""

    homeserver: str
    user_id: str
    device_id: str
    access_token: str


class Client:
    def __init__(
        self,
        homeserver: str,
        *,
        store: CryptoStore | None = None,
        key_settings: KeySettings | None = None,
        upload_policy: UploadPolicy | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        auto_join: bool = False,
        key_wait: float = DeliverySettings.key_wait,
        max_waiting_events: int = DeliverySettings.max_waiting,
        sharing_strategy: SharingStrategy = SharingStrategy.ALL_DEVICES,
        only_cross_signed_senders: bool = False,
        cross_signing: CrossSigningSettings | None = None,
    ) -> None:
        """``key_wait``: seconds an encrypted room event waits for its room key before
        it is reported as final (default 900); ``max_waiting_events``: events kept
        waiting at most (default 1000; past it the oldest are reported as final);
        ``sharing_strategy``: which devices get our room keys (a room may have its own,
        ``set_room_sharing_strategy``); ``only_cross_signed_senders``: refuse events from
        devices their owner has not cross-signed (``InsecureDevice``, MSC4153)."""
        self.homeserver = homeserver
        self.sharing_strategy = sharing_strategy
        self._only_cross_signed_senders = only_cross_signed_senders
        self._room_strategies: dict[str, SharingStrategy] = {}
        self._identity_callbacks: list[IdentityCallback] = []
        self.store = store
        self.http = MatrixHttp(homeserver, transport=transport, retry=retry)
        self.media = Media(self.http)
        self.session: Session | None = None
        self.machine: OlmMachine | None = None
        self._key_settings = key_settings
        self._upload_policy = upload_policy
        self._delivery = DeliverySettings(key_wait, max_waiting_events)
        self._drained_callbacks: list[Callable[[OneTimeKeysDrained], object]] = []
        self._room_callbacks: list[RoomEventCallback] = []
        self._failure_callbacks: list[FailureCallback] = []
        self._to_device_callbacks: list[ToDeviceCallback] = []
        self._rooms: dict[str, RoomState] = {}
        #: join every invite as it comes (a bot's usual wish)
        self.auto_join = auto_join
        self._invite_callbacks: list[InviteCallback] = []
        self._invited: set[str] = set()  # rooms whose invite was reported, until joined or left
        self._timelines = Timelines(self.http, store)
        self._gap_callbacks: list[GapCallback] = []
        self._stop = asyncio.Event()
        #: the sync token and the to-device events committed under it (see sync_once)
        self._taken: tuple[str | None, frozenset[str]] = (None, frozenset())
        self._reported_problem: OlmsteadError | None = None
        self._cross_signing = cross_signing or CrossSigningSettings()
        self._problem_callbacks: list[Callable[[OlmsteadError], object]] = []
        #: the recovery key of a bootstrap this client ran, if it ran one
        self.recovery_key: str | None = None

    # --- who we are ------------------------------------------------------------------------

    async def login(
        self,
        user: str,
        password: str,
        *,
        device_id: str | None = None,
        device_name: str | None = None,
    ) -> Session:
        """Password login. Without ``device_id`` the server assigns a new device."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        }
        if device_id is not None:
            body["device_id"] = device_id
        if device_name is not None:
            body["initial_device_display_name"] = device_name
        answer = await self.http.request("POST", f"{CLIENT_V3}/login", body)
        session = Session(
            self.homeserver, answer["user_id"], answer["device_id"], answer["access_token"]
        )
        self.restore(session)
        return session

    def restore(self, session: Session) -> None:
        """Use a session from an earlier login (its access token) instead of logging in."""
        self.session = session
        self.http.access_token = session.access_token

    async def logout(self) -> None:
        await self.http.request("POST", f"{CLIENT_V3}/logout", {})
        self.session = None
        self.http.access_token = None

    # --- encryption --------------------------------------------------------------------------

    def on_keys_drained(self, callback: Callable[[OneTimeKeysDrained], object]) -> None:
        """Call ``callback`` whenever stale one-time keys of ours were drained and replaced."""
        self._drained_callbacks.append(callback)

    async def init_crypto(self) -> OlmMachine:
        """Open the device's machine and bring its keys on the server up to date.

        A new device is looked up on the server first: ``DeviceIdInUse`` if another
        identity's keys are there, and nothing is uploaded. A device whose keys were
        published before reads its key-state marker: if the store was rolled back, the
        stale one-time keys are drained first (``on_keys_drained`` tells).
        """
        session = self._session()
        if self.store is None:
            raise LocalProtocolError("init_crypto needs a store: Client(..., store=...)")
        self.machine = await OlmMachine.open(
            self.store,
            session.user_id,
            session.device_id,
            key_settings=self._key_settings,
            upload_policy=self._upload_policy,
            delivery=self._delivery,
        )
        self.machine.sharing_strategy = self.sharing_strategy
        self.machine.only_cross_signed_senders = self._only_cross_signed_senders
        if self.machine.device_keys_shared:
            try:
                marker = await self._key_state_marker(session)
            except TransportError as error:  # best effort: a collision still finds a rollback
                log.warning("could not read the key-state marker (%s); not checked", error)
            else:
                await self.machine.check_key_state(marker)
        await self.process_outgoing()
        settings = self._cross_signing
        if settings.bootstrap_on_start and not self.machine.cross_signing_status.has_keys:
            try:
                key = await self.bootstrap_cross_signing(passphrase=settings.passphrase)
            except CrossSigningExists as exists:  # another device made them: recover instead
                self._report(exists)
            else:
                if settings.on_recovery_key is not None:
                    settings.on_recovery_key(key)
                else:
                    print(
                        f"olmstead: the recovery key of {session.user_id}: {key}", file=sys.stderr
                    )
        return self.machine

    def on_key_problem(self, callback: Callable[[OlmsteadError], object]) -> None:
        """Call ``callback`` with every key or trust problem the sync loop meets
        (``DeviceKeysReplaced``, ``DeviceIdentityConflict``, ``SignatureUploadFailed`` …)."""
        self._problem_callbacks.append(callback)

    async def own_keys(self) -> dict[str, Any]:
        """The ``/keys/query`` answer for our own user (all devices, cross-signing keys)."""
        session = self._session()
        return await self.http.request(
            "POST", f"{CLIENT_V3}/keys/query", {"device_keys": {session.user_id: []}}
        )

    async def bootstrap_cross_signing(self, *, passphrase: str | None = None) -> str:
        """Create and upload our cross-signing keys and secret storage; the recovery key.

        Everything is committed before it leaves; called again after a crash it sends
        the same keys. Raises ``CrossSigningExists`` if the account already has a master
        key (recover it with ``recover``), or the first ``TransportError`` that stopped
        the uploads (they go out again with the next round).
        """
        machine = self._machine()
        key = await machine.bootstrap_cross_signing(await self.own_keys(), passphrase=passphrase)
        self.recovery_key = key
        await self.process_outgoing(raise_trust_errors=True)
        if machine.cross_signing_status.pending:
            raise LocalProtocolError(
                "the cross-signing uploads did not all go through this round; they are "
                "committed and go out again with the next sync"
            )
        return key

    async def recover(
        self, *, recovery_key: str | None = None, passphrase: str | None = None
    ) -> None:
        """Take our cross-signing keys from secret storage and sign this device with them.

        Reads the account data and our published keys, then the machine checks them:
        ``InvalidRecoveryKey``, ``WrongRecoveryKey``, ``WrongPassphrase``,
        ``SecretStorageMissing``, ``SecretsMismatch`` … and nothing is sent.
        """
        machine = self._machine()
        session = self._session()
        account_data: dict[str, Any] = {}

        async def read(event_type: str) -> None:
            content = await self._account_data(session, event_type)
            if content is not None:
                account_data[event_type] = content

        await read(secret_storage.DEFAULT_KEY_TYPE)
        default = account_data.get(secret_storage.DEFAULT_KEY_TYPE, {})
        key_id = default.get("key") if isinstance(default, Mapping) else None
        if isinstance(key_id, str):
            await read(secret_storage.key_type(key_id))
            for name in SECRET_NAMES.values():
                await read(name)
        await machine.recover_cross_signing(
            await self.own_keys(), account_data, recovery_key=recovery_key, passphrase=passphrase
        )
        await self.process_outgoing(raise_trust_errors=True)

    async def _account_data(self, session: Session, event_type: str) -> dict[str, Any] | None:
        try:
            return await self.http.request("GET", account_data_path(session.user_id, event_type))
        except MatrixHttpError as error:
            if error.status == 404:
                return None
            raise

    async def _send_device_signing(self, request: DeviceSigningUploadRequest) -> dict[str, Any]:
        """Upload our cross-signing keys, answering user-interactive auth when asked."""
        try:
            return await self.http.send(request)
        except MatrixHttpError as error:
            body = error.body if isinstance(error.body, Mapping) else {}
            flows = body.get("flows")
            if error.status != 401 or not isinstance(flows, list):
                raise
            # Synapse asks for auth only to replace keys the account already has: another
            # device bootstrapped meanwhile. Never reset its identity with our password.
            session = self._session()
            master = next(iter(request.master_key.get("keys", {}).values()), None)
            published = published_identity(
                await self.own_keys(), session.user_id, session.device_id, ""
            )
            if published.master_key is not None and published.master_key != master:
                raise CrossSigningExists(session.user_id, published.master_key) from None
            stages = [
                f.get("stages")
                for f in flows
                if isinstance(f, Mapping) and isinstance(f.get("stages"), list)
            ]
            auth: dict[str, Any] = {}
            if isinstance(body.get("session"), str):
                auth["session"] = body["session"]
            if ["m.login.dummy"] in stages:
                auth["type"] = "m.login.dummy"
            elif ["m.login.password"] in stages and self._cross_signing.password is not None:
                auth |= {
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": self._session().user_id},
                    "password": self._cross_signing.password,
                }
            else:
                raise
            method, path = "POST", f"{CLIENT_V3}/keys/device_signing/upload"
            return await self.http.request(method, path, request.body(auth), retry=False)

    async def _key_state_marker(self, session: Session) -> dict[str, Any] | None:
        path = account_data_path(session.user_id, key_state.marker_type(session.device_id))
        try:
            return await self.http.request("GET", path)
        except MatrixHttpError as error:
            if error.status == 404:
                return None  # never written: keys from before markers, or none published
            raise

    async def process_outgoing(self, *, raise_trust_errors: bool = False) -> None:
        """Send what the machine asks for until it asks for nothing more this round.

        A failed request is reported to the machine, which decides when it goes out
        again (it holds it back meanwhile). A ``KeyStateError`` is raised to the caller.
        """
        machine = self._machine()
        for _ in range(_MAX_REQUESTS_PER_ROUND):
            requests = await machine.outgoing_requests()
            if not requests:
                return
            for request in requests:
                try:
                    answer = await self._send(request)
                except (TransportError, RemoteProtocolError) as error:
                    # one bad answer fails one request; the rest of the round goes on
                    log.warning("%s failed: %s", request.request_id, error)
                    await machine.mark_request_as_failed(request.request_id, error)
                    if raise_trust_errors and isinstance(request, DeviceSigningUploadRequest):
                        raise
                    continue
                except TrustError as problem:  # refused signatures, keys another device made
                    if isinstance(request, DeviceSigningUploadRequest):
                        await machine.mark_request_as_failed(request.request_id, problem)
                    if raise_trust_errors:
                        raise
                    self._report(problem)
                    continue
                try:
                    await machine.mark_request_as_sent(request.request_id, answer)
                except RemoteProtocolError as error:
                    # the machine settled it as failed already (retried after a backoff)
                    log.warning("%s: unusable answer: %s", request.request_id, error)
                    continue
                for report in machine.take_reports():
                    for callback in self._drained_callbacks:
                        callback(report)
                for change in machine.take_identity_changes():
                    for identity_callback in self._identity_callbacks:
                        identity_callback(change)
        log.error("stopped a round of requests after %d", _MAX_REQUESTS_PER_ROUND)

    # --- rooms ---------------------------------------------------------------------------------

    def on_room_event(self, callback: RoomEventCallback) -> None:
        """Call ``callback`` with every room timeline event, decrypted where it was encrypted."""
        self._room_callbacks.append(callback)

    def on_decryption_failure(self, callback: FailureCallback) -> None:
        """Call ``callback(room_id, event, error)`` for events that cannot be decrypted.

        ``room_id`` is ``None`` for to-device events. A room event whose key has not
        come (``UnknownRoomKey``) or was withheld (``RoomKeyWithheld``, with its
        ``code``) is reported at once with ``error.final`` unset, and kept: it is
        delivered if its key comes, or reported once more with ``error.final`` set
        when ``key_wait`` has passed. Every other error is final at once.
        """
        self._failure_callbacks.append(callback)

    def on_gap(self, callback: GapCallback) -> None:
        """Call ``callback(gap)`` when events of a room could not be fetched (a ``TimelineGap``).

        A limited sync timeline is filled from ``/messages`` first (bounded: see
        ``olmstead.client.gaps``); only what is still missing is reported, before the
        events that follow the gap are delivered.
        """
        self._gap_callbacks.append(callback)

    def on_to_device(self, callback: ToDeviceCallback) -> None:
        """Call ``callback`` with every to-device event that arrived Olm-encrypted."""
        self._to_device_callbacks.append(callback)

    # --- trust ---------------------------------------------------------------------------------

    @property
    def only_cross_signed_senders(self) -> bool:
        """Whether events from devices their owner has not cross-signed are refused."""
        return self._only_cross_signed_senders

    @only_cross_signed_senders.setter
    def only_cross_signed_senders(self, refuse: bool) -> None:
        self._only_cross_signed_senders = refuse
        if self.machine is not None:
            self.machine.only_cross_signed_senders = refuse

    def on_identity_changed(self, callback: IdentityCallback) -> None:
        """Call ``callback`` when a user's master key changes on the server.

        The old key stays pinned until ``acknowledge_identity_change``; if we had
        verified the user, no room keys go to them until then.
        """
        self._identity_callbacks.append(callback)

    async def acknowledge_identity_change(
        self, user_id: str, new_master_key: str | None = None
    ) -> UserIdentity:
        """Accept ``user_id``'s new master key (``OlmMachine.acknowledge_identity_change``)."""
        return await self._machine().acknowledge_identity_change(user_id, new_master_key)

    def set_room_sharing_strategy(self, room_id: str, strategy: SharingStrategy | None) -> None:
        """Share ``room_id``'s keys by ``strategy`` (``None``: the client's own again)."""
        if strategy is None:
            self._room_strategies.pop(room_id, None)
        else:
            self._room_strategies[room_id] = strategy

    async def create_room(
        self, *, invite: Iterable[str] = (), encrypted: bool = True, name: str | None = None
    ) -> str:
        body: dict[str, Any] = {"invite": list(invite), "preset": "private_chat"}
        if name is not None:
            body["name"] = name
        if encrypted:
            body["initial_state"] = [
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            ]
        answer = await self.http.request("POST", f"{CLIENT_V3}/createRoom", body)
        room_id: str = answer["room_id"]
        return room_id

    async def invite(self, room_id: str, user_id: str) -> None:
        """Invite ``user_id`` to ``room_id`` (``POST /rooms/{roomId}/invite``)."""
        await self.http.request(
            "POST", f"{CLIENT_V3}/rooms/{quote(room_id)}/invite", {"user_id": user_id}
        )

    async def join(self, room_id: str) -> None:
        """Join ``room_id`` (an invite's, or any the server lets us join).

        In an encrypted room the members' devices are tracked at once, so the first
        message sent there reaches them all.
        """
        await self.http.request("POST", f"{CLIENT_V3}/rooms/{quote(room_id)}/join", {})
        self._rooms.pop(room_id, None)
        self._invited.discard(room_id)
        try:
            room = await self._room_state(room_id)
        except (TransportError, RemoteProtocolError) as error:  # joined: the next sync brings it
            log.warning("joined %s but could not read its state yet: %s", room_id, error)
            return
        if room.encrypted and self.machine is not None:
            await self.machine.update_tracked_users(room.key_recipients())

    def on_invite(self, callback: InviteCallback) -> None:
        """Call ``callback(invite)`` once for each invite a sync brings (an ``Invite``).

        Join with ``join(invite.room_id)``, or pass ``auto_join=True`` to ``Client``
        to join every invite as it comes (after the callbacks ran).
        """
        self._invite_callbacks.append(callback)

    @property
    def rooms(self) -> dict[str, Room]:
        """The joined rooms the client follows, by room ID: a snapshot of each.

        Every joined room is followed from the first sync of ``start()`` (or of a new
        device), which carries the full state; a room joined later from its first
        sync, ``join`` or ``room_send``. Kept current by every sync; rooms left are
        dropped. Nothing is fetched here.
        """
        return {room_id: state.snapshot() for room_id, state in self._rooms.items()}

    def room(self, room_id: str) -> Room | None:
        """A snapshot of one followed room (see ``rooms``); ``None`` if it is not followed."""
        state = self._rooms.get(room_id)
        return state.snapshot() if state is not None else None

    async def room_send(self, room_id: str, event_type: str, content: Mapping[str, Any]) -> str:
        """Send an event; encrypted first if the room is. Returns its event ID.

        Raises ``DeviceUnusable`` in an encrypted room if this device's ID or keys were
        found to be another identity's (``machine.key_problem``): nothing is sent.
        """
        room = await self._room_state(room_id)
        body: Mapping[str, Any] = content
        if room.encrypted:
            machine = self._may_encrypt_in(room)  # before any claim or share leaves
            recipients = await self._query_members(room)
            claim = await machine.get_missing_sessions(recipients)
            if claim is not None:
                await self._send_and_mark(claim)
            strategy = self._room_strategies.get(room_id, self.sharing_strategy)
            for request in await machine.share_room_key(
                room_id, recipients, room.encryption, strategy
            ):
                await self._send_and_mark(request)
            body = await machine.encrypt_room_event(room_id, event_type, content)
            event_type = "m.room.encrypted"
        txn_id = uuid.uuid4().hex
        path = f"{CLIENT_V3}/rooms/{quote(room_id)}/send/{quote(event_type)}/{txn_id}"
        answer = await self.http.request("PUT", path, dict(body))
        event_id: str = answer["event_id"]
        return event_id

    async def _query_members(self, room: RoomState) -> set[str]:
        """Before a share: the members who get the key, each with a current device list.

        A member whose list changed is queried now, or, if a query is in flight
        (the sync loop's), after it was answered; a member who joined while it was
        in flight is queried again. The members are read again after every wait, so
        one who left meanwhile gets no key (the session rotates). Bounded: after
        ``KEY_QUERY_WAIT`` seconds or ``KEY_QUERY_ROUNDS`` rounds the share goes on,
        and members still outdated (their server did not answer) get the key only on
        their known devices.
        """
        machine = self._machine()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KEY_QUERY_WAIT
        for _ in range(KEY_QUERY_ROUNDS):
            # the sync loop keeps the room current while we wait (a join replaces it)
            user_ids = self._rooms.get(room.room_id, room).key_recipients()
            await machine.update_tracked_users(user_ids)
            await self.process_outgoing()  # makes the query unless one is in flight
            if not machine.outdated_users(user_ids):
                return user_ids
            left = deadline - loop.time()
            if not machine.key_query_in_flight or left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await machine.wait_for_key_query()
        user_ids = self._rooms.get(room.room_id, room).key_recipients()
        await machine.update_tracked_users(user_ids)
        log.warning(
            "sharing a room key without the current devices of %s: their device lists "
            "could not be queried",
            ", ".join(sorted(machine.outdated_users(user_ids))),
        )
        return user_ids

    async def _send(self, request: OutgoingRequest) -> dict[str, Any]:
        """``request``'s answer. A request whose task is cancelled while it is out is
        reported as failed (no answer) before the cancellation goes on: the machine hands
        it out again rather than wait for an answer that will never be read (a query
        left in flight would hold every later share and stop device tracking)."""
        try:
            if isinstance(request, DeviceSigningUploadRequest):
                return await self._send_device_signing(request)
            return await self.http.send(request)
        except asyncio.CancelledError:
            method, path = route(request)
            abandoned = ConnectionFailed(method, path, "the task sending it was cancelled")
            await asyncio.shield(
                self._machine().mark_request_as_failed(request.request_id, abandoned)
            )
            raise

    # --- relations ---------------------------------------------------------------------------

    async def send_reply(
        self, room_id: str, in_reply_to: str, content: Mapping[str, Any] | str
    ) -> str:
        """Send ``content`` (or a text) as a reply to event ``in_reply_to``; its event ID.
        In an encrypted room its ``m.relates_to`` also travels in the clear."""
        return await self.room_send(
            room_id, "m.room.message", relations.reply_content(in_reply_to, content)
        )

    async def send_thread_reply(
        self,
        room_id: str,
        thread_root: str,
        content: Mapping[str, Any] | str,
        *,
        latest_event: str | None = None,
    ) -> str:
        """Send ``content`` into the thread rooted at ``thread_root`` (``m.thread``)."""
        message = relations.thread_reply_content(thread_root, content, latest_event=latest_event)
        return await self.room_send(room_id, "m.room.message", message)

    async def send_edit(
        self, room_id: str, original: str, new_content: Mapping[str, Any] | str
    ) -> str:
        """Replace the content of our event ``original`` (``m.replace``); the edit's ID."""
        return await self.room_send(
            room_id, "m.room.message", relations.edit_content(original, new_content)
        )

    async def send_reaction(self, room_id: str, target: str, key: str) -> str:
        """React to ``target`` with ``key`` (an ``m.reaction``, ``m.annotation``)."""
        return await self.room_send(room_id, "m.reaction", relations.reaction_content(target, key))

    # --- files -------------------------------------------------------------------------------

    async def upload(
        self,
        source: FileSource,
        *,
        content_type: str = "application/octet-stream",
        filename: str | None = None,
    ) -> str:
        """Upload a file as it is (for unencrypted rooms); its ``mxc://`` URL.

        ``source`` is a path, bytes, or a binary file object; it is read a chunk
        (``attachments.CHUNK_SIZE``) at a time. Raises ``TransportError`` (``413``
        ``M_TOO_LARGE`` beyond the server's limit).
        """
        url, _encryptor, _size = await self.media.upload(
            source, encrypt=False, filename=filename, content_type=content_type
        )
        return url

    async def upload_encrypted(
        self, source: FileSource, *, filename: str | None = None
    ) -> EncryptedFile:
        """Encrypt and upload a file for an encrypted room (spec: "Sending encrypted
        attachments"); the ``EncryptedFile`` to put in the event (``file_content``).

        AES-256-CTR under a fresh key, SHA-256 of the ciphertext, streamed a chunk at a
        time: a file of any size passes through about two chunks of memory. The server
        sees ``application/octet-stream`` and ``filename`` if you give one (leave it out
        to keep the name from the server).
        """
        url, encryptor, _size = await self.media.upload(source, encrypt=True, filename=filename)
        assert encryptor is not None
        return encryptor.file_info(url)

    async def download_decrypted(
        self, file: EncryptedFile | Mapping[str, Any], destination: str | os.PathLike[str]
    ) -> Path:
        """Download an encrypted file (an event's ``file`` object, or an
        ``EncryptedFile``), decrypt it into ``destination`` and return that path.

        The plaintext goes to a temporary file beside ``destination`` (mode 0600), renamed
        into place only once the ciphertext's SHA-256 matched; on any failure nothing is
        left behind. A file or symlink already at ``destination`` is replaced (a symlink's
        target is not written through). Raises ``AttachmentInfoInvalid``,
        ``AttachmentKeyInvalid``, ``AttachmentVersionUnknown`` (the file info),
        ``AttachmentHashMismatch``, ``AttachmentTruncated`` (the download),
        ``RemoteProtocolError`` (a compressed body, though olmstead asks for none) or a
        ``TransportError``; ``IsADirectoryError`` before anything is downloaded if
        ``destination`` is a directory.
        """
        return await self.media.download_decrypted(file, destination)

    def stream_decrypted(self, file: EncryptedFile | Mapping[str, Any]) -> AsyncIterator[bytes]:
        """The plaintext of an encrypted file as an async iterator of chunks (up to 1 MiB).

        The last chunk comes only after the hash matched: an iteration that ends without
        an exception delivered the whole, verified file. Raises what
        ``download_decrypted`` raises, while iterating.
        """
        return self.media.stream_decrypted(file)

    async def send_file(
        self,
        room_id: str,
        source: FileSource,
        *,
        body: str | None = None,
        msgtype: str = "m.file",
        mimetype: str | None = None,
        info: Mapping[str, Any] | None = None,
        thumbnail: FileSource | None = None,
        thumbnail_info: Mapping[str, Any] | None = None,
    ) -> str:
        """Upload a file and send it as ``msgtype`` (``m.file``, ``m.image``, ``m.video``,
        ``m.audio``); its event ID. In an encrypted room the file (and thumbnail) are
        encrypted first and travel as ``file`` / ``info.thumbnail_file``; elsewhere as
        ``url`` / ``info.thumbnail_url``. ``body`` defaults to the file's name."""
        if body is None:
            body = Path(source).name if isinstance(source, str | os.PathLike) else "file"
        room = await self._room_state(room_id)
        if room.encrypted:
            self._may_encrypt_in(room)  # before anything is uploaded
            url, encryptor, size = await self.media.upload(source, encrypt=True)
            assert encryptor is not None
            thumb = await self.upload_encrypted(thumbnail) if thumbnail is not None else None
            content = file_content(
                encryptor.file_info(url),
                body=body,
                msgtype=msgtype,
                mimetype=mimetype,
                size=size,
                info=info,
                thumbnail=thumb,
                thumbnail_info=thumbnail_info,
            )
        else:
            url, _none, size = await self.media.upload(
                source,
                encrypt=False,
                filename=body,
                content_type=mimetype or "application/octet-stream",
            )
            details: dict[str, Any] = {**(info or {}), "size": size}
            if mimetype is not None:
                details["mimetype"] = mimetype
            if thumbnail is not None:
                details["thumbnail_url"] = await self.upload(thumbnail)
                if thumbnail_info is not None:
                    details["thumbnail_info"] = dict(thumbnail_info)
            content = {"msgtype": msgtype, "body": body, "url": url, "info": details}
        return await self.room_send(room_id, "m.room.message", content)

    async def send_image(
        self,
        room_id: str,
        source: FileSource,
        *,
        body: str | None = None,
        mimetype: str | None = None,
        width: int | None = None,
        height: int | None = None,
        thumbnail: FileSource | None = None,
        thumbnail_info: Mapping[str, Any] | None = None,
    ) -> str:
        """``send_file`` as ``m.image``, with ``info.w`` and ``info.h`` in pixels if given."""
        info = {k: v for k, v in (("w", width), ("h", height)) if v is not None}
        return await self.send_file(
            room_id,
            source,
            body=body,
            msgtype="m.image",
            mimetype=mimetype,
            info=info,
            thumbnail=thumbnail,
            thumbnail_info=thumbnail_info,
        )

    def _may_encrypt_in(self, room: RoomState) -> OlmMachine:
        """The machine, if this device may encrypt for ``room``: ``LocalProtocolError`` for
        an algorithm olmstead does not support, ``DeviceUnusable`` for a device whose ID or
        keys are another identity's."""
        if room.encryption is None:
            raise LocalProtocolError(
                f"{room.room_id} is encrypted with {room.algorithm!r}, which olmstead does not "
                "support: nothing was sent (it would have gone out in the clear)"
            )
        machine = self._machine()
        machine.ensure_may_encrypt()
        return machine

    async def _send_and_mark(self, request: OutgoingRequest) -> None:
        machine = self._machine()
        try:
            answer = await self._send(request)
        except (TransportError, RemoteProtocolError) as error:
            # a share left neither failed nor confirmed would wait in the outbox, never
            # sent again, and its recipients would be skipped by every later share
            await machine.mark_request_as_failed(request.request_id, error)
            raise
        await machine.mark_request_as_sent(request.request_id, answer)

    async def _room_state(self, room_id: str) -> RoomState:
        if room_id not in self._rooms:
            room = RoomState(room_id)
            events = await self.http.request_list(
                "GET", f"{CLIENT_V3}/rooms/{quote(room_id)}/state"
            )
            for event in events:
                room.apply(event)
            self._rooms[room_id] = room
        return self._rooms[room_id]

    async def _take_rooms(
        self, rooms: Mapping[str, Any], *, full: bool = False
    ) -> list[tuple[str, Mapping[str, Any]]]:
        """Update room state from a sync's joined rooms; their timeline events, in order.

        ``full``: the sync carries each room's whole state (a first sync, or
        ``full_state``), so a room not followed yet is read from it, not fetched.
        """
        timeline: list[tuple[str, Mapping[str, Any]]] = []
        for room_id, room in rooms.items():
            if not isinstance(room, Mapping) or not boundary.is_identifier(room_id):
                log.warning("skipped a joined room the sync sent malformed: %.80r", room_id)
                continue
            state_events = _events(room.get("state")) + _events(room.get("timeline"))
            changed = any(
                isinstance(e.get("type"), str)  # a list or object is unhashable
                and e.get("type") in KEY_STATE_EVENTS
                and "state_key" in e
                for e in state_events
            )
            known = room_id in self._rooms
            if full and not known:
                self._rooms[room_id] = RoomState(room_id)  # its whole state is in this sync
            timeline.extend((room_id, event) for event in _events(room.get("timeline")))
            try:
                state = await self._room_state(room_id)
            except (TransportError, RemoteProtocolError) as error:
                # not followed until its state can be read (the next sync, or room_send
                # asks again); its events are delivered all the same: one room whose
                # /state fails must not fail, and so repeat, every sync
                log.warning("could not read the state of %s: %s", room_id, error)
                continue
            if known or full:
                for event in state_events:
                    if "state_key" in event:
                        state.apply(event)
            if state.encrypted and (changed or not known) and self.machine is not None:
                await self.machine.update_tracked_users(state.key_recipients())
        return timeline

    async def _fill_gaps(
        self, joined: Mapping[str, Any], timeline: list[tuple[str, Mapping[str, Any]]]
    ) -> list[tuple[str, Mapping[str, Any]]]:
        """The sync's timeline with each limited room's gap fetched before its events.

        Gaps that could not be fetched whole go to the ``on_gap`` callbacks.
        """
        self._timelines.forget()  # positions a failed sync moved were never committed
        by_room: dict[str, list[Mapping[str, Any]]] = {}
        for room_id, event in timeline:
            by_room.setdefault(room_id, []).append(event)
        filled: list[tuple[str, Mapping[str, Any]]] = []
        for room_id, room in joined.items():
            if not isinstance(room, Mapping):
                continue
            # a limited timeline may bring no events of its own: its gap is still one
            events = by_room.get(room_id, [])
            missing, gap = await self._timelines.fill(room_id, room.get("timeline"), events)
            if gap is not None:
                for callback in self._gap_callbacks:
                    callback(gap)
            filled.extend((room_id, event) for event in missing + events)
            self._timelines.moved(room_id, missing + events)
        return filled

    async def _take_invites_and_leaves(self, rooms: Any) -> None:
        """Report a sync's new invites (and join them with ``auto_join``); forget left rooms."""
        if not isinstance(rooms, Mapping):
            return
        for room_id in _rooms_section(rooms, "leave"):
            self._rooms.pop(room_id, None)
            self._invited.discard(room_id)
            self._timelines.left(room_id)
        for room_id in _rooms_section(rooms, "join"):
            self._invited.discard(room_id)
        for invite in read_invites(rooms.get("invite"), self._session().user_id):
            if invite.room_id in self._invited or invite.room_id in self._rooms:
                continue  # told already, or joined (a repeated sync, a server repeating itself)
            for callback in self._invite_callbacks:
                callback(invite)
            self._invited.add(invite.room_id)  # after the callbacks: one that fails hears again
            if self.auto_join:
                try:
                    await self.join(invite.room_id)
                except (TransportError, RemoteProtocolError) as error:  # the sync goes on
                    log.warning(
                        "could not join %s (invited by %s): %s",
                        invite.room_id,
                        invite.inviter,
                        error,
                    )

    async def _decrypt_timeline(
        self, events: list[tuple[str, Mapping[str, Any]]]
    ) -> tuple[list[tuple[str, Mapping[str, Any]]], set[tuple[str, str]]]:
        """Deliver a sync's timeline in order, each room's encrypted events decrypted in one
        batch (one commit of their message indices, not one per event).

        Returns the events to keep until their key comes (each reported once already)
        and the (room, event ID) of the encrypted events delivered, which leave the
        queue if an earlier copy of the same sync put them there.
        """
        keep: list[tuple[str, Mapping[str, Any]]] = []
        delivered: set[tuple[str, str]] = set()
        for room_id, group in itertools.groupby(events, key=lambda pair: pair[0]):
            batch = [event for _room, event in group]
            encrypted = [e for e in batch if e.get("type") == "m.room.encrypted"]
            results = iter(
                await self._machine().decrypt_room_events(room_id, encrypted) if encrypted else []
            )
            for event in batch:
                if event.get("type") != "m.room.encrypted":
                    self._emit(_plain(room_id, event))
                    continue
                result = next(results)
                if isinstance(result, UnknownRoomKey | RoomKeyWithheld):
                    result.final = False  # kept: delivered if the key comes
                    keep.append((room_id, event))
                self._deliver(room_id, event, result)
                if not isinstance(result, DecryptionError):
                    delivered.add((room_id, result.event_id))
        return keep, delivered

    async def _deliver_waiting(self) -> set[tuple[str, str]]:
        """Deliver or report kept events whose key came or whose wait ended; those settled."""
        settled = set()
        for outcome in await self._machine().retry_waiting_events():
            self._deliver(outcome.room_id, outcome.event, outcome.result)
            if outcome.settles:
                settled.add((outcome.room_id, outcome.event_id))
        return settled

    def _deliver(
        self,
        room_id: str,
        event: Mapping[str, Any],
        result: DecryptedRoomEvent | DecryptionError,
    ) -> None:
        """Emit a decrypted event, report one that is not."""
        if isinstance(result, DecryptionError):
            self._fail(room_id, event, result)
            return
        self._emit(
            RoomEvent(
                room_id,
                result.event_id,
                result.sender,
                result.type,
                result.content,
                True,
                result.verified,
                event,
                result.relation,
                result.relation_mismatch,
                result.trust,
            )
        )

    def _emit(self, event: RoomEvent) -> None:
        for callback in self._room_callbacks:
            callback(event)

    def _fail(self, room_id: str | None, event: Mapping[str, Any], error: DecryptionError) -> None:
        log.warning("could not decrypt %.80r in %s: %s", event.get("event_id"), room_id, error)
        for callback in self._failure_callbacks:
            callback(room_id, event, error)

    # --- syncing ---------------------------------------------------------------------------

    async def sync_once(
        self, *, timeout_ms: int = 0, limit: int | None = None, full_state: bool = False
    ) -> dict[str, Any]:
        """One ``/sync``: its key counts go into the machine, then its requests go out.

        ``limit`` caps each room's timeline (a filter); ``full_state`` asks for every
        joined room's whole state, so that ``rooms`` knows them all (``start`` asks for
        it once).
        """
        self._session()
        params = {"timeout": str(timeout_ms)}
        since = await self.store.get_value(SYNC_TOKEN) if self.store is not None else None
        if since is not None:
            params["since"] = since
        if limit is not None:
            params["filter"] = json.dumps({"room": {"timeline": {"limit": limit}}})
        if full_state:
            params["full_state"] = "true"
        answer = await self._until_stopped(
            self.http.request(
                "GET", f"{CLIENT_V3}/sync", params=params, read_timeout=timeout_ms / 1000 + 30
            )
        )
        if answer is None:  # stop() during the long-poll: nothing was received
            return {}
        # each section checked on its own: a malformed one is left out and logged, the
        # rest of the sync is taken, and the token moves on past it
        sections = SyncSections.read(answer)
        for problem in sections.problems:
            log.warning("the sync answer was partly malformed, left out: %s", problem)
        next_batch = sections.next_batch
        rooms = answer.get("rooms", {})
        joined = _rooms_section(rooms, "join")
        timeline = await self._take_rooms(joined, full=since is None or full_state)
        timeline = await self._fill_gaps(joined, timeline)
        await self._take_invites_and_leaves(rooms)
        if self.machine is not None:
            # a sync retried after a store failure brings back the to-device events it
            # already committed; their Olm messages would not decrypt a second time
            to_device = _not_yet_taken(sections.to_device_events, since, self._taken)
            results = await self.machine.receive_sync_changes(
                # an absent field is no news, not zero: guessing zero would upload more keys
                one_time_key_counts=sections.one_time_key_counts,
                unused_fallback_key_types=sections.unused_fallback_key_types,
                device_lists=sections.device_lists,
                to_device_events=to_device,
            )
            before = self._taken[1] if self._taken[0] == since else frozenset()
            self._taken = (since, before | {_fingerprint(e) for e in to_device})
            self._dispatch_to_device(results)
            settled = await self._deliver_waiting()  # the keys this sync brought, first
            keep, delivered = await self._decrypt_timeline(timeline)
            # only once the timeline reached the callbacks: after a crash the same events
            # come again (harmless: replay checks accept the same event) rather than never;
            # the events still waiting for a key are committed with the token that brought
            # them; through the machine, so the write is fenced by its lease
            if next_batch is not None:
                await self.machine.commit_deliveries(
                    keep=keep,
                    settled=settled | delivered,
                    sync_token=next_batch,
                    values=self._timelines.changes(),
                )
                self._timelines.committed()
            else:
                await self.machine.commit_deliveries(keep=keep, settled=settled | delivered)
        else:
            for room_id, event in timeline:
                self._emit(_plain(room_id, event))
        if self.machine is None and self.store is not None and next_batch is not None:
            values = {SYNC_TOKEN: next_batch, **self._timelines.changes()}
            await self.store.save_changes(Changes(values=values))
            self._timelines.committed()
        if self.machine is not None:
            try:
                await self.process_outgoing()
            except KeyStateError as problem:
                self._report(problem)
        return answer

    async def start(
        self,
        *,
        initial_sync_limit: int = 20,
        timeout_ms: int = 30_000,
        timeline_limit: int | None = None,
    ) -> None:
        """Sync until ``stop()``; it ends for nothing else.

        ``initial_sync_limit`` caps the first sync's timeline per room; ``timeline_limit``
        every later one's (``None``: the server's default, 10 on Synapse). A sync after a
        long pause brings only the last that many events of each room.

        Key problems are logged once; syncing goes on without uploads. While the store
        fails (``StoreError``: its database down, its disk full) it waits with backoff,
        ``STORE_RETRY_FIRST`` doubling up to ``STORE_RETRY_MAX`` seconds, and carries on
        by itself when the store is back: nothing is committed meanwhile, so nothing
        is encrypted or sent, and the sync token stays where it was, so the events of
        the failed sync come again. Any other failure is logged and the loop restarts
        after 5 s.
        """
        self._stop.clear()
        first = True
        store_down = Backoff(STORE_RETRY_FIRST, STORE_RETRY_MAX)
        while not self._stop.is_set():
            try:
                await self.sync_once(
                    timeout_ms=0 if first else timeout_ms,
                    limit=initial_sync_limit if first else timeline_limit,
                    full_state=first,
                )
                first = False
                if store_down.failures:
                    log.warning("the store works again after %d failed syncs", store_down.failures)
                    store_down.succeeded()
            except KeyStateError as problem:
                self._report(problem)
            except StoreError as error:
                metrics.sync_loop_restart("store")
                delay = store_down.failed(time.monotonic())
                log.warning("the store failed (%s); syncing again in %.1f s", error, delay)
                await self._pause(delay)
            except OlmsteadError as error:  # the HTTP layer already retried with backoff
                metrics.sync_loop_restart("error")
                log.warning("sync failed: %s", error)
                await self._pause(5)
            except Exception:  # a bug; one bad sync must not end the loop
                metrics.sync_loop_restart("unexpected")
                log.exception("the sync loop failed unexpectedly; restarting it in 5 s")
                await self._pause(5)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if ``stop()`` comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def stop(self) -> None:
        """End ``start()``: a long-poll in progress is abandoned, processing is finished."""
        self._stop.set()

    async def _until_stopped(self, call: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
        """``call``'s answer, or ``None`` if ``stop()`` came first.

        Only the wait for the server is abandoned; what the machine does with an
        answer always runs to its end.
        """
        request = asyncio.ensure_future(call)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({request, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # our caller was cancelled: so is the long-poll
            request.cancel()
            raise
        finally:
            stopped.cancel()
        if not request.done():
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
            return None
        return request.result()

    async def close(self) -> None:
        self.stop()
        await self.http.close()

    def _dispatch_to_device(self, results: list[Any]) -> None:
        """Hand decrypted to-device events out, report those that could not be."""
        for result in results:
            if isinstance(result, DecryptedToDevice):
                for callback in self._to_device_callbacks:
                    callback(result)
            elif isinstance(result, UndecryptableToDevice):
                self._fail(None, result.event, result.error)

    # --- helpers ---------------------------------------------------------------------------

    def _report(self, problem: OlmsteadError) -> None:
        if problem is not self._reported_problem:
            self._reported_problem = problem
            log.error("key problem: %s", problem)
            for callback in self._problem_callbacks:
                callback(problem)

    def _session(self) -> Session:
        if self.session is None:
            raise LocalProtocolError("not logged in: call login() or restore() first")
        return self.session

    def _machine(self) -> OlmMachine:
        if self.machine is None:
            raise LocalProtocolError("encryption is not set up: call init_crypto() first")
        return self.machine


def _rooms_section(rooms: Any, name: str) -> dict[str, Any]:
    """A sync's ``rooms.join`` or ``rooms.leave``, keyed by valid room IDs only: a room ID
    the spec does not allow is never followed, nor its position stored."""
    section = rooms.get(name) if isinstance(rooms, Mapping) else None
    if not isinstance(section, Mapping):
        return {}
    return {room_id: room for room_id, room in section.items() if is_identifier(room_id, "!")}


def _events(section: Any) -> list[Mapping[str, Any]]:
    events = section.get("events") if isinstance(section, Mapping) else None
    return [e for e in events if isinstance(e, Mapping)] if isinstance(events, list) else []


def _fingerprint(event: Mapping[str, Any]) -> str:
    return json.dumps(event, sort_keys=True, default=str)


def _not_yet_taken(
    events: list[Mapping[str, Any]], since: str | None, taken: tuple[str | None, frozenset[str]]
) -> list[Mapping[str, Any]]:
    """The to-device events not committed already by an earlier try of the same sync."""
    if taken[0] != since or not taken[1]:
        return events
    return [event for event in events if _fingerprint(event) not in taken[1]]


def _plain(room_id: str, event: Mapping[str, Any]) -> RoomEvent:
    content = event.get("content")
    body = dict(content) if isinstance(content, Mapping) else {}
    relation = body.get("m.relates_to")
    return RoomEvent(
        room_id,
        str(event.get("event_id", "")),
        str(event.get("sender", "")),
        str(event.get("type", "")),
        body,
        False,
        False,
        event,
        dict(relation) if isinstance(relation, Mapping) else None,
    )
