"""Drives a room key share over SQLite stores and SIGKILLs itself at a chosen step.

Run by test_share_crash_safety.py as a separate process, so the kill is a real
one. Alice shares a room key with Bob and Carol (every device on its own SQLite
file); every request that leaves Alice's machine is appended (and fsynced) to a
log before the driver goes on, as the server would have received it.

    share_crash_driver.py DIR --crash-at POINT    # set up, share, encrypt an event
    share_crash_driver.py DIR --resume            # restart Alice: resend, share, encrypt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

from olmstead import KeysUploadRequest, LeaseSettings, OlmMachine, SqliteStore
from olmstead.requests import KeysQueryRequest, ToDeviceRequest
from tests.conftest import KEY
from tests.machine.pair import Peer
from tests.machine.test_keys_upload import Clock, ok, pass_device_check

ALICE, BOB, CAROL = "@alice:example.org", "@bob:example.org", "@carol:example.org"
DEVICES = {ALICE: "ALICEDEV", BOB: "BOBDEV", CAROL: "CAROLDEV"}
ROOM = "!share:example.org"
LEASE = LeaseSettings(duration=1.0, renew_every=0.3, wait=10.0)
POINTS = (
    "before_commit_share",  # the share is made in memory, nothing committed
    "after_commit_share",  # committed to the outbox, not handed to the network
    "after_send",  # the server has the request, its answer is not recorded
    "before_commit_confirm",  # the answer came, its commit did not happen
    "after_commit_confirm",  # the recipients are recorded as holding the key
)
state = {"phase": "setup"}


def crash_if(point: str, args: argparse.Namespace) -> None:
    if args.crash_at == point:
        os.kill(os.getpid(), signal.SIGKILL)


def log_sent(path: Path, tag: str, body: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"tag": tag, **body}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def to_device(request: ToDeviceRequest) -> dict[str, Any]:
    return {
        "request_id": request.request_id,
        "event_type": request.event_type,
        "messages": request.messages,
    }


async def open_device(folder: Path, user_id: str) -> Peer:
    store = await SqliteStore.open(folder / f"{DEVICES[user_id]}.db", KEY, lease=LEASE)
    clock = Clock()
    machine = await OlmMachine.open(store, user_id, DEVICES[user_id], clock=clock)
    if machine.device_keys_shared:
        return Peer(machine, None, None, clock)  # type: ignore[arg-type]
    await pass_device_check(machine, user_id, DEVICES[user_id])
    (upload,) = await machine.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    await machine.mark_request_as_sent(upload.request_id, ok(50))
    return Peer(machine, None, upload, clock)  # type: ignore[arg-type]


async def set_up(folder: Path) -> Peer:
    """Alice with Olm sessions with Bob's and Carol's devices; they close cleanly."""
    alice = await open_device(folder, ALICE)
    others = [await open_device(folder, user) for user in (BOB, CAROL)]
    await alice.machine.update_tracked_users([BOB, CAROL])
    (query,) = [
        r for r in await alice.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)
    ]
    answer: dict[str, Any] = {"device_keys": {}, "failures": {}}
    for peer in others:
        answer["device_keys"].update(peer.query_answer()["device_keys"])
    await alice.machine.mark_request_as_sent(query.request_id, answer)
    claim = await alice.machine.get_missing_sessions([BOB, CAROL])
    assert claim is not None
    claimed: dict[str, Any] = {"one_time_keys": {}}
    for peer in others:
        claimed["one_time_keys"].update(peer.claim_answer()["one_time_keys"])
    await alice.machine.mark_request_as_sent(claim.request_id, claimed)
    for peer in others:
        await peer.machine.store.close()
    return alice


def install_hooks(machine: OlmMachine, args: argparse.Namespace) -> None:
    original = machine.store.save_changes

    async def save_changes(changes: Any, *, generation: int | None = None) -> None:
        if state["phase"] == "share":
            crash_if("before_commit_share", args)
        if state["phase"] == "confirm":
            crash_if("before_commit_confirm", args)
        await original(changes, generation=generation)
        if state["phase"] == "share":
            crash_if("after_commit_share", args)
        if state["phase"] == "confirm":
            crash_if("after_commit_confirm", args)

    machine.store.save_changes = save_changes  # type: ignore[method-assign]


async def send_and_confirm(
    machine: OlmMachine, request: ToDeviceRequest, log: Path, tag: str
) -> None:
    log_sent(log, tag, to_device(request))
    state["phase"] = "sent"
    crash_if("after_send", ARGS)
    state["phase"] = "confirm"
    await machine.mark_request_as_sent(request.request_id, {})
    state["phase"] = "done"


async def encrypt_event(machine: OlmMachine, log: Path, tag: str) -> None:
    content = await machine.encrypt_room_event(ROOM, "m.room.message", {"body": tag})
    log_sent(log, "event", {"content": content, "body": tag})


async def main(args: argparse.Namespace) -> None:
    folder = Path(args.dir)
    log = folder / "sent.jsonl"
    if args.resume:
        alice = await open_device(folder, ALICE)
        machine = alice.machine
        for request in await machine.outgoing_requests():
            if isinstance(request, ToDeviceRequest):
                await send_and_confirm(machine, request, log, "resent")
        for request in await machine.share_room_key(ROOM, [BOB, CAROL]):
            await send_and_confirm(machine, request, log, "shared_after_restart")
        await encrypt_event(machine, log, "after the restart")
        await machine.store.close()
        return
    alice = await set_up(folder)
    install_hooks(alice.machine, args)
    state["phase"] = "share"
    requests = await alice.machine.share_room_key(ROOM, [BOB, CAROL])
    state["phase"] = "shared"
    for request in requests:
        await send_and_confirm(alice.machine, request, log, "shared")
    await encrypt_event(alice.machine, log, "before the restart")
    await alice.machine.store.close()


parser = argparse.ArgumentParser()
parser.add_argument("dir")
parser.add_argument("--crash-at", choices=POINTS)
parser.add_argument("--resume", action="store_true")
ARGS = parser.parse_args() if __name__ == "__main__" else argparse.Namespace(crash_at=None)

if __name__ == "__main__":
    asyncio.run(main(ARGS))
