"""Every exception olmstead raises, in one tree.

Catch ``OlmsteadError`` for all of them. Each message says what happened, why
it most likely happened, and what to do next; the structured facts are also
attributes, so tools need not parse messages.

::

    OlmsteadError
    ├── LocalProtocolError        the caller used the API wrongly (a bug in the caller)
    ├── RemoteProtocolError       the server sent something the protocol does not allow
    ├── KeyFileError              a key export file is damaged, or its passphrase is wrong
    ├── AttachmentError           an encrypted file (``EncryptedFile``) cannot be used
    │   ├── AttachmentInfoInvalid   its file info is malformed: no usable url, key, iv or hash
    │   ├── AttachmentKeyInvalid    its key is not a usable AES-256-CTR JWK (a wrong key)
    │   ├── AttachmentVersionUnknown  its ``v`` is not one olmstead reads ("v2")
    │   ├── AttachmentHashMismatch  the downloaded ciphertext's SHA-256 is not the one given
    │   └── AttachmentTruncated     the download ended before the whole file came
    ├── StoreError                the crypto store cannot be used as it is
    │   ├── WrongPickleKey        opened with another pickle key than it was written with
    │   ├── StoreCorrupt          damaged or not an olmstead store; nothing was written
    │   ├── StoreLocked           another process holds the store's writer lease
    │   ├── StoreLockLost         this process lost its lease; it must stop writing
    │   ├── StoreMigrationError   the schema cannot be brought to this version
    │   ├── StoreMismatch         the store belongs to another user or device
    │   ├── StoreUnavailable      the database or disk cannot be used now; try again later
    │   │   ├── StoreConnectionLost   the connection broke or could not be made
    │   │   ├── StoreOutOfConnections the database server has no connection left
    │   │   ├── StoreDiskFull         the disk under the store is full
    │   │   └── StoreReadOnly         the store's file system or database is read-only
    │   ├── StorePoolerRefused    a connection pooler refused prepared statements
    │   └── StoreFileReplaced     the store's file was replaced or removed underneath
    ├── DecryptionError           an event could not be decrypted, or not trusted
    │   ├── MalformedEvent        a field is missing, of the wrong type or out of range
    │   ├── NotForThisDevice      the ciphertext has no part for our Curve25519 key
    │   ├── OlmSessionError       no Olm session decrypts it, nor can one be created
    │   ├── SenderMismatch        the decrypted payload's sender, recipient or keys are wrong
    │   ├── UnknownRoomKey        the room key has not arrived (yet); kept until it does
    │   ├── RoomKeyWithheld       the sender withheld the room key (m.room_key.withheld)
    │   ├── MegolmDecryptionFailed  the room event does not decrypt with its session
    │   ├── ReplayedMessage       a message index seen before with another event
    │   └── InsecureDevice        the sending device is not cross-signed by its owner, and
    │                             the machine refuses such senders (MSC4153)
    ├── KeyStateError             device keys here and on the homeserver disagree
    │   ├── DeviceIdInUse         the device ID holds someone else's identity keys
    │   ├── DeviceIdentityConflict  another identity's one-time keys sit on our device ID
    │   ├── StaleKeysRemain       a drain of our own stale keys did not end within its bound
    │   ├── DeviceUnusable        this device must send nothing encrypted (its ID or keys
    │   │                         are another identity's on the server)
    │   ├── DeviceKeysReplaced    the server now shows another identity's keys for our device
    │   └── OneTimeKeyConflict    (also a MatrixHttpError) the server holds another key
    │                             under one of our key IDs: 400 "… already exists"
    ├── TrustError                our cross-signing identity or secret storage cannot be used
    │   ├── CrossSigningExists    the account already has cross-signing keys: recover them
    │   ├── CrossSigningMissing   no cross-signing keys (here or on the server) for the operation
    │   ├── InvalidRecoveryKey    the text is not a recovery key (a typo: base58, prefix, parity)
    │   ├── SecretStorageMissing  the account has no usable secret storage, or lacks a secret
    │   ├── WrongRecoveryKey      the recovery key does not open the account's secret storage
    │   │   └── WrongPassphrase   the passphrase does not open it
    │   ├── SecretsMismatch       the stored secrets are not the keys the server publishes
    │   ├── InvalidSignature      a cross-signing signature or key object does not check out
    │   └── SignatureUploadFailed the server refused signatures we uploaded, per key
    └── TransportError            a request did not get a usable answer from the homeserver
        ├── ConnectionFailed      no answer at all: refused, dropped, timed out
        └── MatrixHttpError       an error answer, with status, errcode and Retry-After
            ├── RateLimited       429 / M_LIMIT_EXCEEDED
            └── OneTimeKeyConflict  see above

A ``StoreUnavailable`` passes: the client's sync loop waits with backoff and
carries on by itself when the store is back. A write it interrupted may or may
not have landed; the machine reloads its state from the store before it goes on.

Local and remote misuse are told apart as in h11: a ``LocalProtocolError`` is
fixed in the calling code, a ``RemoteProtocolError`` is the server's doing.

No other exception leaves olmstead for any input from a server or a peer:
every value is checked where it enters (``olmstead.boundary``) and every call
into vodozemac goes through ``olmstead.olm.checked``, which turns the binding's
failures, its panics included, into the errors above.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = [
    "AttachmentError",
    "AttachmentHashMismatch",
    "AttachmentInfoInvalid",
    "AttachmentKeyInvalid",
    "AttachmentTruncated",
    "AttachmentVersionUnknown",
    "ConnectionFailed",
    "CrossSigningExists",
    "CrossSigningMissing",
    "DecryptionError",
    "DeviceIdInUse",
    "DeviceIdentityConflict",
    "DeviceKeysReplaced",
    "DeviceUnusable",
    "InsecureDevice",
    "InvalidRecoveryKey",
    "InvalidSignature",
    "KeyFileError",
    "KeyStateError",
    "LocalProtocolError",
    "MalformedEvent",
    "MatrixHttpError",
    "MegolmDecryptionFailed",
    "NotForThisDevice",
    "OlmSessionError",
    "OlmsteadError",
    "OneTimeKeyConflict",
    "RateLimited",
    "RemoteProtocolError",
    "ReplayedMessage",
    "RoomKeyWithheld",
    "SecretStorageMissing",
    "SecretsMismatch",
    "SenderMismatch",
    "SignatureUploadFailed",
    "StaleKeysRemain",
    "StoreConnectionLost",
    "StoreCorrupt",
    "StoreDiskFull",
    "StoreError",
    "StoreFileReplaced",
    "StoreLockLost",
    "StoreLocked",
    "StoreMigrationError",
    "StoreMismatch",
    "StoreOutOfConnections",
    "StorePoolerRefused",
    "StoreReadOnly",
    "StoreUnavailable",
    "TransportError",
    "TrustError",
    "UnknownRoomKey",
    "WrongPassphrase",
    "WrongPickleKey",
    "WrongRecoveryKey",
]


class OlmsteadError(Exception):
    """Base of every olmstead error."""


class LocalProtocolError(OlmsteadError):
    """The caller used olmstead's API in a way it does not allow."""


