"""``olmstead demo``: two encrypted devices on a throwaway Synapse, broken three ways, repaired.

1. A bot and a peer talk in an encrypted room.
2. The bot's store is lost; it comes back with an empty one on the same token and
   device: olmstead refuses to upload over the old identity (the seed's ``already
   exists`` storm, prevented); ``doctor`` names the cause, ``repair`` moves the bot
   to a new device with its room keys, and the two talk again.
3. The operator configures a new pickle key for a store written with an old
   default: ``WrongPickleKey`` names both fingerprints; ``doctor`` finds the key that
   opens it, ``repair`` re-encrypts the store under the new key.
4. The store is rolled back to an old copy: ``doctor`` reads the key-state marker
   on the server and names the rollback; ``repair`` drains the stale one-time keys.

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
from olmstead.client.rooms import RoomEvent
from olmstead.doctor import Credentials, Report, diagnose
from olmstead.errors import KeyStateError, WrongPickleKey
from olmstead.repair import RepairOptions, plan_repairs, read_session_file
from olmstead.store import PickleKey, SqliteStore
from olmstead.throwaway_homeserver import ThrowawayHomeserver

__all__ = ["run_demo"]

Say = Callable[[str], None]

#: the bot starts out on a default key that bridges once shipped
OLD_DEFAULT = PickleKey("mautrix.bridge.e2ee")
OPERATOR_KEY = PickleKey("the operator's own pickle key")


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


class _Device:
    """A client with the room messages it decrypted."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.heard: list[str] = []
        client.on_room_event(self._on_event)

    def _on_event(self, event: RoomEvent) -> None:
        if event.type == "m.room.message" and event.encrypted:
            self.heard.append(str(event.content.get("body")))

    async def close(self) -> None:
        await self.client.close()
        if self.client.store is not None:
            await self.client.store.close()


async def _device(url: str, path: Path, key: PickleKey, session: Session) -> _Device:
    client = Client(url, store=await SqliteStore.open(path, key))
    client.restore(session)
    await client.init_crypto()
    await client.sync_once()
    return _Device(client)


async def _walk_through(homeserver: ThrowawayHomeserver, work: Path, say: Say) -> None:
    url = homeserver.base_url
    bot_user, peer_user = homeserver.register_user("bot"), homeserver.register_user("peer")
    session = Session(url, bot_user["user_id"], bot_user["device_id"], bot_user["access_token"])
    peer_session = Session(
        url, peer_user["user_id"], peer_user["device_id"], peer_user["access_token"]
    )
    store_path = work / "bot.crypto.db"

    say("\n1. A bot and a peer talk in an encrypted room")
    bot = await _device(url, store_path, OLD_DEFAULT, session)
    peer = await _device(url, work / "peer.crypto.db", PickleKey("peer key"), peer_session)
    assert bot.client.machine is not None
    say(f"  bot device {session.device_id}, ed25519 {bot.client.machine.identity_keys['ed25519']}")
    room = await bot.client.create_room(invite=[peer_user["user_id"]])
    await peer.client.sync_once()
    await peer.client.join(room)
    await bot.client.sync_once()
    await _exchange(bot, peer, room, "hello", say)
    await bot.close()

    say("\n2. The bot's store is lost; it restarts with an empty one on the same token")
    _lose(store_path)
    lost_path = store_path
    before = await _device_keys(url, session)
    lost = Client(url, store=await SqliteStore.open(lost_path, OLD_DEFAULT))
    lost.restore(session)
    try:
        await lost.init_crypto()
        say("  !! olmstead uploaded keys over another identity's (this is a bug)")
    except KeyStateError as problem:
        say(f"  refused, nothing uploaded: {type(problem).__name__}")
    unchanged = await _device_keys(url, session) == before
    say(f"  the device's keys on the server are {'unchanged' if unchanged else 'CHANGED'}")
    await lost.close()
    assert lost.store is not None
    await lost.store.close()
    credentials = Credentials(url, session.access_token)
    options = RepairOptions(
        str(lost_path),
        OLD_DEFAULT,
        server=credentials,
        password=lambda: str(bot_user["password"]),
    )
    outcome = await _doctor_and_repair(options, say)
    assert outcome is not None
    assert outcome.server is not None
    moved = read_session_file(Path(f"{lost_path}.session.json"))
    bot = await _device(url, store_path, OLD_DEFAULT, moved)
    await peer.client.sync_once()
    await _exchange(bot, peer, room, "back on a new device", say)
    await bot.close()

    say("\n3. A new release of the bot sets the operator's own pickle key")
    digest = hashlib.sha256(store_path.read_bytes()).hexdigest()
    try:
        await SqliteStore.open(store_path, OPERATOR_KEY)
    except WrongPickleKey as wrong:
        say(f"  {type(wrong).__name__}: written with key {wrong.expected}, given {wrong.given}")
    same = hashlib.sha256(store_path.read_bytes()).hexdigest() == digest
    say(f"  the store file is {'byte-for-byte unchanged' if same else 'CHANGED'}")
    credentials = outcome.server
    await _doctor_and_repair(RepairOptions(str(store_path), OPERATOR_KEY, server=credentials), say)
    bot = await _device(url, store_path, OPERATOR_KEY, moved)
    await _exchange(bot, peer, room, "same device, new key", say)
    await bot.close()

    say("\n4. The store is rolled back to an older copy")
    backup = work / "backup.db"
    shutil.copy(store_path, backup)
    await _claim(url, peer_session, moved, 30)
    bot = await _device(url, store_path, OPERATOR_KEY, moved)
    say("  30 of the bot's keys were claimed, it uploaded 30 new ones; now the old copy returns")
    await bot.close()
    shutil.copy(backup, store_path)
    await _doctor_and_repair(RepairOptions(str(store_path), OPERATOR_KEY, server=credentials), say)
    bot = await _device(url, store_path, OPERATOR_KEY, moved)
    await _exchange(bot, peer, room, "rolled back and repaired", say)
    say(f"  uploads blocked: {bot.client.machine.key_problem is not None}")  # type: ignore[union-attr]
    await bot.close()
    await peer.close()


