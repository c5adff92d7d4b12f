"""Two clients on the real Synapse keep talking while their PostgreSQL store fails under them.

Each test has a database and a role of its own: connections are terminated from the
server side (``pg_terminate_backend``) at random moments, or refused for 20 s, and
the server itself never stops. The sync loops must never die, every message must be
delivered or reported, and no one-time key may collide afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from olmstead import (
    Client,
    DecryptionError,
    LeaseSettings,
    PickleKey,
    StoreConnectionLost,
    StoreError,
)
from olmstead.client.rooms import RoomEvent
from olmstead.store.postgres import PostgresDatabase
from tests.dedicated_postgres import DedicatedDatabase, dedicated_database
from tests.integration.harness import close_client, open_client, session_of

KEY = PickleKey(b"c" * 32)
LEASE = LeaseSettings(duration=3.0, renew_every=1.0, wait=10.0)
#: every sync brings up to this many events per room: gaps are another test's subject
TIMELINE = 200


@dataclass
class Peer:
    client: Client
    user_id: str
    #: message bodies delivered decrypted, and events reported undecryptable, by event ID
    delivered: dict[str, str] = field(default_factory=dict)
    reported: dict[str, DecryptionError] = field(default_factory=dict)
    #: bodies this peer sent (the server accepted them)
    sent: list[str] = field(default_factory=list)
    store_errors: list[StoreError] = field(default_factory=list)
    loop: asyncio.Task[None] | None = None
    #: timeline gaps the client could not fill from /messages (reported to on_gap)
    gaps: int = 0

    def watch(self) -> None:
        def on_event(event: RoomEvent) -> None:
            if event.type == "m.room.message" and event.encrypted:
                self.delivered[event.event_id] = str(event.content.get("body"))

        def on_failure(_room: str | None, event: Any, error: DecryptionError) -> None:
            self.reported[str(event.get("event_id"))] = error

        self.client.on_room_event(on_event)
        self.client.on_decryption_failure(on_failure)
        self.client.on_gap(lambda _gap: self.count_gap())

    def count_gap(self) -> None:
        self.gaps += 1

    async def send(self, room: str, body: str, attempts: int = 200) -> None:
        """Send as an application would: a store failure is retried after a pause."""
        for _ in range(attempts):
            try:
                await self.client.room_send(
                    room, "m.room.message", {"msgtype": "m.text", "body": body}
                )
            except StoreError as error:
                self.store_errors.append(error)
                await asyncio.sleep(0.2)
            else:
                self.sent.append(body)
                return
        raise AssertionError(f"{body!r} never went out")

    def seen(self, bodies: list[str]) -> bool:
        got = set(self.delivered.values())
        return all(body in got for body in bodies)


@pytest.fixture
async def chaos_db() -> AsyncIterator[DedicatedDatabase]:
    async with dedicated_database("olmstead_chaos") as db:
        yield db


async def pg_peer(url: str, database: PostgresDatabase, user: dict[str, Any]) -> Peer:
    store = await database.open_store(KEY, account=user["user_id"], lease=LEASE)
    client = Client(url, store=store)
    client.restore(session_of(url, user))
    await client.init_crypto()
    peer = Peer(client, user["user_id"])
    peer.watch()
    await client.sync_once()
    return peer


async def settle(peers: list[Peer], expected: dict[int, list[str]], seconds: float) -> None:
    """Wait until every peer has every message meant for it, or the time is up."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        if all(peers[i].seen(bodies) for i, bodies in expected.items()):
            return
        await asyncio.sleep(0.2)


def check_outcome(peer: Peer, expected: list[str]) -> None:
    """Every message meant for ``peer`` was delivered (an outage delays a room key, the
    outbox sends it once the store is back: none may be lost); no gap was left; the loop
    is alive; no key conflict."""
    assert peer.loop is not None
    assert not peer.loop.done(), peer.loop  # the loop never died
    missing = set(expected) - set(peer.delivered.values())
    assert not missing, (missing, peer.reported)
    assert peer.gaps == 0
    assert peer.client.machine is not None
    assert peer.client.machine.key_problem is None


def no_key_conflicts(caplog: pytest.LogCaptureFixture) -> None:
    text = caplog.text
    assert "already exists" not in text
    assert "OneTimeKeyConflict" not in text
    assert "key uploads stopped" not in text


