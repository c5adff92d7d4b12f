"""Every encrypted event reaches the application once, or the application is told why:
against the real Synapse, across a restart of the receiving client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from olmstead import Client, RoomEvent, RoomKeyWithheld, UnknownRoomKey
from olmstead.requests import ToDeviceRequest
from tests.integration.harness import Wire, close_client, open_client, session_of
from tests.integration.share_crash_client import POINTS
from tests.integration.test_messaging import messages, two_in_a_room


async def held_back_event(alice: Client, members: list[str], room: str, body: str) -> list[Any]:
    """Alice sends an event whose room key she keeps back; the key requests, unsent."""
    machine = alice.machine
    assert machine is not None
    await machine.update_tracked_users(members)
    await alice.process_outgoing()
    claim = await machine.get_missing_sessions(members)
    if claim is not None:
        await machine.mark_request_as_sent(claim.request_id, await alice.http.send(claim))
    held_back = await machine.share_room_key(room, members)
    content = await machine.encrypt_room_event(room, "m.room.message", {"body": body})
    await alice.http.request(
        "PUT", f"/_matrix/client/v3/rooms/{room}/send/m.room.encrypted/{body}", content
    )
    return held_back


async def test_an_event_waits_for_its_key_across_a_restart_and_arrives_once(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    a_user, b_user = new_user(), new_user()
    (alice, _), (bob, bob_seen), room = await two_in_a_room(url, tmp_path, a_user, b_user)
    held_back = await held_back_event(alice, [a_user["user_id"], b_user["user_id"]], room, "early")

    await bob.sync_once()
    (told,) = [e for e in bob_seen if not isinstance(e, RoomEvent)]
    assert isinstance(told, UnknownRoomKey)
    assert told.final is False
    assert messages(bob_seen) == []
    await close_client(bob)  # the bot restarts before the key comes

    seen: list[Any] = []

    async def restarted() -> Client:
        client = await open_client(url, tmp_path / "bob.db", session_of(url, b_user))
        await client.init_crypto()
        client.on_room_event(seen.append)
        client.on_decryption_failure(lambda room, event, error: seen.append(error))
        return client

    bob = await restarted()
    await bob.sync_once()
    assert seen == []  # nothing new: still waiting, already told
    for request in held_back:
        assert isinstance(request, ToDeviceRequest)
        await alice.machine.mark_request_as_sent(  # type: ignore[union-attr]
            request.request_id, await alice.http.send(request)
        )
    await bob.sync_once()
    assert messages(seen) == [(a_user["user_id"], "early", True)]
    await bob.sync_once()
    await close_client(bob)
    bob = await restarted()
    await bob.sync_once()
    assert messages(seen) == [(a_user["user_id"], "early", True)]  # exactly once
    assert [e for e in seen if not isinstance(e, RoomEvent)] == []
    assert bob.store is not None
    assert await bob.store.count_waiting_events() == 0
    await close_client(alice)
    await close_client(bob)


async def test_a_withheld_key_is_reported_with_its_code(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    a_user, b_user = new_user(), new_user()
    (alice, _), (bob, bob_seen), room = await two_in_a_room(url, tmp_path, a_user, b_user)
    await held_back_event(alice, [a_user["user_id"], b_user["user_id"]], room, "withheld")
    await bob.sync_once()
    content = await alice.machine.encrypt_room_event(room, "m.room.message", {"body": "x"})  # type: ignore[union-attr]
    assert bob.machine is not None
    notice = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": room,
        "session_id": content["session_id"],
        "sender_key": alice.machine.identity_keys["curve25519"],  # type: ignore[union-attr]
        "code": "m.unverified",
        "reason": "this device is not verified",
    }
    messages_ = {b_user["user_id"]: {b_user["device_id"]: notice}}
    await alice.http.send(ToDeviceRequest("withheld-test", "m.room_key.withheld", messages_))
    await bob.sync_once()
    reports = [e for e in bob_seen if not isinstance(e, RoomEvent)]
    assert [type(e) for e in reports] == [UnknownRoomKey, RoomKeyWithheld]
    assert isinstance(reports[1], RoomKeyWithheld)
    assert (reports[1].code, reports[1].final) == ("m.unverified", False)
    await close_client(alice)
    await close_client(bob)


@pytest.mark.parametrize("point", POINTS)
async def test_a_share_killed_at_any_step_reaches_every_member_after_the_restart(
    homeserver: Any, new_user: Any, tmp_path: Path, point: str
) -> None:
    url = homeserver.base_url
    a_user, b_user = new_user(), new_user()
    (alice, _), (bob, bob_seen), room = await two_in_a_room(url, tmp_path, a_user, b_user)
    await close_client(alice)
    sent = tmp_path / "sent.jsonl"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.share_crash_client",
            json.dumps(session_of(url, a_user).__dict__),
            str(tmp_path / "alice.db"),
            room,
            str(sent),
            point,
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'src'}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (crashed,) = [json.loads(line) for line in sent.read_text().splitlines()]

    wire = Wire()
    alice = await open_client(url, tmp_path / "alice.db", session_of(url, a_user), wire)
    await alice.init_crypto()  # the outbox goes out first
    resent = [path for _m, path, _p in wire.requests if "/sendToDevice/" in path]
    if point == "message_before":
        assert resent == []  # confirmed before the kill: nothing to send again
    else:
        assert resent == [crashed["path"]]  # the same transaction ID
    await alice.sync_once()
    await alice.room_send(room, "m.room.message", {"body": "after the restart"})
    await bob.sync_once()
    await bob.sync_once()
    assert (a_user["user_id"], "after the restart", True) in messages(bob_seen)
    assert [e for e in bob_seen if not isinstance(e, RoomEvent)] == []
    await close_client(alice)
    await close_client(bob)
