"""olmstead: Matrix end-to-end encryption on vodozemac, with keys that never drift silently.

The public API is what ``__all__`` lists; everything else may change.
``olmstead.PostgresStore`` and ``olmstead.PostgresDatabase`` are imported on first
use, so asyncpg is needed only by those who use them (the ``postgres`` extra); they
are left out of ``__all__`` so that ``from olmstead import *`` works without it.
"""

from typing import TYPE_CHECKING, Any

from olmstead.attachments import EncryptedFile, file_content
from olmstead.client import Client, Session
from olmstead.client.client import CrossSigningSettings
from olmstead.client.gaps import TimelineGap
from olmstead.client.invites import Invite
from olmstead.client.rooms import Room, RoomEvent
from olmstead.cross_signing import CrossSigningStatus, OwnIdentity, published_identity
from olmstead.delivery import DeliverySettings, WaitingResult
from olmstead.errors import (
    AttachmentError,
    AttachmentHashMismatch,
    AttachmentInfoInvalid,
    AttachmentKeyInvalid,
    AttachmentTruncated,
    AttachmentVersionUnknown,
    ConnectionFailed,
    CrossSigningExists,
    CrossSigningMissing,
    DecryptionError,
    DeviceIdentityConflict,
    DeviceIdInUse,
    DeviceKeysReplaced,
    DeviceUnusable,
    InsecureDevice,
    InvalidRecoveryKey,
    InvalidSignature,
    KeyFileError,
    KeyStateError,
    LocalProtocolError,
    MalformedEvent,
    MatrixHttpError,
    MegolmDecryptionFailed,
    NotForThisDevice,
    OlmSessionError,
    OlmsteadError,
    OneTimeKeyConflict,
    RateLimited,
    RemoteProtocolError,
    ReplayedMessage,
    RoomKeyWithheld,
    SecretsMismatch,
    SecretStorageMissing,
    SenderMismatch,
    SignatureUploadFailed,
    StaleKeysRemain,
    StoreConnectionLost,
    StoreCorrupt,
    StoreDiskFull,
    StoreError,
    StoreFileReplaced,
    StoreLocked,
    StoreLockLost,
    StoreMigrationError,
    StoreMismatch,
    StoreOutOfConnections,
    StorePoolerRefused,
    StoreReadOnly,
    StoreUnavailable,
    TransportError,
    TrustError,
    UnknownRoomKey,
    WrongPassphrase,
    WrongPickleKey,
    WrongRecoveryKey,
)
from olmstead.http.transport import RetryPolicy
from olmstead.identities.device import Device
from olmstead.identities.trust import SharingStrategy, TrustLevel
from olmstead.identities.user_identity import CrossSigningKey, IdentityChanged, UserIdentity
from olmstead.keys_upload import KeySettings
from olmstead.machine import OlmMachine, UndecryptableToDevice
from olmstead.metrics import Metrics, PrometheusMetrics
from olmstead.requests import (
    AccountDataRequest,
    DeviceSigningUploadRequest,
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    OutgoingRequest,
    SignaturesUploadRequest,
    ToDeviceRequest,
)
from olmstead.sessions.group_sessions import DecryptedRoomEvent, RoomSettings
from olmstead.sessions.olm_sessions import DecryptedToDevice
from olmstead.store import (
    AccountRecord,
    Changes,
    CryptoStore,
    LeaseSettings,
    MemoryDatabase,
    MemoryStore,
    PickleKey,
    SqliteStore,
    load_or_create_key_file,
)
from olmstead.store.base import (
    InboundGroupSessionRecord,
    OutboxEntry,
    WaitingRoomEvent,
    WithheldRecord,
)
from olmstead.upload_guard import OneTimeKeysDrained, UploadPolicy

if TYPE_CHECKING:
    from olmstead.store.postgres import PostgresDatabase as PostgresDatabase
    from olmstead.store.postgres import PostgresStore as PostgresStore


def __getattr__(name: str) -> Any:
    if name in ("PostgresStore", "PostgresDatabase"):
        from olmstead.store import postgres

        return getattr(postgres, name)
    raise AttributeError(f"module 'olmstead' has no attribute {name!r}")


__all__ = [
    "AccountDataRequest",
    "AccountRecord",
    "AttachmentError",
    "AttachmentHashMismatch",
    "AttachmentInfoInvalid",
    "AttachmentKeyInvalid",
    "AttachmentTruncated",
    "AttachmentVersionUnknown",
    "Changes",
    "Client",
    "ConnectionFailed",
    "CrossSigningExists",
    "CrossSigningKey",
    "CrossSigningMissing",
    "CrossSigningSettings",
    "CrossSigningStatus",
    "CryptoStore",
    "DecryptedRoomEvent",
    "DecryptedToDevice",
    "DecryptionError",
    "DeliverySettings",
    "Device",
    "DeviceIdInUse",
    "DeviceIdentityConflict",
    "DeviceKeysReplaced",
    "DeviceSigningUploadRequest",
    "DeviceUnusable",
    "EncryptedFile",
    "IdentityChanged",
    "InboundGroupSessionRecord",
    "InsecureDevice",
    "InvalidRecoveryKey",
    "InvalidSignature",
    "Invite",
    "KeyFileError",
    "KeySettings",
    "KeyStateError",
    "KeysClaimRequest",
    "KeysQueryRequest",
    "KeysUploadRequest",
    "LeaseSettings",
    "LocalProtocolError",
    "MalformedEvent",
    "MatrixHttpError",
    "MegolmDecryptionFailed",
    "MemoryDatabase",
    "MemoryStore",
    "Metrics",
    "NotForThisDevice",
    "OlmMachine",
    "OlmSessionError",
    "OlmsteadError",
    "OneTimeKeyConflict",
    "OneTimeKeysDrained",
    "OutboxEntry",
    "OutgoingRequest",
    "OwnIdentity",
    "PickleKey",
    "PrometheusMetrics",
    "RateLimited",
    "RemoteProtocolError",
    "ReplayedMessage",
    "RetryPolicy",
    "Room",
    "RoomEvent",
    "RoomKeyWithheld",
    "RoomSettings",
    "SecretStorageMissing",
    "SecretsMismatch",
    "SenderMismatch",
    "Session",
    "SharingStrategy",
    "SignatureUploadFailed",
    "SignaturesUploadRequest",
    "SqliteStore",
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
    "TimelineGap",
    "ToDeviceRequest",
    "TransportError",
    "TrustError",
    "TrustLevel",
    "UndecryptableToDevice",
    "UnknownRoomKey",
    "UploadPolicy",
    "UserIdentity",
    "WaitingResult",
    "WaitingRoomEvent",
    "WithheldRecord",
    "WrongPassphrase",
    "WrongPickleKey",
    "WrongRecoveryKey",
    "file_content",
    "load_or_create_key_file",
    "published_identity",
]
