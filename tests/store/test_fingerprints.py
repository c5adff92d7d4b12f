"""A pickle key's fingerprint is the same on every store and across rekeys; the key check
stays salted; stores whose check predates this keep opening."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from pathlib import Path

import pytest

from olmstead import MemoryDatabase, MemoryStore, PickleKey, SqliteStore, WrongPickleKey
from olmstead.store.pickle_key import fingerprint
from tests.conftest import FAST_LEASE

TEXT, OTHER = "the operator's key", "another key"


async def sqlite_fingerprint(path: Path, key: PickleKey) -> str:
    store = await SqliteStore.open(path, key, lease=FAST_LEASE)
    try:
        return store.fingerprint
    finally:
        await store.close()


@pytest.mark.parametrize("secret", [TEXT, b"r" * 32], ids=["string", "raw"])
async def test_one_key_one_fingerprint_on_every_store(tmp_path: Path, secret: str | bytes) -> None:
    first = await sqlite_fingerprint(tmp_path / "a.db", PickleKey(secret))
    second = await sqlite_fingerprint(tmp_path / "b.db", PickleKey(secret))
    memory = await MemoryStore.open(PickleKey(secret), MemoryDatabase(), lease=FAST_LEASE)
    assert first == second == memory.fingerprint == PickleKey(secret).fingerprint()
    # and again when the stores are opened later
    assert await sqlite_fingerprint(tmp_path / "a.db", PickleKey(secret)) == first
    assert first != PickleKey(OTHER).fingerprint()


async def test_a_rekey_to_a_key_shows_that_key_s_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    before = await sqlite_fingerprint(path, PickleKey(TEXT))
    store = await SqliteStore.open(path, PickleKey(TEXT), lease=FAST_LEASE)
    try:
        moved = await store.rekey(PickleKey(OTHER))
        assert moved == PickleKey(OTHER).fingerprint()
        assert await store.rekey(PickleKey(TEXT)) == before  # back: the same as at first
    finally:
        await store.close()
    assert await sqlite_fingerprint(path, PickleKey(TEXT)) == before


async def test_a_wrong_key_names_both_keys_fingerprints(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await sqlite_fingerprint(path, PickleKey(TEXT))
    with pytest.raises(WrongPickleKey) as caught:
        await SqliteStore.open(path, PickleKey(OTHER), lease=FAST_LEASE)
    assert caught.value.expected == PickleKey(TEXT).fingerprint()
    assert caught.value.given == PickleKey(OTHER).fingerprint()


async def test_the_key_check_stays_salted() -> None:
    one, two = MemoryDatabase(), MemoryDatabase()
    await MemoryStore.open(PickleKey(TEXT), one, lease=FAST_LEASE)
    await MemoryStore.open(PickleKey(TEXT), two, lease=FAST_LEASE)
    assert one.key_check is not None
    assert two.key_check is not None
    first, second = json.loads(one.key_check), json.loads(two.key_check)
    assert first["fingerprint"] == second["fingerprint"]
    assert first["salt"] != second["salt"]
    assert first["check"] != second["check"]  # what proves the key is per store
    assert first["check"] != first["fingerprint"]


def version_1_record(secret: str) -> str:
    """A key check as olmstead wrote it before version 2 (salted digest as fingerprint)."""
    key = PickleKey(secret)
    params = {"kdf": "scrypt", "n": 2**15, "r": 8, "p": 1}
    params["salt"] = base64.b64encode(secrets.token_bytes(16)).decode()
    record = {**params, "fingerprint": fingerprint(key._derive_key(params))}
    body = json.dumps(record, sort_keys=True).encode()
    record["checksum"] = hashlib.sha256(body).hexdigest()
    return json.dumps(record, sort_keys=True)


async def test_a_store_with_a_version_1_key_check_keeps_opening() -> None:
    db = MemoryDatabase()
    db.key_check = version_1_record(TEXT)
    store = await MemoryStore.open(PickleKey(TEXT), db, lease=FAST_LEASE)
    assert store.fingerprint == PickleKey(TEXT).fingerprint()
    with pytest.raises(WrongPickleKey) as caught:
        await MemoryStore.open(PickleKey(OTHER), db, lease=FAST_LEASE)
    assert "this store's own check" in caught.value.expected
    assert caught.value.given == PickleKey(OTHER).fingerprint()
    # a rekey writes the new record: from then on the fingerprint is named
    await store.rekey(PickleKey(TEXT))
    with pytest.raises(WrongPickleKey) as again:
        await MemoryStore.open(PickleKey(OTHER), db, lease=FAST_LEASE)
    assert again.value.expected == PickleKey(TEXT).fingerprint()
