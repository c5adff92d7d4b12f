"""Invites and room state against the real Synapse (issue 13 item 8, issue 18).

A bot is invited to an encrypted room: ``on_invite`` names the inviter and the
room, ``auto_join`` (or ``join``) takes it in, and the first messages both ways
decrypt. ``Client.room`` shows the members, their display names and the room's
encryption, kept current by later syncs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from olmstead import Client, Invite
from olmstead.client.rooms import RoomEvent
from tests.integration.harness import Wire, close_client, open_client, session_of
from tests.integration.test_messaging import crypto_client, messages

MEGOLM = "m.megolm.v1.aes-sha2"


async def display_name(client: Client, user_id: str, name: str) -> None:
    path = f"/_matrix/client/v3/profile/{quote(user_id)}/displayname"
    await client.http.request("PUT", path, {"displayname": name})


async def test_a_bot_with_auto_join_is_told_joins_and_talks(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    a_user, bot_user, c_user = new_user(), new_user(), new_user()
    alice_id, bot_id, carol_id = a_user["user_id"], bot_user["user_id"], c_user["user_id"]
    alice, alice_seen = await crypto_client(url, tmp_path / "alice.db", a_user)
    await display_name(alice, alice_id, "Alice")
    bot, bot_seen = await crypto_client(url, tmp_path / "bot.db", bot_user)
    bot.auto_join = True
    invites: list[Invite] = []
    bot.on_invite(invites.append)

    room = await alice.create_room(invite=[bot_id], name="Ops")
    await bot.sync_once()  # the invite: told, then joined
    (invite,) = invites
    assert (invite.room_id, invite.inviter, invite.encrypted) == (room, alice_id, True)
    assert invite.name == "Ops"
    info = bot.room(room)
    assert info is not None
    assert info.joined == frozenset({alice_id, bot_id})
    assert (info.encrypted, info.algorithm, info.name) == (True, MEGOLM, "Ops")
    assert info.encryption is not None
    assert info.encryption.rotation_period_msgs == 100  # the spec's default
    assert info.display_name(alice_id) == "Alice"
    assert set(bot.rooms) == {room}

    await alice.sync_once()
    await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "hello bot"})
    await bot.sync_once()
    assert (alice_id, "hello bot", True) in messages(bot_seen)
    await bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "hello alice"})
    await alice.sync_once()
    assert (bot_id, "hello alice", True) in messages(alice_seen)
    assert [e for e in alice_seen + bot_seen if not isinstance(e, RoomEvent)] == []

    # the room's state follows the syncs: an invite, a new name, a member leaving
    await alice.invite(room, carol_id)
    await alice.http.request(
        "PUT", f"/_matrix/client/v3/rooms/{quote(room)}/state/m.room.name/", {"name": "Ops 2"}
    )
    await bot.sync_once()
    info = bot.room(room)
    assert info is not None
    assert (info.invited, info.name) == (frozenset({carol_id}), "Ops 2")
    await alice.http.request("POST", f"/_matrix/client/v3/rooms/{quote(room)}/leave", {})
    await bot.sync_once()
    info = bot.room(room)
    assert info is not None
    assert info.joined == frozenset({bot_id})
    assert len(invites) == 1  # each invite told once
    await close_client(alice)
    await close_client(bot)


async def test_join_by_hand_tracks_the_members_before_the_next_sync(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    a_user, bot_user = new_user(), new_user()
    alice_id, bot_id = a_user["user_id"], bot_user["user_id"]
    alice, alice_seen = await crypto_client(url, tmp_path / "alice.db", a_user)
    bot, _bot_seen = await crypto_client(url, tmp_path / "bot.db", bot_user)
    invites: list[Invite] = []
    bot.on_invite(invites.append)

    room = await alice.create_room(invite=[bot_id])
    await bot.sync_once()
    (invite,) = invites
    assert bot.room(room) is None  # not joined: no auto_join
    await bot.join(invite.room_id)
    info = bot.room(room)
    assert info is not None
    assert info.joined == frozenset({alice_id, bot_id})
    # at once, before any sync, the members are tracked: their devices are queried
    assert bot.machine is not None
    await bot.process_outgoing()
    assert a_user["device_id"] in await bot.machine.get_user_devices(alice_id)
    await bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "first words"})
    await alice.sync_once()
    assert (bot_id, "first words", True) in messages(alice_seen)
    await close_client(alice)
    await close_client(bot)


async def test_a_restarted_client_knows_every_room_from_its_first_sync(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    bot_user = new_user()
    bot, _ = await crypto_client(url, tmp_path / "bot.db", bot_user)
    secret = await bot.create_room(name="Secret")
    public = await bot.create_room(encrypted=False, name="Lobby")
    await bot.sync_once()
    await close_client(bot)

    wire = Wire()
    bot = await open_client(url, tmp_path / "bot.db", session_of(url, bot_user), wire)
    await bot.init_crypto()
    assert bot.rooms == {}
    await bot.sync_once(full_state=True)  # what start() does first
    assert set(bot.rooms) == {secret, public}
    secret_room, public_room = bot.rooms[secret], bot.rooms[public]
    assert (secret_room.name, secret_room.encrypted) == ("Secret", True)
    assert (public_room.name, public_room.encrypted) == ("Lobby", False)
    assert secret_room.joined == public_room.joined == frozenset({bot_user["user_id"]})
    # read from the sync itself, not one /state request per room
    assert [p for _m, p, _q in wire.requests if p.endswith("/state")] == []
    await close_client(bot)
