"""olmstead and matrix-nio (a peer this project did not write) in encrypted rooms, both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from olmstead import Client
from olmstead.client.rooms import RoomEvent
from tests.integration.harness import close_client, open_client, session_of
from tests.integration.nio_peer import NioPeer


async def olmstead_client(url: str, path: Path, user: dict[str, Any]) -> tuple[Client, list[Any]]:
    client = await open_client(url, path, session_of(url, user))
    await client.init_crypto()
    seen: list[Any] = []
    client.on_room_event(seen.append)
    client.on_decryption_failure(lambda room, event, error: seen.append(error))
    await client.sync_once()
    return client, seen


def texts(seen: list[Any]) -> list[tuple[str, str, bool]]:
    return [
        (e.sender, e.content.get("body", ""), e.encrypted)
        for e in seen
        if isinstance(e, RoomEvent) and e.type == "m.room.message"
    ]


async def test_nio_and_olmstead_both_ways(homeserver: Any, new_user: Any, tmp_path: Path) -> None:
    url = homeserver.base_url
    o_user, n_user = new_user(), new_user()
    bot, seen = await olmstead_client(url, tmp_path / "bot.db", o_user)
    nio = await NioPeer.login(url, n_user, tmp_path / "nio", "nio")

    room = await bot.create_room(invite=[n_user["user_id"]])
    await nio.sync()
    await nio.client.join(room)
    await nio.sync()
    await bot.sync_once()

    # nio sends, olmstead decrypts
    await nio.send_text(room, "from nio")
    await bot.sync_once()
    assert (n_user["user_id"], "from nio", True) in texts(seen)

    # olmstead sends, nio decrypts
    await bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "from olmstead"})
    await nio.sync()
    assert "from olmstead" in nio.bodies()
    assert nio.undecryptable == []
    assert [e for e in seen if not isinstance(e, RoomEvent)] == []
    await nio.close()
    await close_client(bot)


async def test_olmstead_shares_one_room_key_with_twenty_nio_devices(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    bot, _seen = await olmstead_client(url, tmp_path / "bot.db", new_user())
    users = [new_user() for _ in range(4)]
    peers = [
        await NioPeer.login(url, user, tmp_path / f"nio-{n}-{d}", f"nio {n}.{d}")
        for n, user in enumerate(users)
        for d in range(5)
    ]
    assert len(peers) == 20
    room = await bot.create_room(invite=[user["user_id"] for user in users])
    for peer in peers:
        await peer.sync()
    for user in users:  # one device of each user joins for the user
        owner = next(p for p in peers if p.client.user_id == user["user_id"])
        await owner.client.join(room)
    await bot.sync_once()

    await bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "to all twenty"})
    for peer in peers:
        await peer.sync()
    decrypted = [peer for peer in peers if "to all twenty" in peer.bodies()]
    assert len(decrypted) == 20, [(p.device_id, p.undecryptable) for p in peers]
    for peer in peers:
        await peer.close()
    await close_client(bot)
