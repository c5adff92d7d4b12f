"""The soak: messages keep coming while the receiver is killed and restarted at random
points, members join and leave, and a third of the receiver's syncs are dropped. A
third of the messages come before their room key (the sender holds the key back for a
few seconds), so they wait in the receiver's queue across kills; the key of the last
of them never comes. At the end every message was delivered exactly once or reported
as final.

Bounded for CI: 24 messages, under a minute. The counts are printed (``pytest -s``
shows them; they are in the report of a failure too).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from olmstead import Client, RoomSettings, ToDeviceRequest
from tests.integration.harness import close_client, session_of
from tests.integration.soak_receiver import KEY_WAIT
from tests.integration.test_messaging import crypto_client, two_in_a_room

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = 24
LAST_OF_DAVE = 22  # dave sends every third message, from the second on


def start_receiver(session: Any, store: Path, log: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.soak_receiver",
            json.dumps(session.__dict__),
            str(store),
            str(log),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_log(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


async def send_key_later(
    dave: Client, room: str, members: list[str], body: str
) -> tuple[str, list[ToDeviceRequest]]:
    """Dave sends a message under a new room key and holds the key back: its requests."""
    machine = dave.machine
    assert machine is not None
    await machine.update_tracked_users(members)
    await dave.process_outgoing()
    claim = await machine.get_missing_sessions(members)
    if claim is not None:
        await machine.mark_request_as_sent(claim.request_id, await dave.http.send(claim))
    # a key good for one message: every message of dave's comes with a new one
    held = await machine.share_room_key(room, members, RoomSettings(rotation_period_msgs=1))
    content = await machine.encrypt_room_event(
        room, "m.room.message", {"msgtype": "m.text", "body": body}
    )
    path = f"/_matrix/client/v3/rooms/{quote(room)}/send/m.room.encrypted/{body.replace(' ', '-')}"
    answer = await dave.http.request("PUT", path, content)
    return str(answer["event_id"]), held


async def release(dave: Client, held: list[ToDeviceRequest]) -> None:
    assert dave.machine is not None
    for request in held:
        await dave.machine.mark_request_as_sent(request.request_id, await dave.http.send(request))


def tally(entries: list[dict[str, Any]], sent: list[str]) -> dict[str, Any]:
    """Deliveries and final reports per message, and deliveries repeated after a commit."""
    delivered: dict[str, int] = {}
    final: set[str] = set()
    waited: set[str] = set()
    committed: set[str] = set()  # delivered in a sync whose commit completed
    uncommitted: set[str] = set()
    repeated_after_commit = []
    for entry in entries:
        kind = entry["kind"]
        if kind == "start":
            uncommitted.clear()  # the last run died with these not committed
        elif kind == "delivered":
            event_id = entry["event_id"]
            if event_id in committed:
                repeated_after_commit.append(event_id)
            delivered[event_id] = delivered.get(event_id, 0) + 1
            uncommitted.add(event_id)
        elif kind == "synced":
            committed |= uncommitted
            uncommitted.clear()
        elif kind == "reported" and entry["final"]:
            final.add(entry["event_id"])
        elif kind == "reported":
            waited.add(entry["event_id"])
    return {
        "delivered": sum(1 for e in sent if e in delivered),
        "reported": sum(1 for e in sent if e not in delivered and e in final),
        "lost": [e for e in sent if e not in delivered and e not in final],
        "waited": sum(1 for e in sent if e in waited),
        "redelivered_after_a_kill": sum(delivered.get(e, 0) - 1 for e in sent if e in delivered),
        "repeated_after_commit": repeated_after_commit,
        "delivered_and_reported_final": [e for e in sent if e in delivered and e in final],
    }


async def test_soak_every_message_is_delivered_once_or_reported(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    rng = random.Random(int(os.environ.get("OLMSTEAD_SOAK_SEED", time.time())))
    a_user, b_user, c_user, d_user = new_user(), new_user(), new_user(), new_user()
    (alice, _), (bob, _), room = await two_in_a_room(url, tmp_path, a_user, b_user)
    await close_client(bob)  # from now on bob lives in a process of his own
    carol, _ = await crypto_client(url, tmp_path / "carol.db", c_user)
    dave, _ = await crypto_client(url, tmp_path / "dave.db", d_user)
    invite = {"user_id": d_user["user_id"]}
    await alice.http.request("POST", f"/_matrix/client/v3/rooms/{room}/invite", invite)
    await dave.join(room)
    await alice.sync_once()
    held_back: list[tuple[float, list[ToDeviceRequest]]] = []
    never: list[ToDeviceRequest] = []
    log = tmp_path / "bob.jsonl"
    bob_session = session_of(url, b_user)
    receiver = start_receiver(bob_session, tmp_path / "bob.db", log)
    kills, sent, carol_in = 0, [], False
    kill_after = set(rng.sample(range(1, MESSAGES - 1), 6))  # killed after these messages
    try:
        for n in range(MESSAGES):
            if n % 6 == 3:  # carol joins, or leaves: the key is shared, or rotated
                if carol_in:
                    await carol.http.request("POST", f"/_matrix/client/v3/rooms/{room}/leave", {})
                else:
                    await alice.http.request(
                        "POST",
                        f"/_matrix/client/v3/rooms/{room}/invite",
                        {"user_id": c_user["user_id"]},
                    )
                    await carol.join(room)
                carol_in = not carol_in
                await alice.sync_once()
            if n % 3 == 1:  # dave's, its key a few seconds behind it
                members = [a_user, b_user, d_user] + ([c_user] if carol_in else [])
                event_id, held = await send_key_later(
                    dave, room, [u["user_id"] for u in members], f"soak {n}"
                )
                if n == LAST_OF_DAVE:  # its key never comes: it must be reported, as final
                    never = held
                else:
                    held_back.append((time.monotonic() + rng.uniform(1, 4), held))
            else:
                event_id = await alice.room_send(
                    room, "m.room.message", {"msgtype": "m.text", "body": f"soak {n}"}
                )
            sent.append(event_id)
            for due, held in [h for h in held_back if h[0] <= time.monotonic()]:
                await release(dave, held)
                held_back.remove((due, held))
            await asyncio.sleep(rng.uniform(0.1, 0.7))  # a random point of its work
            if n in kill_after:
                receiver.send_signal(signal.SIGKILL)
                receiver.wait()
                kills += 1
                await asyncio.sleep(rng.uniform(0, 1.5))
                receiver = start_receiver(bob_session, tmp_path / "bob.db", log)
            await alice.sync_once()
        for _due, held in held_back:
            await release(dave, held)
        deadline = time.monotonic() + KEY_WAIT + 60
        while time.monotonic() < deadline:
            counts = tally(read_log(log), sent)
            if not counts["lost"]:
                break
            assert receiver.poll() is None, receiver.stderr.read() if receiver.stderr else ""
            await asyncio.sleep(0.5)
    finally:
        receiver.send_signal(signal.SIGKILL)
        receiver.wait()
        await close_client(alice)
        await close_client(carol)
        await close_client(dave)

    entries = read_log(log)
    counts = tally(entries, sent)
    drops = sum(1 for e in entries if e["kind"] == "sync_dropped")
    print(
        f"\nsoak: {len(sent)} messages, {kills} kills, "
        f"{sum(1 for e in entries if e['kind'] == 'start')} starts, "
        f"{drops} dropped /sync calls, "
        f"{sum(1 for e in entries if e['kind'] == 'synced')} committed syncs; "
        f"delivered {counts['delivered']} ({counts['waited']} after waiting for their key), "
        f"reported {counts['reported']}, "
        f"lost {len(counts['lost'])}, delivered again after a kill before its commit "
        f"{counts['redelivered_after_a_kill']}"
    )
    assert kills == 6
    assert drops > 0
    assert counts["waited"] > 0  # the queue was in play
    assert never
    assert counts["reported"] >= 1  # at least the one whose key never came
    assert counts["lost"] == []
    assert counts["delivered"] + counts["reported"] == len(sent)
    # a delivery whose sync was committed never comes again; only one cut short by a kill
    assert counts["repeated_after_commit"] == []
    assert counts["delivered_and_reported_final"] == []