class RemoteProtocolError(OlmsteadError):
    """The homeserver (or a peer) sent something the Matrix protocol does not allow.

    ``field`` names the value that was wrong (``"device_lists.changed"``,
    ``"one_time_key_counts.signed_curve25519"``, …) where one value was.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class KeyFileError(OlmsteadError):
    """A key export file cannot be read: a wrong passphrase, or a damaged file.

    The file's MAC cannot tell the two apart; the message says which checks failed.
    """


# --- encrypted attachments ----------------------------------------------------------


class AttachmentError(OlmsteadError):
    """An encrypted attachment (the spec's ``EncryptedFile``, "Sending encrypted
    attachments") cannot be decrypted or cannot be trusted. No plaintext was handed
    over as complete, and a download to a file left no file behind."""


class AttachmentInfoInvalid(AttachmentError):
    """The file info is malformed: ``url`` is not an ``mxc://`` URI, or ``iv`` or
    ``hashes.sha256`` is missing, not base64, or of the wrong length. The sender's
    client (or someone in between) sent something the spec does not allow."""


class AttachmentKeyInvalid(AttachmentError):
    """The file's ``key`` is not an AES-256-CTR JSON Web Key olmstead can use: not
    ``kty: oct`` / ``alg: A256CTR``, no ``decrypt`` in ``key_ops``, or ``k`` not 32
    bytes of unpadded base64url. A well-formed key that is simply another file's
    cannot be told apart by the format: AES-CTR carries no check of its own, and the
    SHA-256 covers the ciphertext only."""


class AttachmentVersionUnknown(AttachmentError):
    """The file info's ``v`` is not ``"v2"``, the only version olmstead reads (``v1``
    files used a full 128-bit counter and are not sent by current clients)."""

    def __init__(self, version: object) -> None:
        self.version = version
        super().__init__(
            f"the encrypted file is of version {version!r}, and olmstead reads only 'v2' "
            "(spec: EncryptedFile). Ask the sender to send it again from a current client."
        )


class AttachmentHashMismatch(AttachmentError):
    """The ciphertext's SHA-256 is not the one the file info gives: the media was
    changed on the server or on the way, or the info belongs to another file."""

    def __init__(self, url: str, expected: str, got: str) -> None:
        self.url = url
        self.expected = expected
        self.got = got
        super().__init__(
            f"{url}: the downloaded file's SHA-256 is {got}, but the sender gave {expected}. "
            "It was changed on the server or on the way, or the event points at another "
            "file. Nothing was kept: do not use what was received."
        )


class AttachmentTruncated(AttachmentError):
    """The download ended before the whole file came (fewer bytes than the server
    announced, or the connection closed early)."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        self.detail = detail
        super().__init__(
            f"{url}: the download ended early ({detail}). Nothing was kept; download it again."
        )


