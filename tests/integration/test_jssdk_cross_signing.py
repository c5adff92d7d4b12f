"""olmstead's own cross-signing seen by matrix-js-sdk (Rust crypto) in "exclude insecure".

Issue 14's end-to-end cases that need both halves: our identity (bootstrap and
recovery on a second device) and a peer that shares and reads only with devices
cross-signed by their owner (``OnlySignedDevicesIsolationMode``, MSC4153).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from olmstead import Client, DecryptionError, RoomKeyWithheld, TrustLevel, WrongRecoveryKey
from tests.integration.harness import close_client, open_client, session_of
from tests.integration.js_peer import JsPeer

#: syncs of up to half a second while the bot waits for news (30 s: a loaded machine)
SYNC_ROUNDS = 60
UNSIGNED_SENDER = "UNSIGNED_SENDER_DEVICE"


async def say(bot: Client, room: str, body: str) -> str:
    return await bot.room_send(room, "m.room.message", {"msgtype": "m.text", "body": body})


def about(event_id: str) -> Any:
    return lambda e: e["event"] in ("message", "undecryptable") and e["event_id"] == event_id


def body_of(event: Any) -> Any:
    return getattr(event, "content", {}).get("body")


async def own_keys(url: str, token: str, user_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            "/_matrix/client/v3/keys/query",
            json={"device_keys": {user_id: []}},
            headers={"Authorization": f"Bearer {token}"},
        )
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


async def login_again(url: str, user: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            "/_matrix/client/v3/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user["localpart"]},
                "password": user["password"],
            },
        )
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


async def strict_js_in_a_room_with(
    bot: Client, url: str, js_user: Any, log: Path
) -> tuple[JsPeer, str]:
    """A js-sdk with its own cross-signing, in "exclude insecure", joined to a bot's room."""
    js = await JsPeer.login(url, js_user, log)
    identity = await js.call("bootstrap_cross_signing")
    assert identity["ready"]
    await js.call("set_isolation", mode="only_signed")
    room = await bot.create_room(invite=[js.user_id])
    await js.call("join", room_id=room)
    await bot.sync_once()
    return js, room


async def test_the_js_sdk_withholds_from_the_bot_until_it_bootstraps_then_both_ways_decrypt(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    bot_user = new_user()
    bot = await open_client(url, tmp_path / "bot.db", session_of(url, bot_user))
    machine = await bot.init_crypto()
    js, room = await strict_js_in_a_room_with(bot, url, new_user(), tmp_path / "js.log")
    try:
        delivered: list[Any] = []
        failures: list[DecryptionError] = []
        bot.on_room_event(delivered.append)
        bot.on_decryption_failure(lambda room_id, event, error: failures.append(error))
        await js.call("wait_joined", room_id=room, user_id=machine.user_id)

        # before: the js-sdk withholds its room key from the bot's device, not cross-signed
        await js.call("send", room_id=room, body="withheld from the bot")
        for _ in range(SYNC_ROUNDS):
            await bot.sync_once(timeout_ms=500)
            if any(isinstance(f, RoomKeyWithheld) for f in failures):
                break
        withheld = [f for f in failures if isinstance(f, RoomKeyWithheld)]
        assert withheld, failures
        assert {f.code for f in withheld} == {"m.unverified"}
        assert {f.sender for f in withheld} == {js.user_id}
        assert "withheld from the bot" not in [body_of(e) for e in delivered]

        # and refuses the bot's messages: the key reaches it, the sender is not cross-signed
        refused = await js.wait_for(about(await say(bot, room, "refused by the js-sdk")))
        assert refused["event"] == "undecryptable"
        assert refused["code"] == UNSIGNED_SENDER
        before = await js.call("device_trust", user_id=machine.user_id, device_id=machine.device_id)
        assert before["known"]
        assert not before["signed_by_owner"]

        # after the bootstrap: the js-sdk sees the bot's device signed by its owner
        await bot.bootstrap_cross_signing()
        seen_by_js = await js.wait_for_device_trust(
            machine.user_id, machine.device_id, lambda t: t["signed_by_owner"]
        )
        assert seen_by_js["known"]
        assert seen_by_js["signed_by_owner"]

        message = await js.wait_for(about(await say(bot, room, "from a cross-signed bot")))
        assert message["event"] == "message"
        assert message["content"]["body"] == "from a cross-signed bot"
        assert message["sender"] == machine.user_id

        failures.clear()
        await js.call("send", room_id=room, body="now shared with the bot")
        for _ in range(SYNC_ROUNDS):
            await bot.sync_once(timeout_ms=500)
            if any(body_of(e) == "now shared with the bot" for e in delivered):
                break
        (received,) = [e for e in delivered if body_of(e) == "now shared with the bot"]
        assert received.encrypted
        assert received.sender == js.user_id
        assert received.trust is TrustLevel.CROSS_SIGNED
        assert not [f for f in failures if isinstance(f, RoomKeyWithheld)]
    finally:
        await js.close()
        await close_client(bot)


async def test_a_second_bot_device_recovers_alone_and_the_js_sdk_trusts_it(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, bot_user = homeserver.base_url, new_user()
    first = await open_client(url, tmp_path / "first.db", session_of(url, bot_user))
    first_machine = await first.init_crypto()
    js, room = await strict_js_in_a_room_with(first, url, new_user(), tmp_path / "js.log")
    try:
        recovery_key = await first.bootstrap_cross_signing()
        assert (
            await js.wait_for_device_trust(
                first_machine.user_id, first_machine.device_id, lambda t: t["signed_by_owner"]
            )
        )["signed_by_owner"]
        await close_client(first)  # nothing of the bot's user is online from here on

        login = await login_again(url, bot_user)
        second = await open_client(url, tmp_path / "second.db", session_of(url, login))
        try:
            machine = await second.init_crypto()
            assert machine.device_id != first_machine.device_id
            # the js-sdk knows the new device, which its owner has not signed yet
            unsigned = await js.wait_for_device_trust(
                machine.user_id, machine.device_id, lambda t: t["known"]
            )
            assert unsigned["known"]
            assert not unsigned["signed_by_owner"]

            before = await own_keys(url, login["access_token"], bot_user["user_id"])
            with pytest.raises(WrongRecoveryKey):
                await second.recover(
                    recovery_key="EsTc LW2K PGiF wKEA 3As5 g5c4 BXwk qeeJ ZJV8 Q9fu gUMN UE4d"
                )
            assert await own_keys(url, login["access_token"], bot_user["user_id"]) == before
            assert await machine.store.load_cross_signing() is None
            assert not (
                await js.call("device_trust", user_id=machine.user_id, device_id=machine.device_id)
            )["signed_by_owner"]

            await second.recover(recovery_key=recovery_key)
            trusted = await js.wait_for_device_trust(
                machine.user_id, machine.device_id, lambda t: t["signed_by_owner"]
            )
            assert trusted["signed_by_owner"]

            # and the js-sdk, excluding insecure devices, reads what the recovered device says
            await second.sync_once()
            message = await js.wait_for(about(await say(second, room, "from the recovered")))
            assert message["event"] == "message"
            assert message["content"]["body"] == "from the recovered"
        finally:
            await close_client(second)
    finally:
        await js.close()
