"""``olmstead demo``: a device's keys against a throwaway Synapse, broken three ways.

1. A bot logs in, uploads its keys and syncs.
2. Its store is lost and a new one takes the same token and device: olmstead
   refuses before uploading anything (the seed's ``already exists`` storm, prevented).
3. The store is opened with another pickle key: ``WrongPickleKey`` names both
   fingerprints, and the store is untouched.
4. The store is rolled back to an old copy: the duplicate-key error is read, the
   stale keys are drained, and the upload succeeds (detected and repaired).

Everything lives in a temp directory and is removed at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from olmstead.client import Client, Session
from olmstead.errors import KeyStateError, WrongPickleKey
from olmstead.store import PickleKey, SqliteStore, load_or_create_key_file
from olmstead.throwaway_homeserver import ThrowawayHomeserver
from olmstead.upload_guard import OneTimeKeysDrained

__all__ = ["run_demo"]

Say = Callable[[str], None]


def run_demo(say: Say = print) -> None:
    say("Starting a throwaway Synapse on 127.0.0.1 (a few seconds)...")
    with ThrowawayHomeserver() as homeserver:
        say(f"  Synapse is up at {homeserver.base_url}")
        work = Path(tempfile.mkdtemp(prefix="olmstead-demo-"))
        try:
            asyncio.run(_walk_through(homeserver, work, say))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say("\nDone: the homeserver and every file of the demo are gone.")


async def _walk_through(homeserver: ThrowawayHomeserver, work: Path, say: Say) -> None:
    url = homeserver.base_url
    bot_user = homeserver.register_user("bot")
    peer = homeserver.register_user("peer")
    key = load_or_create_key_file(work / "pickle.key")
    store_path = work / "bot.crypto.db"

    say("\n1. A bot logs in and sets up encryption")
    client = Client(url, store=await SqliteStore.open(store_path, key))
    session = await client.login(bot_user["localpart"], bot_user["password"], device_name="demo")
    machine = await client.init_crypto()
    await client.sync_once()
    say(f"  device {session.device_id}, ed25519 {machine.identity_keys['ed25519']}")
    say(f"  pickle key fingerprint {client.store.fingerprint}")  # type: ignore[union-attr]
    say(f"  the server holds {machine.server_key_count} one-time keys and a fallback key")
    await _close(client)
    backup = work / "backup.db"
    shutil.copy(store_path, backup)

    say("\n2. The store is lost; a fresh one takes the same access token and device")
    before = await _device_keys(url, session)
    lost = Client(url, store=await SqliteStore.open(work / "lost.crypto.db", key))
    lost.restore(session)
    try:
        await lost.init_crypto()
        say("  !! olmstead uploaded keys over another identity's (this is a bug)")
    except KeyStateError as problem:
        say(f"  refused, nothing uploaded:\n    {type(problem).__name__}: {problem}")
    unchanged = await _device_keys(url, session) == before
    say(f"  the device's keys on the server are {'unchanged' if unchanged else 'CHANGED'}")
    await _close(lost)

    say("\n3. The store is opened with another pickle key")
    digest = hashlib.sha256(store_path.read_bytes()).hexdigest()
    try:
        await SqliteStore.open(store_path, PickleKey("mautrix.bridge.e2ee"))
    except WrongPickleKey as wrong:
        say(f"  {type(wrong).__name__}: {wrong}")
    same = hashlib.sha256(store_path.read_bytes()).hexdigest() == digest
    say(f"  the store file is {'byte-for-byte unchanged' if same else 'CHANGED'}")

    say("\n4. The store is rolled back to an older copy")
    client = Client(url, store=await SqliteStore.open(store_path, key))
    client.restore(session)
    await client.init_crypto()
    await _claim(url, peer, session, 30)
    await client.sync_once()
    say("  30 keys were claimed; the bot uploaded 30 new ones; now the old copy comes back")
    await _close(client)
    shutil.copy(backup, store_path)

    drained: list[OneTimeKeysDrained] = []
    client = Client(url, store=await SqliteStore.open(store_path, key))
    client.restore(session)
    client.on_keys_drained(drained.append)
    machine = await client.init_crypto()
    await _claim(url, peer, session, 26)
    await client.sync_once()
    for report in drained:
        say(
            f"  the server held {report.conflicting_key_id} and more, signed by us but "
            f"forgotten by the store: drained {report.drained} stale keys"
        )
    say(
        f"  upload accepted; the server holds {machine.server_key_count} keys; "
        f"uploads blocked: {machine.key_problem is not None}"
    )
    await _close(client)


async def _close(client: Client) -> None:
    await client.close()
    if client.store is not None:
        await client.store.close()


async def _device_keys(url: str, session: Session) -> Any:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            "/_matrix/client/v3/keys/query",
            json={"device_keys": {session.user_id: [session.device_id]}},
            headers={"Authorization": f"Bearer {session.access_token}"},
        )
        return answer.json()["device_keys"].get(session.user_id, {}).get(session.device_id)


async def _claim(url: str, claimer: dict[str, Any], session: Session, count: int) -> None:
    """Another user starts ``count`` Olm sessions with the bot: one key claimed each."""
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(count):
            await http.post(
                "/_matrix/client/v3/keys/claim",
                json={"one_time_keys": {session.user_id: {session.device_id: "signed_curve25519"}}},
                headers={"Authorization": f"Bearer {claimer['access_token']}"},
            )