# --- store ---------------------------------------------------------------------------


class StoreError(OlmsteadError):
    """The crypto store cannot be used as it is. Nothing in it was changed."""


class WrongPickleKey(StoreError):
    """The store was written with another pickle key than the one given.

    ``expected`` is the fingerprint the store recorded, ``given`` the fingerprint of
    the key passed in. Fingerprints are short digests that reveal nothing usable
    about the key; ``olmstead doctor`` shows the fingerprint of a key you give it.
    """

    def __init__(self, store: str, expected: str, given: str) -> None:
        self.store = store
        self.expected = expected
        self.given = given
        super().__init__(
            f"{store} was written with pickle key {expected}, but was opened with key "
            f"{given}. Nothing was read or written. This happens when a bridge or bot "
            "config changed its pickle key (a migration, a default that changed between "
            "releases, or a generated key that was never saved). Find the key whose "
            f"fingerprint is {expected} and open the store with it. Do not delete the "
            "store: it holds this device's identity, and a new one cannot reuse its device ID."
        )


class StoreCorrupt(StoreError):
    """The store is damaged, truncated, or not an olmstead store at all."""

    def __init__(self, store: str, detail: str) -> None:
        self.store = store
        self.detail = detail
        super().__init__(
            f"{store} is damaged or is not an olmstead crypto store ({detail}). Nothing "
            "was written to it. The pickle key is not the problem. Restore the file from "
            "a backup, or keep a copy for diagnosis before creating a new device."
        )


class StoreLocked(StoreError):
    """Another process holds the store's writer lease and did not let go in time."""

    def __init__(self, store: str, holder: str, since: float, expires: float) -> None:
        self.store = store
        self.holder = holder
        self.since = since
        self.expires = expires
        super().__init__(
            f"{store} is in use by {holder} since {_when(since)} (lease renewed until "
            f"{_when(expires)}). One device has one writer: two processes driving the "
            "same device would upload conflicting keys. Stop the other process, or wait "
            "for it to exit; a process that died releases the lock when its lease expires."
        )


class StoreLockLost(StoreError):
    """This process's writer lease expired and another holder may have written."""

    def __init__(self, store: str, detail: str) -> None:
        self.store = store
        self.detail = detail
        super().__init__(
            f"the writer lease on {store} was lost ({detail}). This process was paused or "
            "blocked for longer than the lease; the write was refused so the two writers "
            "do not overwrite each other. Nothing was written. Retry the operation: the "
            "machine reloads its state from the store first."
        )


class StoreMigrationError(StoreError):
    """The store's schema cannot be brought to the version this olmstead needs."""


