"""A real mautrix-python device moves to olmstead and reads what was sent to it before."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from olmstead import SqliteStore
from olmstead.client.rooms import RoomEvent
from olmstead.imports.foreign import UnknownForeignKey, import_into
from olmstead.imports.mautrix import read_mautrix_postgres, read_mautrix_sqlite
from tests.conftest import POSTGRES_DSN, postgres_or_skip
from tests.integration.harness import KEY, LEASE, close_client, open_client, session_of
from tests.integration.mautrix_device import mautrix_device


async def join(url: str, user: dict[str, Any], room: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            f"/_matrix/client/v3/rooms/{room}/join",
            json={},
            headers={"Authorization": f"Bearer {user['access_token']}"},
        )
        answer.raise_for_status()


async def test_a_mautrix_device_moves_to_olmstead_and_reads_its_backlog(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    bridge, peer = new_user(), new_user()
    mautrix_db = tmp_path / "mautrix-crypto.db"
    ed25519 = await mautrix_device(url, bridge, mautrix_db)

    # an olmstead peer writes to the mautrix device while mautrix still owns it
    sender = await open_client(url, tmp_path / "peer.db", session_of(url, peer))
    await sender.init_crypto()
    room = await sender.create_room(invite=[bridge["user_id"]])
    await join(url, bridge, room)
    await sender.sync_once()
    await sender.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "before"})

    # the operator tries the wrong key first: the import names the one that works
    foreign = read_mautrix_sqlite(str(mautrix_db), ["not the bridge key"])
    assert foreign.key_used == "the known default 'mautrix.bridge.e2ee'"
    assert (foreign.user_id, foreign.device_id, foreign.shared) == (
        bridge["user_id"],
        bridge["device_id"],
        True,
    )
    assert foreign.account.ed25519_key.to_base64() == ed25519

    store = await SqliteStore.open(tmp_path / "olmstead.db", KEY, lease=LEASE)
    await import_into(foreign, store)
    await store.close()

    # the same device, now olmstead: same token, same device ID, same identity
    moved = await open_client(url, tmp_path / "olmstead.db", session_of(url, bridge))
    seen: list[Any] = []
    moved.on_room_event(seen.append)
    moved.on_decryption_failure(lambda room, event, error: seen.append(error))
    machine = await moved.init_crypto()
    assert machine.identity_keys["ed25519"] == ed25519
    assert machine.key_problem is None
    await moved.sync_once()
    texts = [e.content["body"] for e in seen if isinstance(e, RoomEvent) and e.encrypted]
    assert texts == ["before"], seen

    # and it keeps working as that device, both ways
    await moved.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "after"})
    heard: list[Any] = []
    sender.on_room_event(heard.append)
    await sender.sync_once()
    from_bridge = [e for e in heard if e.sender == bridge["user_id"]]
    assert [(e.content["body"], e.encrypted) for e in from_bridge] == [("after", True)]
    await close_client(moved)
    await close_client(sender)


async def test_a_key_nobody_gave_is_reported_without_importing(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    mautrix_db = tmp_path / "mautrix-crypto.db"
    await mautrix_device(homeserver.base_url, new_user(), mautrix_db, key="a bridge's own secret")
    with pytest.raises(UnknownForeignKey) as caught:
        read_mautrix_sqlite(str(mautrix_db), ["wrong one", "wrong two"])
    assert "tried 2 keys you gave" in str(caught.value)
    assert "a bridge's own secret" not in str(caught.value)
    found = read_mautrix_sqlite(str(mautrix_db), ["wrong one", "a bridge's own secret"])
    assert found.key_used == "candidate #2"


async def test_a_mautrix_store_in_postgres_is_read_too(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    await postgres_or_skip()
    database = f"mautrix_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(POSTGRES_DSN)
    await admin.execute(f"CREATE DATABASE {database}")
    dsn = POSTGRES_DSN.rsplit("/", 1)[0] + f"/{database}"
    try:
        bridge = new_user()
        ed25519 = await mautrix_device(homeserver.base_url, bridge, dsn)
        foreign = await read_mautrix_postgres(dsn, [], user_id=bridge["user_id"])
        assert foreign.key_used == "the known default 'mautrix.bridge.e2ee'"
        assert foreign.account.ed25519_key.to_base64() == ed25519
        assert foreign.device_id == bridge["device_id"]
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        await admin.close()
