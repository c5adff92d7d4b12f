"""olmstead: Matrix end-to-end encryption on vodozemac, with keys that never drift silently.

The public API is what ``__all__`` lists; everything else may change.
"""

from olmstead.client import Client, Session
from olmstead.errors import (
    ConnectionFailed,
    DeviceIdentityConflict,
    DeviceIdInUse,
    KeyStateError,
    LocalProtocolError,
    MatrixHttpError,
    OlmsteadError,
    OneTimeKeyConflict,
    RateLimited,
    RemoteProtocolError,
    StaleKeysRemain,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreLockLost,
    StoreMigrationError,
    StoreMismatch,
    TransportError,
    WrongPickleKey,
)
from olmstead.keys_upload import KeySettings
from olmstead.machine import OlmMachine
from olmstead.requests import (
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    OutgoingRequest,
)
from olmstead.store import (
    Changes,
    CryptoStore,
    LeaseSettings,
    MemoryDatabase,
    MemoryStore,
    PickleKey,
    SqliteStore,
    load_or_create_key_file,
)
from olmstead.upload_guard import OneTimeKeysDrained, UploadPolicy

__all__ = [
    "Changes",
    "Client",
    "ConnectionFailed",
    "CryptoStore",
    "DeviceIdInUse",
    "DeviceIdentityConflict",
    "KeySettings",
    "KeyStateError",
    "KeysClaimRequest",
    "KeysQueryRequest",
    "KeysUploadRequest",
    "LeaseSettings",
    "LocalProtocolError",
    "MatrixHttpError",
    "MemoryDatabase",
    "MemoryStore",
    "OlmMachine",
    "OlmsteadError",
    "OneTimeKeyConflict",
    "OneTimeKeysDrained",
    "OutgoingRequest",
    "PickleKey",
    "RateLimited",
    "RemoteProtocolError",
    "Session",
    "SqliteStore",
    "StaleKeysRemain",
    "StoreCorrupt",
    "StoreError",
    "StoreLockLost",
    "StoreLocked",
    "StoreMigrationError",
    "StoreMismatch",
    "TransportError",
    "UploadPolicy",
    "WrongPickleKey",
    "load_or_create_key_file",
]
