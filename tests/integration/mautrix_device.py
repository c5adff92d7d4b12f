"""A device set up by mautrix-python's own OlmMachine, in a SQLite crypto store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mautrix.client import Client
from mautrix.client.state_store import MemoryStateStore
from mautrix.crypto import OlmMachine, PgCryptoStore
from mautrix.util.async_db import Database

BRIDGE_KEY = "mautrix.bridge.e2ee"  # the pickle key mautrix-python bridges hard-code


async def mautrix_device(
    url: str, user: dict[str, Any], where: Path | str, key: str = BRIDGE_KEY
) -> str:
    """Create the account in a mautrix store (an SQLite path, or a postgres:// DSN) and
    upload its keys; its ed25519 key."""
    location = where if isinstance(where, str) else f"sqlite:{where}"
    db = Database.create(location, upgrade_table=PgCryptoStore.upgrade_table)
    await db.start()
    store = PgCryptoStore(account_id=user["user_id"], pickle_key=key, db=db)
    await store.open()
    await store.put_device_id(user["device_id"])
    state = MemoryStateStore()
    client = Client(
        mxid=user["user_id"],
        device_id=user["device_id"],
        base_url=url,
        token=user["access_token"],
        state_store=state,
    )
    try:
        machine = OlmMachine(client, store, state)
        await machine.load()
        await machine.share_keys()
        assert machine.account.shared
        ed25519: str = machine.account.signing_key
        return ed25519
    finally:
        await db.stop()
        await client.api.session.close()
