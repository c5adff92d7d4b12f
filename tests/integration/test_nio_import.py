"""A real matrix-nio device moves to olmstead and reads what was sent to it before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from olmstead import Session, SqliteStore
from olmstead.client.rooms import RoomEvent
from olmstead.imports.foreign import import_into
from olmstead.imports.nio import read_nio_sqlite
from tests.integration.harness import KEY, LEASE, close_client, open_client, session_of
from tests.integration.nio_peer import NioPeer


async def test_a_nio_device_moves_to_olmstead_and_reads_its_backlog(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    nio_user, peer = new_user(), new_user()
    nio = await NioPeer.login(url, nio_user, tmp_path / "nio", "nio")  # pickle key: nio's default
    device_id, token = nio.device_id, nio.client.access_token
    ed25519 = nio.client.olm.account.identity_keys["ed25519"]

    sender = await open_client(url, tmp_path / "peer.db", session_of(url, peer))
    await sender.init_crypto()
    room = await sender.create_room(invite=[nio_user["user_id"]])
    await nio.sync()
    await nio.client.join(room)
    await nio.sync()
    await sender.sync_once()
    await sender.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "before"})
    await nio.close()  # nio never saw it: the room key waits on the server

    nio_db = tmp_path / "nio" / f"{nio_user['user_id']}_{device_id}.db"
    foreign = read_nio_sqlite(str(nio_db), ["a wrong guess"])
    assert foreign.key_used == "the known default 'DEFAULT_KEY'"
    assert foreign.account.ed25519_key.to_base64() == ed25519
    store = await SqliteStore.open(tmp_path / "olmstead.db", KEY, lease=LEASE)
    await import_into(foreign, store)
    await store.close()

    session = Session(url, nio_user["user_id"], device_id, token)
    moved = await open_client(url, tmp_path / "olmstead.db", session)
    seen: list[Any] = []
    moved.on_room_event(seen.append)
    machine = await moved.init_crypto()
    assert machine.identity_keys["ed25519"] == ed25519
    await moved.sync_once()
    assert [e.content["body"] for e in seen if isinstance(e, RoomEvent) and e.encrypted] == [
        "before"
    ]
    await moved.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "after"})
    heard: list[RoomEvent] = []
    sender.on_room_event(heard.append)
    await sender.sync_once()
    assert [(e.content["body"], e.encrypted) for e in heard if e.sender == nio_user["user_id"]] == [
        ("after", True)
    ]
    await close_client(moved)
    await close_client(sender)