class StoreMismatch(StoreError):
    """The store holds the account of another user or device than the one asked for."""

    def __init__(self, store: str, stored: tuple[str, str], asked: tuple[str, str]) -> None:
        self.store = store
        self.stored = stored
        self.asked = asked
        super().__init__(
            f"{store} holds the keys of {stored[0]} device {stored[1]}, not of {asked[0]} "
            f"device {asked[1]}. Using it would upload one device's keys for another. Open "
            "the store that belongs to this device, or use a new store for a new device."
        )


class StoreUnavailable(StoreError):
    """The store's database or disk cannot be used just now; it may well come back.

    ``store`` names the store, ``reason`` says what happened in a few words
    ("the server terminated the connection", "the disk is full") and ``detail`` is
    the driver's or the operating system's own message. A read that failed changed
    nothing. A write that failed before its commit changed nothing; one cut off
    during its commit may have landed or not, so the machine reloads its state from
    the store before its next operation. Retry later: ``Client.start`` waits with
    backoff and carries on by itself.
    """

    advice = "olmstead retries with backoff; nothing needs to be done if it comes back."

    def __init__(self, store: str, reason: str, detail: str) -> None:
        self.store = store
        self.reason = reason
        self.detail = detail
        super().__init__(f"{store}: {reason} ({detail}). {self.advice}")


class StoreConnectionLost(StoreUnavailable):
    """The connection to the database broke, or no new one could be made.

    Terminated by the server (``pg_terminate_backend``, a restart, a shutdown), a
    failover, a proxy's idle timeout, or the server not reachable at all.
    """

    advice = (
        "A database restart or failover does this; olmstead reconnects and retries with "
        "backoff. If it lasts, check that the server is running and the DSN is right."
    )


class StoreOutOfConnections(StoreUnavailable):
    """The database server refused a connection: it has none left (``max_connections``)."""

    advice = (
        "Each PostgresStore.open makes its own pool; with many accounts in one process, "
        "open them on one shared pool instead (PostgresDatabase.open(dsn, pool_size=…) and "
        "database.open_store(key, account=…)), or put a pooler such as pgbouncer in front, "
        "or raise the server's max_connections."
    )


class StoreDiskFull(StoreUnavailable):
    """The disk (or the database server's disk) under the store is full."""

    advice = (
        "Nothing was written: the store is as it was before this write. Free some space; "
        "olmstead retries with backoff. Do not delete the store or its -wal file."
    )


class StoreReadOnly(StoreUnavailable):
    """The store's file system, file or database accepts no writes (a read-only mount,
    file permissions, a standby promoted the wrong way round after a failover)."""

    advice = (
        "Nothing was written. Make the store writable again (remount, permissions, point "
        "the DSN at the primary); olmstead retries with backoff."
    )


class StorePoolerRefused(StoreError):
    """A connection pooler between olmstead and PostgreSQL refused prepared statements.

    pgbouncer in transaction or statement pooling mode (before 1.21, or with
    ``max_prepared_statements = 0``) hands each transaction another server
    connection, where a named prepared statement does not exist. olmstead's own
    pools never prepare named statements; a pool made elsewhere may.
    """

    def __init__(self, store: str, detail: str) -> None:
        self.store = store
        self.detail = detail
        super().__init__(
            f"{store}: a connection pooler (pgbouncer in transaction mode, most likely) "
            f"refused a prepared statement ({detail}). Open the store with a DSN or a "
            "PostgresDatabase, whose pools prepare no named statements; if you pass your own "
            "asyncpg pool, create it with statement_cache_size=0; or set pgbouncer's "
            "max_prepared_statements (1.21 and later), or use pool_mode = session."
        )


class StoreFileReplaced(StoreError):
    """The store's file was removed, moved or replaced while the store was open.

    Writes would go to a file nobody will open again. Nothing was written; close
    the store, find out who replaced it (a restore from backup, a deploy that copies
    files, a cleanup job) and open the right file again.
    """

    def __init__(self, store: str, detail: str) -> None:
        self.store = store
        self.detail = detail
        super().__init__(
            f"{store} was replaced or removed while open ({detail}). Nothing was written; "
            "writes would be lost with the old file. Stop this process, find out what "
            "replaced the file (a restore from backup rolls the keys back), and open the "
            "store again."
        )


