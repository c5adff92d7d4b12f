"""SQLite on a disk that fills up, and a store file replaced underneath: typed errors, and
nothing corrupt or half-written."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import vodozemac

from olmstead import (
    Changes,
    InboundGroupSessionRecord,
    PickleKey,
    SqliteStore,
    StoreDiskFull,
    StoreFileReplaced,
    StoreUnavailable,
)

KEY = PickleKey(b"d" * 32)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of its own (mounting needs root: CI runs as root)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            raise RuntimeError(f"cannot mount a small tmpfs: {mounted.stderr}")
        pytest.skip(f"cannot mount a small tmpfs (run as root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def room_keys(count: int) -> list[InboundGroupSessionRecord]:
    keys = []
    for _ in range(count):
        session = vodozemac.InboundGroupSession(vodozemac.GroupSession().session_key)
        keys.append(InboundGroupSessionRecord(f"!{uuid.uuid4().hex}:x", "c", "e", session))
    return keys


def fill(directory: Path) -> Path:
    """Write a file until the disk is full; it is returned to be deleted later."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    written = -1
    try:
        while written != 0:
            try:
                written = os.write(fd, b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                written = 0
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_gives_a_typed_error_and_nothing_corrupt(small_disk: Path) -> None:
    path = small_disk / "bot.db"
    store = await SqliteStore.open(path, KEY)
    kept = room_keys(5)
    await store.save_changes(Changes(values={"sync_token": "before"}, inbound_group_sessions=kept))
    filler = fill(small_disk)

    with pytest.raises(StoreDiskFull) as caught:
        await store.save_changes(
            Changes(values={"sync_token": "during"}, inbound_group_sessions=room_keys(400))
        )
    assert isinstance(caught.value, StoreUnavailable)  # the sync loop waits for space
    assert "disk is full" in str(caught.value)
    assert await store.get_value("sync_token") == "before"  # all or nothing
    assert (await store.count_secrets())["inbound"] == 5

    filler.unlink()  # space again: the same handle writes on
    await store.save_changes(Changes(values={"sync_token": "after"}))
    await store.close()

    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    reopened = await SqliteStore.open(path, KEY)
    try:
        assert await reopened.get_value("sync_token") == "after"
        assert (await reopened.count_secrets())["inbound"] == 5
        for record in kept:
            found = await reopened.get_inbound_group_session(record.room_id, record.session_id)
            assert found is not None
    finally:
        await reopened.close()


async def test_a_new_store_on_a_full_disk_is_a_typed_error(small_disk: Path) -> None:
    filler = fill(small_disk)
    with pytest.raises(StoreDiskFull):
        await SqliteStore.open(small_disk / "new.db", KEY)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no half-made store
    filler.unlink()
    store = await SqliteStore.open(small_disk / "new.db", KEY)
    await store.close()


async def test_a_store_file_replaced_underneath_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    store = await SqliteStore.open(path, KEY)
    await store.save_changes(Changes(values={"sync_token": "mine"}))
    other = await SqliteStore.open(tmp_path / "restored.db", KEY)
    await other.save_changes(Changes(values={"sync_token": "from a backup"}))
    await other.close()
    os.replace(tmp_path / "restored.db", path)  # a restore, or a deploy copying files

    with pytest.raises(StoreFileReplaced) as caught:
        await store.save_changes(Changes(values={"sync_token": "lost"}))
    assert str(path) in str(caught.value)
    await store.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    again = await SqliteStore.open(path, KEY)
    try:
        # what the file holds depends on the -wal file left beside it; never the refused write
        assert await again.get_value("sync_token") in ("mine", "from a backup")
    finally:
        await again.close()

    removed = await SqliteStore.open(tmp_path / "gone.db", KEY)
    (tmp_path / "gone.db").unlink()
    with pytest.raises(StoreFileReplaced):
        await removed.save_changes(Changes(values={"sync_token": "lost"}))
    await removed.close()
