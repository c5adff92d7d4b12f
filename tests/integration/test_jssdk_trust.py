"""olmstead and matrix-js-sdk (Rust crypto, Element's engine) in "exclude insecure devices".

The js-sdk runs in ``OnlySignedDevicesIsolationMode`` (MSC4153, spec v1.18), as
Element's setting of that name does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from olmstead import Client, IdentityChanged, InsecureDevice, SharingStrategy, TrustLevel
from tests.integration.cross_signing_by_hand import cross_sign_by_hand
from tests.integration.harness import close_client, open_client, session_of
from tests.integration.js_peer import JsPeer

WITHHELD_UNVERIFIED = "MEGOLM_KEY_WITHHELD_FOR_UNVERIFIED_DEVICE"
#: syncs of up to half a second while the bot waits for news (30 s: a loaded machine)
SYNC_ROUNDS = 60


async def bot_and_js(
    url: str, new_user: Any, tmp_path: Path, *, js_cross_signed: bool
) -> tuple[Client, JsPeer, str]:
    bot_user, js_user = new_user(), new_user()
    bot = await open_client(url, tmp_path / "bot.db", session_of(url, bot_user))
    await bot.init_crypto()
    js = await JsPeer.login(url, js_user, tmp_path / "js.log")
    if js_cross_signed:
        identity = await js.call("bootstrap_cross_signing")
        assert identity["ready"]
    await js.call("set_isolation", mode="only_signed")
    room = await bot.create_room(invite=[js.user_id])
    await js.call("join", room_id=room)
    await bot.sync_once()
    return bot, js, room


async def say(bot: Client, room: str, body: str) -> str:
    return await bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": body})


def about(event_id: str) -> Any:
    return lambda e: e["event"] in ("message", "undecryptable") and e["event_id"] == event_id


async def test_exclude_insecure_withholds_from_a_js_device_not_cross_signed(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    bot, js, room = await bot_and_js(homeserver.base_url, new_user, tmp_path, js_cross_signed=False)
    try:
        bot.set_room_sharing_strategy(room, SharingStrategy.EXCLUDE_INSECURE)
        sent = await say(bot, room, "not for you")
        machine = bot.machine
        assert machine is not None
        assert await machine.get_device_trust(js.user_id, js.device_id) is (
            TrustLevel.OWNER_HAS_NO_IDENTITY
        )
        withheld = await js.wait_for(
            lambda e: e["event"] == "to_device" and e["type"] == "m.room_key.withheld"
        )
        assert withheld["content"]["code"] == "m.unverified"
        assert withheld["content"]["room_id"] == room
        failed = await js.wait_for(about(sent))
        assert failed["event"] == "undecryptable"
        assert failed["code"] == WITHHELD_UNVERIFIED
        assert js.messages() == []
    finally:
        await js.close()
        await close_client(bot)


async def test_a_cross_signed_js_device_gets_the_key_and_olmstead_reads_its_trust(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    bot, js, room = await bot_and_js(homeserver.base_url, new_user, tmp_path, js_cross_signed=True)
    try:
        seen: list[Any] = []
        bot.on_room_event(seen.append)
        bot.set_room_sharing_strategy(room, SharingStrategy.EXCLUDE_INSECURE)
        sent = await say(bot, room, "for a cross-signed device")
        machine = bot.machine
        assert machine is not None
        assert await machine.get_device_trust(js.user_id, js.device_id) is TrustLevel.CROSS_SIGNED
        identity = await machine.get_user_identity(js.user_id)
        own = await js.call("own_identity")
        assert identity is not None
        assert identity.master_key == own["master_key"]

        # the key arrived (nothing withheld); in "exclude insecure" the js-sdk still refuses
        # the bot's device, which its owner has not cross-signed
        refused = await js.wait_for(about(sent))
        assert refused["event"] == "undecryptable"
        assert refused["code"] == "UNSIGNED_SENDER_DEVICE"
        seen_by_js = await js.call(
            "device_trust", user_id=machine.user_id, device_id=machine.device_id
        )
        assert seen_by_js["known"]
        assert not seen_by_js["signed_by_owner"]
        assert not [e for e in js.events if e.get("type") == "m.room_key.withheld"]
        # with every device allowed, the same session decrypts
        await js.call("set_isolation", mode="all")
        message = await js.wait_for(about(await say(bot, room, "decrypts")))
        assert message["event"] == "message"
        assert message["content"]["body"] == "decrypts"

        # the other way: the bot sees the js-sdk's message with its device's trust level
        await js.call("send", room_id=room, body="from js")
        for _ in range(SYNC_ROUNDS):
            await bot.sync_once(timeout_ms=500)
            if any(getattr(e, "content", {}).get("body") == "from js" for e in seen):
                break
        (received,) = [e for e in seen if getattr(e, "content", {}).get("body") == "from js"]
        assert received.encrypted
        assert received.trust is TrustLevel.CROSS_SIGNED
    finally:
        await js.close()
        await close_client(bot)


async def test_a_js_identity_reset_is_reported_and_not_adopted(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    bot, js, room = await bot_and_js(homeserver.base_url, new_user, tmp_path, js_cross_signed=True)
    try:
        changes: list[IdentityChanged] = []
        bot.on_identity_changed(changes.append)
        await say(bot, room, "before")  # the bot queries the js-sdk user: its identity pinned
        machine = bot.machine
        assert machine is not None
        first = await js.call("own_identity")
        second = await js.call("reset_identity")
        assert second["master_key"] != first["master_key"]
        for _ in range(SYNC_ROUNDS):
            await bot.sync_once(timeout_ms=500)
            if changes:
                break
        assert changes == [
            IdentityChanged(js.user_id, first["master_key"], second["master_key"], False)
        ]
        identity = await machine.get_user_identity(js.user_id)
        assert identity is not None
        assert identity.master_key == first["master_key"]  # not adopted
        assert identity.changed_to is not None
        assert identity.changed_to.master_key == second["master_key"]

        adopted = await bot.acknowledge_identity_change(js.user_id)
        assert adopted.master_key == second["master_key"]
        assert await machine.get_device_trust(js.user_id, js.device_id) is TrustLevel.CROSS_SIGNED
    finally:
        await js.close()
        await close_client(bot)


async def test_sharing_with_a_verified_js_user_stops_after_a_reset_until_acknowledged(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    bot_user, js_user = new_user(), new_user()
    bot = await open_client(url, tmp_path / "bot.db", session_of(url, bot_user))
    machine = await bot.init_crypto()
    js = await JsPeer.login(url, js_user, tmp_path / "js.log")
    try:
        await js.call("bootstrap_cross_signing")
        room = await bot.create_room(invite=[js.user_id])
        await js.call("join", room_id=room)
        await bot.sync_once()
        changes: list[IdentityChanged] = []
        bot.on_identity_changed(changes.append)
        await say(bot, room, "hello")  # both users' keys queried and pinned
        await cross_sign_by_hand(url, bot_user, machine, [js.user_id])
        for _ in range(SYNC_ROUNDS):
            await bot.sync_once(timeout_ms=500)
            if await machine.is_identity_verified(js.user_id):
                break
        assert await machine.get_device_trust(js.user_id, js.device_id) is TrustLevel.VERIFIED
        # the js-sdk's view of the bot's device follows the (hand-made) cross-signing
        seen_by_js = await js.wait_for_device_trust(
            machine.user_id, machine.device_id, lambda t: t["signed_by_owner"]
        )
        assert seen_by_js["signed_by_owner"]  # the js-sdk learns it from its own sync

        first = await js.call("own_identity")
        second = await js.call("reset_identity")
        for _ in range(SYNC_ROUNDS):
            await bot.sync_once(timeout_ms=500)
            if changes:
                break
        assert changes == [
            IdentityChanged(js.user_id, first["master_key"], second["master_key"], True)
        ]

        # all devices is the strategy, yet nothing goes to the changed verified user
        blocked = await say(bot, room, "blocked")
        withheld = await js.wait_for(
            lambda e: e["event"] == "to_device" and e["type"] == "m.room_key.withheld"
        )
        assert withheld["content"]["code"] == "m.unverified"
        failed = await js.wait_for(about(blocked))
        assert failed["event"] == "undecryptable"
        assert failed["code"] == WITHHELD_UNVERIFIED

        await bot.acknowledge_identity_change(js.user_id)
        await js.call("set_isolation", mode="all")
        message = await js.wait_for(about(await say(bot, room, "after the acknowledgement")))
        assert message["event"] == "message"
        assert message["content"]["body"] == "after the acknowledgement"
    finally:
        await js.close()
        await close_client(bot)


async def test_olmstead_refusing_insecure_devices_refuses_a_js_device_until_it_is_cross_signed(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    bot, js, room = await bot_and_js(homeserver.base_url, new_user, tmp_path, js_cross_signed=False)
    try:
        bot.only_cross_signed_senders = True
        await js.call("set_isolation", mode="all")  # so that the js-sdk shares with the bot
        delivered: list[Any] = []
        refused: list[Any] = []
        bot.on_room_event(delivered.append)
        bot.on_decryption_failure(lambda room_id, event, error: refused.append(error))

        async def from_js(body: str) -> None:
            await js.call("wait_joined", room_id=room, user_id=bot.session.user_id)  # type: ignore[union-attr]
            await js.call("send", room_id=room, body=body)
            for _ in range(SYNC_ROUNDS):
                await bot.sync_once(timeout_ms=500)
                if refused or any(e.content.get("body") == body for e in delivered):
                    return

        await from_js("from an insecure device")
        (error,) = refused
        assert isinstance(error, InsecureDevice)
        assert error.trust == "owner_has_no_identity"
        assert not [e for e in delivered if e.encrypted]

        refused.clear()
        await js.call("bootstrap_cross_signing")
        machine = bot.machine
        assert machine is not None
        for _ in range(SYNC_ROUNDS):  # trust is decided on decryption, from what the bot knows then
            await bot.sync_once(timeout_ms=500)
            if await machine.get_device_trust(js.user_id, js.device_id) is TrustLevel.CROSS_SIGNED:
                break
        await from_js("now cross-signed")
        assert refused == []
        (event,) = [e for e in delivered if e.content.get("body") == "now cross-signed"]
        assert event.trust is TrustLevel.CROSS_SIGNED
    finally:
        await js.close()
        await close_client(bot)