async def _doctor_and_repair(options: RepairOptions, say: Say) -> Any:
    report = await diagnose(options.store, options.key, server=options.server)
    say("  olmstead doctor says:")
    _show(report, say)
    outcome = None
    for repair in plan_repairs(report, options):
        say(f"  olmstead repair: {repair.title}")
        outcome = await repair.run()
        say(f"    done: {outcome.text}")
    after = await diagnose(
        outcome.store if outcome and outcome.store else options.store,
        options.key,
        server=outcome.server if outcome and outcome.server else options.server,
    )
    verdict = "all well" if after.exit_code == 0 else ", ".join(sorted(after.causes()))
    say(f"  doctor after the repair: {verdict}")
    return outcome


def _show(report: Report, say: Say) -> None:
    for finding in report.findings:
        if finding.verdict != "ok":
            say(f"    [{finding.verdict}] {finding.cause}: {finding.evidence}")
            say(f"      fix: {finding.fix}")


async def _exchange(bot: _Device, peer: _Device, room: str, text: str, say: Say) -> None:
    await bot.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": text})
    await peer.client.sync_once()
    reply = f"re: {text}"
    await peer.client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": reply})
    await bot.client.sync_once()
    ok = text in peer.heard and reply in bot.heard
    say(f"  bot -> peer {text!r}, peer -> bot {reply!r}: {'both decrypted' if ok else 'FAILED'}")


def _lose(store: Path) -> None:
    """The store and its log are gone: a volume dropped, a container rebuilt."""
    for part in store.parent.glob(f"{store.name}*"):
        part.unlink()


async def _device_keys(url: str, session: Session) -> Any:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            "/_matrix/client/v3/keys/query",
            json={"device_keys": {session.user_id: [session.device_id]}},
            headers={"Authorization": f"Bearer {session.access_token}"},
        )
        return answer.json()["device_keys"].get(session.user_id, {}).get(session.device_id)


async def _claim(url: str, claimer: Session, session: Session, count: int) -> None:
    """Another user starts ``count`` Olm sessions with the bot: one key claimed each."""
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(count):
            await http.post(
                "/_matrix/client/v3/keys/claim",
                json={"one_time_keys": {session.user_id: {session.device_id: "signed_curve25519"}}},
                headers={"Authorization": f"Bearer {claimer.access_token}"},
            )