# --- decryption ---------------------------------------------------------------------


class DecryptionError(OlmsteadError):
    """An encrypted event could not be decrypted, or its content cannot be trusted.

    ``sender`` is the Matrix user the event came from and ``sender_key`` the
    Curve25519 key of the sending device, where the event names them.

    ``final`` is ``False`` when the client reports a room event it keeps waiting
    for its key (``UnknownRoomKey``, ``RoomKeyWithheld``): the event may still be
    delivered, or reported once more with ``final`` set when the wait ends.
    """

    def __init__(
        self,
        message: str,
        sender: str | None = None,
        sender_key: str | None = None,
        *,
        final: bool = True,
    ):
        self.sender = sender
        self.sender_key = sender_key
        self.final = final
        super().__init__(message)


class MalformedEvent(DecryptionError):
    """The event is not what the protocol allows: a field is missing, of the wrong type,
    out of range, not base64, or a key of the wrong length. ``field`` names it.

    Nothing was recorded for it, and no new Olm session is asked for: the sender's
    session is not broken, the event is.
    """

    def __init__(
        self,
        message: str,
        sender: str | None = None,
        sender_key: str | None = None,
        field: str | None = None,
    ) -> None:
        self.field = field
        super().__init__(message, sender, sender_key)


class NotForThisDevice(DecryptionError):
    """The event was encrypted for other devices only."""


class OlmSessionError(DecryptionError):
    """No Olm session with the sender decrypts the message, and none could be created.

    Usually the sender's session is wedged (a store rolled back on either side) or
    the one-time key it used is gone; olmstead asks the sender for a new session.
    """


class SenderMismatch(DecryptionError):
    """The decrypted payload names another sender, recipient or key than it should."""


class UnknownRoomKey(DecryptionError):
    """We hold no key for the room event's Megolm session (yet).

    The key may still be on its way (to-device messages can lag the room event),
    or the sender did not give it to this device. ``session_id`` names it.
    """

    def __init__(
        self, message: str, sender: str | None, session_id: str, *, final: bool = True
    ) -> None:
        self.session_id = session_id
        super().__init__(message, sender, final=final)


class RoomKeyWithheld(DecryptionError):
    """The sending device told us it will not give us the room key (``m.room_key.withheld``).

    ``code`` is the spec's reason code: ``m.blacklisted`` (it blocked our device),
    ``m.unverified`` (it shares only with verified devices: have our device
    verified, or cross-signed), ``m.unauthorised`` (we may not see the event, e.g.
    sent before we joined), ``m.unavailable`` (it does not have the key), or
    ``m.no_olm`` (it could not open an Olm session with our device: our one-time
    keys ran out, or it could not fetch them). ``reason`` is the sender's text.
    A real key that arrives later still decrypts the event. Spec: "Reporting that
    decryption keys are withheld" (MSC2399).
    """

    def __init__(
        self,
        message: str,
        sender: str | None,
        session_id: str,
        code: str,
        reason: str,
        *,
        final: bool = True,
    ) -> None:
        self.session_id = session_id
        self.code = code
        self.reason = reason
        super().__init__(message, sender, final=final)


class MegolmDecryptionFailed(DecryptionError):
    """The room event does not decrypt with its session: tampered, or before our first index."""


class ReplayedMessage(DecryptionError):
    """A Megolm message index came back with another event ID or timestamp: a replay."""


class InsecureDevice(DecryptionError):
    """The event decrypted, but its sending device is not cross-signed by its owner.

    Raised only when the machine refuses such senders (``OlmMachine.only_cross_signed_senders``,
    the spec's "exclude insecure devices", MSC4153). ``trust`` is the device's
    ``TrustLevel`` value (``not_signed``, ``owner_has_no_identity`` or ``unknown_device``).
    The sender's owner can fix it by cross-signing the device (verifying it from another
    of their devices).
    """

    def __init__(self, message: str, sender: str | None, sender_key: str | None, trust: str):
        self.trust = trust
        super().__init__(message, sender, sender_key)


# --- keys here against keys on the server ----------------------------------------------


