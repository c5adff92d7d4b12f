"""Crypto stores: one interface (``CryptoStore``), one write call (``save_changes``).

Backends: ``MemoryStore`` and ``SqliteStore``. Pickle keys: ``PickleKey``.
"""

from olmstead.store.base import AccountRecord, Changes, CryptoStore, LeaseSettings
from olmstead.store.memory import MemoryDatabase, MemoryStore
from olmstead.store.pickle_key import PickleKey, load_or_create_key_file
from olmstead.store.sqlite import SqliteStore

__all__ = [
    "AccountRecord",
    "Changes",
    "CryptoStore",
    "LeaseSettings",
    "MemoryDatabase",
    "MemoryStore",
    "PickleKey",
    "SqliteStore",
    "load_or_create_key_file",
]