async def test_connections_terminated_at_random_moments(
    homeserver: Any,
    new_user: Any,
    chaos_db: DedicatedDatabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    url = homeserver.base_url
    a_user, b_user = new_user(), new_user()
    database = await PostgresDatabase.open(chaos_db.dsn, pool_size=4)
    alice = await pg_peer(url, database, a_user)
    bob = await pg_peer(url, database, b_user)
    room = await alice.client.create_room(invite=[b_user["user_id"]])
    await bob.client.sync_once()
    await bob.client.join(room)
    for peer in (alice, bob):
        await peer.client.sync_once()  # the joined room's history, cut short: no gap
    for peer in (alice, bob):
        peer.loop = asyncio.create_task(peer.client.start(timeout_ms=500, timeline_limit=TIMELINE))

    kills = 0
    stop_chaos = asyncio.Event()

    async def chaos() -> None:
        nonlocal kills
        rng = random.Random()
        while not stop_chaos.is_set():
            await asyncio.sleep(rng.uniform(0.01, 0.15))
            kills += await chaos_db.terminate()

    chaos_task = asyncio.create_task(chaos())
    try:
        pace = random.Random()
        for n in range(15):  # about 8 s of conversation under fire
            await alice.send(room, f"alice {n}")
            await asyncio.sleep(pace.uniform(0, 0.5))
            await bob.send(room, f"bob {n}")
        stop_chaos.set()
        await chaos_task
        await settle([alice, bob], {0: bob.sent, 1: alice.sent}, 60)
        check_outcome(alice, bob.sent)
        check_outcome(bob, alice.sent)
        delivered = len(set(alice.delivered.values()) & set(bob.sent)) + len(
            set(bob.delivered.values()) & set(alice.sent)
        )
        loop_failures = caplog.text.count("the store failed")
        print(
            f"killed {kills} connections; {len(alice.store_errors) + len(bob.store_errors)} "
            f"sends and {loop_failures} syncs met a store error; {delivered} of 30 messages "
            "delivered"
        )
        assert kills > 30
        assert len(alice.sent) == len(bob.sent) == 15
        no_key_conflicts(caplog)
        # the store works on, and a commit that failed was reloaded without a false alarm
        assert "changed hands" not in caplog.text
    finally:
        stop_chaos.set()
        for peer in (alice, bob):
            peer.client.stop()
            if peer.loop is not None:
                await peer.loop
            await peer.client.close()
        await database.close()


async def test_database_refusing_connections_for_20_seconds(
    homeserver: Any,
    new_user: Any,
    chaos_db: DedicatedDatabase,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    url = homeserver.base_url
    a_user, b_user, c_user = new_user(), new_user(), new_user()
    database = await PostgresDatabase.open(chaos_db.dsn, pool_size=4)
    alice = await pg_peer(url, database, a_user)
    bob = await pg_peer(url, database, b_user)
    # carol's store is SQLite: she goes on talking while the others' database is away
    carol_client = await open_client(url, tmp_path / "carol.db", session_of(url, c_user))
    await carol_client.init_crypto()
    carol = Peer(carol_client, c_user["user_id"])
    carol.watch()
    room = await alice.client.create_room(invite=[b_user["user_id"], c_user["user_id"]])
    for peer in (bob, carol):
        await peer.client.sync_once()
        await peer.client.join(room)
    for peer in (alice, bob, carol):
        await peer.client.sync_once()  # the joined room's history, cut short: no gap
    for peer in (alice, bob, carol):
        peer.loop = asyncio.create_task(peer.client.start(timeout_ms=500, timeline_limit=TIMELINE))
    try:
        await alice.send(room, "before")
        await settle([alice, bob, carol], {1: alice.sent, 2: alice.sent}, 30)

        await chaos_db.refuse_connections()
        outage_started = asyncio.get_running_loop().time()
        for n in range(5):
            await carol.send(room, f"carol during the outage {n}")
        # alice's store is down: her message is not encrypted, let alone sent
        with pytest.raises(StoreConnectionLost):
            await alice.client.room_send(
                room, "m.room.message", {"msgtype": "m.text", "body": "lost"}
            )
        await asyncio.sleep(max(0.0, 20 - (asyncio.get_running_loop().time() - outage_started)))
        assert alice.loop is not None
        assert bob.loop is not None
        assert not alice.loop.done()
        assert not bob.loop.done()
        assert not any(b.startswith("carol") for b in alice.delivered.values())
        await chaos_db.allow_connections()

        await alice.send(room, "after")
        await bob.send(room, "bob after")
        await settle(
            [alice, bob, carol],
            {0: carol.sent + bob.sent, 1: carol.sent + alice.sent, 2: alice.sent + bob.sent},
            60,
        )
        check_outcome(alice, carol.sent + bob.sent)
        check_outcome(bob, carol.sent + alice.sent)
        check_outcome(carol, alice.sent + bob.sent)
        # nothing was lost: every message of the outage came through decrypted
        assert alice.seen(carol.sent)
        assert bob.seen(carol.sent)
        assert "lost" not in {*bob.delivered.values(), *carol.delivered.values()}
        assert "the store failed" in caplog.text  # the loops waited, with backoff
        assert "the store works again" in caplog.text
        no_key_conflicts(caplog)
    finally:
        await chaos_db.allow_connections()
        for peer in (alice, bob, carol):
            peer.client.stop()
            if peer.loop is not None:
                await peer.loop
        await alice.client.close()
        await bob.client.close()
        await close_client(carol_client)
        await database.close()