class KeyStateError(OlmsteadError):
    """The keys on this device and on the homeserver disagree."""


class DeviceIdInUse(KeyStateError):
    """The homeserver holds identity keys for this device ID that are not ours."""

    def __init__(self, user_id: str, device_id: str, server_ed25519: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.server_ed25519 = server_ed25519
        super().__init__(
            f"device {device_id} of {user_id} already has identity keys on the server "
            f"(ed25519 {server_ed25519}) that are not this store's. Another client lives "
            "on this device, or the device ID was reused after its store was lost. Nothing "
            "was uploaded. Log in without a device ID to get a new device, or delete the "
            "old device first; replacing its keys breaks it for everyone who verified it."
        )


class StaleKeysRemain(KeyStateError):
    """Draining our own stale one-time keys from the server did not finish."""

    def __init__(self, user_id: str, device_id: str, drained: int) -> None:
        self.drained = drained
        super().__init__(
            f"drained {drained} stale one-time keys of {user_id} device {device_id} and the "
            "server still hands out more; uploads stopped. The server holds far more keys than "
            "a device may. Run `olmstead doctor`, or log in as a new device."
        )


class DeviceUnusable(KeyStateError):
    """This device must send nothing encrypted: its device ID was refused
    (``DeviceIdInUse``), another identity's keys sit on it (``DeviceIdentityConflict``),
    or another client replaced its keys on the server (``DeviceKeysReplaced``).

    Recipients see the server's keys for this device ID, not ours: what we encrypted
    would be refused, or worse, trusted under another identity. ``cause`` is the key
    problem found earlier.
    """

    def __init__(self, user_id: str, device_id: str, cause: KeyStateError) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.cause = cause
        super().__init__(
            f"device {device_id} of {user_id} sends nothing encrypted: its keys on the "
            f"server are not this store's ({type(cause).__name__}). Nothing was sent. Log "
            "in as a new device (`olmstead repair` moves the store to one), then send "
            f"again. What was found: {cause}"
        )


class DeviceIdentityConflict(KeyStateError):
    """One-time keys signed by another identity sit on our device ID."""

    def __init__(self, user_id: str, device_id: str, signer: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.signer = signer
        super().__init__(
            f"device {device_id} of {user_id} holds one-time keys signed by ed25519 "
            f"{signer}, which is not this store's identity. Another client shares this "
            "device (the same access token with its own store), or the store was lost and "
            "replaced. Uploads stopped. Run `olmstead doctor`, then log in as a new device."
        )


class DeviceKeysReplaced(KeyStateError):
    """The server's keys for our device ID are no longer ours: another client replaced them."""

    def __init__(self, user_id: str, device_id: str, server_ed25519: str | None) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.server_ed25519 = server_ed25519
        shown = f"ed25519 {server_ed25519}" if server_ed25519 else "no keys at all"
        super().__init__(
            f"the homeserver now shows {shown} for device {device_id} of {user_id}, not this "
            "store's identity keys. Another client uploaded its own keys over ours (the same "
            "access token with another store), or the device was deleted. Other users' "
            "clients will now encrypt for that identity, not for us. Uploads stopped. Stop "
            "the other client, run `olmstead doctor`, then log in as a new device."
        )


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- trust: cross-signing and secret storage ---------------------------------------------


class TrustError(OlmsteadError):
    """Our cross-signing identity or secret storage cannot be used as asked. Nothing was sent."""


class CrossSigningExists(TrustError):
    """The account already has a master key on the server that this store does not hold."""

    def __init__(self, user_id: str, master_key: str) -> None:
        self.user_id = user_id
        self.master_key = master_key
        super().__init__(
            f"{user_id} already has a cross-signing master key on the server ({master_key}). "
            "Making new keys would reset the account's identity, and everyone who verified "
            "it would be warned. Nothing was sent. Recover the existing keys with the "
            "recovery key (`olmstead trust recover`), or reset the identity from a client "
            "that holds them."
        )


class CrossSigningMissing(TrustError):
    """The operation needs cross-signing keys that this store (or the server) does not hold."""


class InvalidRecoveryKey(TrustError):
    """The text given is not a recovery key at all; ``detail`` says which check failed."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(
            f"this is not a recovery key: {detail}. Recovery keys are 48 base58 characters "
            'starting with "Es", usually written in groups of four; check for a mistyped '
            "or missing character. Nothing was read or sent."
        )


class SecretStorageMissing(TrustError):
    """The account has no secret storage we can read, or it lacks a secret we need."""


class WrongRecoveryKey(TrustError):
    """The recovery key is well formed but is not the key of the account's secret storage."""

    def __init__(self, key_id: str, what: str = "recovery key") -> None:
        self.key_id = key_id
        super().__init__(
            f"the {what} does not open the secret storage key {key_id!r} of this account "
            "(its MAC check fails). Nothing was stored or sent. Use the recovery key shown "
            "when cross-signing was set up for this account; a key from another account or "
            "from before a reset does not fit."
        )


class WrongPassphrase(WrongRecoveryKey):
    """The passphrase does not give the key of the account's secret storage."""

    def __init__(self, key_id: str) -> None:
        super().__init__(key_id, "passphrase")


class SecretsMismatch(TrustError):
    """A secret decrypted, but it is not the private half of the key the server publishes."""

    def __init__(self, user_id: str, names: list[str]) -> None:
        self.user_id = user_id
        self.names = names
        super().__init__(
            f"the secret storage of {user_id} holds {', '.join(names)} keys that do not match "
            "the public keys the server publishes: the identity was reset without updating "
            "secret storage, or the server's answer was tampered with. Nothing was stored or "
            "sent. Reset cross-signing from a client that holds the current keys."
        )


class InvalidSignature(TrustError):
    """A cross-signing key object or signature is malformed or does not verify."""


class SignatureUploadFailed(TrustError):
    """``POST /keys/signatures/upload`` answered with ``failures`` for some keys.

    ``failures`` is the server's map: user ID -> key ID -> ``{"errcode", "error"}``.
    The signatures it accepted are in place; the refused ones are not retried (the
    same bytes would be refused again).
    """

    def __init__(self, failures: dict[str, dict[str, object]]) -> None:
        self.failures = failures
        listed = "; ".join(
            f"{user} {key}: {detail}"
            for user, keys in failures.items()
            for key, detail in keys.items()
        )
        super().__init__(
            f"the homeserver refused signatures: {listed}. Run `olmstead trust status` to "
            "see which keys are signed."
        )


# --- the homeserver's answers ----------------------------------------------------------


class TransportError(OlmsteadError):
    """A request to the homeserver got no usable answer."""


class ConnectionFailed(TransportError):
    """The homeserver did not answer: connection refused, dropped, or timed out."""

    def __init__(self, method: str, path: str, detail: str) -> None:
        self.method = method
        self.path = path
        super().__init__(
            f"{method} {path}: no answer from the homeserver ({detail}). It may be "
            "restarting or unreachable; the request is retried with backoff."
        )


class MatrixHttpError(TransportError):
    """The homeserver answered with an error status."""

    def __init__(
        self,
        method: str,
        path: str,
        status: int,
        errcode: str | None,
        error: str,
        retry_after: float | None = None,
        body: object = None,
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.errcode = errcode
        self.error = error
        self.retry_after = retry_after
        self.body = body
        super().__init__(f"{method} {path}: {status} {errcode or ''} {error}".rstrip())


class RateLimited(MatrixHttpError):
    """The homeserver asked us to slow down (429); ``retry_after`` says for how long."""


class OneTimeKeyConflict(MatrixHttpError, KeyStateError):
    """400 ``One time key <id> already exists``: another key sits under one of our IDs.

    ``key_id`` is the first colliding ID the server named and ``old_key`` the key it
    holds, with its signatures, when its message quotes it (Synapse does). Whose key
    it is — ours from before a rollback, or another identity's — its signature says;
    the machine decides that and repairs or stops.
    """

    def __init__(
        self,
        method: str,
        path: str,
        status: int,
        errcode: str | None,
        error: str,
        key_id: str | None,
        old_key: dict[str, object] | None,
        body: object = None,
    ) -> None:
        super().__init__(method, path, status, errcode, error, None, body)
        self.key_id = key_id
        self.old_key = old_key
