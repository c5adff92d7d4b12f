"""SIGKILL at each step of a room key share: after a restart every recipient can decrypt.

Each case kills a real process (share_crash_driver.py) at one step of Alice's
share with Bob and Carol, restarts Alice from her SQLite store, and then hands
Bob and Carol everything that left Alice's machine, as the server would: a
transaction ID it already has is not delivered twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from olmstead import OlmMachine, SqliteStore
from olmstead.sessions.olm_sessions import DecryptedToDevice
from tests.conftest import KEY
from tests.machine.share_crash_driver import ALICE, BOB, CAROL, DEVICES, LEASE, POINTS, ROOM

ROOT = Path(__file__).resolve().parents[2]


def run_driver(folder: Path, *args: str) -> int:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.machine.share_crash_driver", str(folder), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    return proc.returncode


async def reads_everything(folder: Path, user_id: str, log: list[dict[str, Any]]) -> list[str]:
    """What ``user_id`` reads of Alice's room events, given what reached the server."""
    store = await SqliteStore.open(folder / f"{DEVICES[user_id]}.db", KEY, lease=LEASE)
    machine = await OlmMachine.open(store, user_id, DEVICES[user_id])
    delivered: set[str] = set()
    bodies = []
    for n, entry in enumerate(log):
        if entry["tag"] == "event":
            event = {
                "type": "m.room.encrypted",
                "event_id": f"$e{n}",
                "sender": ALICE,
                "origin_server_ts": n,
                "content": entry["content"],
            }
            bodies.append((await machine.decrypt_room_event(ROOM, event)).content["body"])
            continue
        if entry["request_id"] in delivered:  # the same transaction ID: the server drops it
            continue
        delivered.add(entry["request_id"])
        mine = entry["messages"].get(user_id, {}).get(DEVICES[user_id])
        if mine is not None:
            (got,) = await machine.receive_sync_changes(
                to_device_events=[{"type": entry["event_type"], "sender": ALICE, "content": mine}]
            )
            assert isinstance(got, DecryptedToDevice), got
    await store.close()
    return bodies


@pytest.mark.parametrize("point", POINTS)
def test_every_recipient_decrypts_after_a_kill_at_any_step(tmp_path: Path, point: str) -> None:
    assert run_driver(tmp_path, "--crash-at", point) == -signal.SIGKILL
    assert run_driver(tmp_path, "--resume") == 0
    log = [json.loads(line) for line in (tmp_path / "sent.jsonl").read_text().splitlines()]
    before = [e for e in log if e["tag"] == "shared"]
    resent = [e for e in log if e["tag"] == "resent"]
    again = [e for e in log if e["tag"] == "shared_after_restart"]

    if point == "before_commit_share":  # nothing committed, nothing left: a new share
        assert (before, resent) == ([], [])
        assert len(again) == 1
    elif point == "after_commit_share":  # committed, never sent: sent now
        assert before == []
        assert len(resent) == 1
        assert again == []
    elif point in ("after_send", "before_commit_confirm"):  # sent, not confirmed: again
        assert len(before) == 1
        # unchanged: the same transaction ID, the same ciphertext
        assert [{**e, "tag": ""} for e in resent] == [{**e, "tag": ""} for e in before]
        assert again == []
    else:  # confirmed: nothing goes out again
        assert len(before) == 1
        assert (resent, again) == ([], [])
    for user in (BOB, CAROL):
        bodies = asyncio.run(reads_everything(tmp_path, user, log))
        assert bodies[-1] == "after the restart"
        assert all(shared["messages"][user] for shared in before + resent + again)
