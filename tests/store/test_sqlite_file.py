"""The SQLite file itself: a wrong key or a damaged file is refused without writing."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from olmstead import (
    Changes,
    OlmMachine,
    SqliteStore,
    StoreCorrupt,
    StoreMigrationError,
    WrongPickleKey,
)
from olmstead.store.migrations.sqlite import MIGRATIONS
from olmstead.store.sqlite import _apply_one
from tests.conftest import FAST_LEASE, KEY, OTHER_KEY


async def make_store(path: Path) -> str:
    """A closed store holding a device that has one pending upload; its ed25519 key."""
    store = await SqliteStore.open(path, KEY, lease=FAST_LEASE)
    machine = await OlmMachine.open(store, "@bot:example.org", "BOT")
    await machine.outgoing_requests()
    ed25519 = machine.identity_keys["ed25519"]
    await store.close()
    return ed25519


async def open_device(path: Path) -> None:
    store = await SqliteStore.open(path, KEY, lease=FAST_LEASE)
    try:
        await OlmMachine.open(store, "@bot:example.org", "BOT")
    finally:
        await store.close()


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


async def test_wrong_key_leaves_the_file_byte_for_byte_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "crypto.db"
    await make_store(path)
    before = snapshot(tmp_path)
    assert list(before) == ["crypto.db"]  # closed cleanly: no -wal or -shm left behind

    with pytest.raises(WrongPickleKey) as caught:
        await SqliteStore.open(path, OTHER_KEY, lease=FAST_LEASE)
    assert str(path) in str(caught.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "damage",
    ["truncated", "zeroed_header", "empty", "garbage", "key_check_flipped", "pickle_flipped"],
)
async def test_damaged_file_is_corrupt_not_wrong_key(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "crypto.db"
    await make_store(path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "zeroed_header":
        data[:100] = bytes(100)
    elif damage == "empty":
        data = bytearray()
    elif damage == "garbage":
        data = bytearray(b"this is not a database\n" * 200)
    else:
        column = "value FROM meta" if damage == "key_check_flipped" else "pickle FROM account"
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            (text,) = conn.execute(f"SELECT {column}").fetchone()
        # a fragment from the middle: long values spill over SQLite pages
        fragment = text[len(text) // 2 : len(text) // 2 + 24].encode()
        target = data.index(fragment) + 12
        data[target] = ord("A") if data[target] != ord("A") else ord("B")
    path.write_bytes(bytes(data))
    before = snapshot(tmp_path)

    with pytest.raises(StoreCorrupt) as caught:
        await open_device(path)
    assert "pickle key is not the problem" in str(caught.value)
    assert snapshot(tmp_path) == before  # found before the lease or a migration wrote


async def test_a_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mautrix.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE crypto_account (account_id TEXT)")
    before = snapshot(tmp_path)
    with pytest.raises(StoreCorrupt, match="not an olmstead store"):
        await SqliteStore.open(path, KEY, lease=FAST_LEASE)
    assert snapshot(tmp_path) == before


async def test_version_1_store_migrates_and_keeps_its_account(tmp_path: Path) -> None:
    path = tmp_path / "crypto.db"
    ed25519 = await make_store(path)
    # turn it back into what version 1 wrote: drop what later migrations created
    later_tables = [
        t for _n, _d, sql in MIGRATIONS[1:] for t in re.findall(r"CREATE TABLE (\w+)", sql)
    ]
    assert "kv" in later_tables
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for table in later_tables:
            conn.execute(f"DROP TABLE {table}")
        conn.execute("PRAGMA user_version = 1")

    store = await SqliteStore.open(path, KEY, lease=FAST_LEASE)
    machine = await OlmMachine.open(store, "@bot:example.org", "BOT")
    assert machine.identity_keys["ed25519"] == ed25519
    await store.save_changes(Changes(values={"sync_token": "s42"}))  # the v2 table works
    assert await store.get_value("sync_token") == "s42"
    await store.close()
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == MIGRATIONS[-1][0]


def test_migrations_are_numbered_upwards_from_one() -> None:
    # numbers are handed out per change, so a gap (another branch's step) is allowed
    numbers = [number for number, _d, _s in MIGRATIONS]
    assert numbers[0] == 1
    assert numbers == sorted(set(numbers))


def test_each_migration_applies_to_the_schema_before_it(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "steps.db", isolation_level=None)
    for number, _description, _sql in MIGRATIONS:
        _apply_one(conn, number)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == number
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "account", "lease_lock", "kv", "devices", "tracked_users"} <= tables


async def test_a_store_from_a_newer_olmstead_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "crypto.db"
    await make_store(path)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA user_version = {MIGRATIONS[-1][0] + 1}")
    before = snapshot(tmp_path)
    with pytest.raises(StoreMigrationError, match="newer"):
        await SqliteStore.open(path, KEY, lease=FAST_LEASE)
    assert snapshot(tmp_path) == before


def test_disk_trouble_is_not_called_corruption() -> None:
    from olmstead import StoreError
    from olmstead.store.sqlite import _store_error

    full = _store_error("s", sqlite3.OperationalError("database or disk is full"))
    assert type(full) is StoreError
    assert "do not restore an older copy" in str(full)
    damaged = _store_error("s", sqlite3.DatabaseError("database disk image is malformed"))
    assert isinstance(damaged, StoreCorrupt)


async def test_a_new_store_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "crypto.db"
    store = await SqliteStore.open(path, KEY, lease=FAST_LEASE)
    await store.close()
    assert [p.name for p in tmp_path.iterdir()] == ["crypto.db"]  # no temp file left
    # a crash mid-build leaves only a temp file beside it, which never blocks a new store
    (tmp_path / ".other.db.123.abc.building").write_bytes(b"half a database")
    other = await SqliteStore.open(tmp_path / "other.db", KEY, lease=FAST_LEASE)
    await other.close()
