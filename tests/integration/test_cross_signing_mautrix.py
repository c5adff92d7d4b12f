"""mautrix-python, a peer olmstead did not write, checks olmstead's identity: it finds the
bot's device cross-signed by its owner, opens its secret storage with the recovery key
(mautrix's own SSSS code) and reads the same private key from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from mautrix.client import Client as MautrixClient
from mautrix.client.state_store import MemoryStateStore
from mautrix.crypto import OlmMachine as MautrixMachine
from mautrix.crypto import PgCryptoStore
from mautrix.crypto.ssss.key import KeyMetadata
from mautrix.crypto.ssss.types import EncryptedAccountDataEventContent
from mautrix.types import TrustState
from mautrix.util.async_db import Database

from olmstead.cross_signing.keys import SigningKey
from olmstead.http.endpoints import account_data_path
from tests.integration.harness import Wire, close_client, open_client, session_of


async def account_data(url: str, user: dict[str, Any], event_type: str) -> Any:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.get(
            account_data_path(user["user_id"], event_type),
            headers={"Authorization": f"Bearer {user['access_token']}"},
        )
    answer.raise_for_status()
    return answer.json()


class StateStore(MemoryStateStore):  # type: ignore[misc]
    """mautrix's memory state store, with the crypto state-store calls it makes here."""

    async def find_shared_rooms(self, user_id: Any) -> list[Any]:
        return []

    async def is_encrypted(self, room_id: Any) -> bool:
        return False


async def mautrix_trust(url: str, peer: dict[str, Any], bot: dict[str, Any], where: Path) -> Any:
    """How a fresh mautrix device of another user rates the bot's device."""
    db = Database.create(f"sqlite:{where}", upgrade_table=PgCryptoStore.upgrade_table)
    await db.start()
    store = PgCryptoStore(account_id=peer["user_id"], pickle_key="k", db=db)
    await store.open()
    await store.put_device_id(peer["device_id"])
    state = StateStore()
    client = MautrixClient(
        mxid=peer["user_id"],
        device_id=peer["device_id"],
        base_url=url,
        token=peer["access_token"],
        state_store=state,
    )
    try:
        machine = MautrixMachine(client, store, state)
        await machine.load()
        device = await machine.get_or_fetch_device(bot["user_id"], bot["device_id"])
        assert device is not None
        return await machine.resolve_trust(device)
    finally:
        await db.stop()
        await client.api.session.close()


async def test_mautrix_sees_the_bot_cross_signed_and_opens_its_secret_storage(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, bot, peer = homeserver.base_url, new_user(), new_user()
    client = await open_client(url, tmp_path / "bot.db", session_of(url, bot), Wire())
    await client.init_crypto()
    assert await mautrix_trust(url, peer, bot, tmp_path / "m1.db") == TrustState.UNVERIFIED

    recovery_key = await client.bootstrap_cross_signing()
    assert client.machine is not None
    master_public = client.machine.cross_signing_status.public_keys["master"]
    await close_client(client)
    # a fresh mautrix store: it fetches the bot's keys and checks the chain itself
    assert await mautrix_trust(url, peer, bot, tmp_path / "m2.db") == TrustState.CROSS_SIGNED_TOFU

    key_id = (await account_data(url, bot, "m.secret_storage.default_key"))["key"]
    description = await account_data(url, bot, f"m.secret_storage.key.{key_id}")
    key = KeyMetadata.parse_json(json.dumps(description)).verify_recovery_key(key_id, recovery_key)
    sealed = await account_data(url, bot, "m.cross_signing.master")
    seed = EncryptedAccountDataEventContent.parse_json(json.dumps(sealed)).decrypt(
        "m.cross_signing.master", key
    )
    # mautrix hands back the secret base64-decoded: the raw 32-byte seed
    assert SigningKey(seed).public_key == master_public
