"""olmstead: Matrix end-to-end encryption on vodozemac, with keys that never drift silently.

The public API is what ``__all__`` lists; everything else may change.
"""

from olmstead.errors import (
    DeviceIdentityConflict,
    DeviceIdInUse,
    KeyStateError,
    LocalProtocolError,
    OlmsteadError,
    OneTimeKeyConflict,
    RemoteProtocolError,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreLockLost,
    StoreMigrationError,
    StoreMismatch,
    WrongPickleKey,
)
from olmstead.keys_upload import KeySettings
from olmstead.machine import OlmMachine
from olmstead.requests import KeysUploadRequest, OutgoingRequest
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

__all__ = [
    "Changes",
    "CryptoStore",
    "DeviceIdInUse",
    "DeviceIdentityConflict",
    "KeySettings",
    "KeyStateError",
    "KeysUploadRequest",
    "LeaseSettings",
    "LocalProtocolError",
    "MemoryDatabase",
    "MemoryStore",
    "OlmMachine",
    "OlmsteadError",
    "OneTimeKeyConflict",
    "OutgoingRequest",
    "PickleKey",
    "RemoteProtocolError",
    "SqliteStore",
    "StoreCorrupt",
    "StoreError",
    "StoreLockLost",
    "StoreLocked",
    "StoreMigrationError",
    "StoreMismatch",
    "WrongPickleKey",
    "load_or_create_key_file",
]
