"""Drives a machine over an SQLite store and SIGKILLs itself at a chosen step.

Run by test_crash_safety.py as a separate process, so the kill is a real one:
nothing is flushed, no ``finally`` runs. Every request that "leaves the machine"
is appended (and fsynced) to a log before the driver goes on, as a network would
have seen it.

    crash_driver.py STORE LOG --crash-at POINT --cycle N    # run two upload cycles
    crash_driver.py STORE LOG --resume                      # reopen, log what it sends
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from typing import Any

from olmstead import KeysUploadRequest, LeaseSettings, OlmMachine, SqliteStore
from olmstead.keys_upload import KeysUpload
from olmstead.store.base import CryptoStore
from tests.conftest import KEY
from tests.machine.test_keys_upload import outgoing, pass_device_check

USER, DEVICE = "@crash:example.org", "CRASHDEV"
POINTS = (
    "after_generate",  # keys made in memory, not committed
    "after_commit_generated",  # committed, request not handed out
    "after_handout",  # the request left the machine, no answer yet
    "before_commit_response",  # the server answered, nothing recorded
    "after_commit_response",  # the answer is committed
)

state = {"phase": "open", "cycle": 0}


def crash_if(point: str, args: argparse.Namespace) -> None:
    if args.crash_at == point and state["cycle"] == args.cycle:
        os.kill(os.getpid(), signal.SIGKILL)


def log_sent(path: str, tag: str, body: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"tag": tag, "body": body}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def install_hooks(store: CryptoStore, args: argparse.Namespace) -> None:
    original_top_up = KeysUpload.top_up
    original_save = store.save_changes

    def top_up(self: KeysUpload, record: Any, now: float) -> None:
        original_top_up(self, record, now)
        crash_if("after_generate", args)

    async def save_changes(changes: Any, *, generation: int | None = None) -> None:
        if state["phase"] == "mark":
            crash_if("before_commit_response", args)
        await original_save(changes, generation=generation)
        crash_if(
            "after_commit_generated" if state["phase"] == "outgoing" else "after_commit_response",
            args,
        )

    KeysUpload.top_up = top_up  # type: ignore[method-assign]
    store.save_changes = save_changes  # type: ignore[method-assign]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("log")
    parser.add_argument("--crash-at", choices=POINTS)
    parser.add_argument("--cycle", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    # a short lease: the restart waits out the killed holder's lease before it proceeds
    store = await SqliteStore.open(
        args.store, KEY, lease=LeaseSettings(duration=1.0, renew_every=0.3)
    )
    machine = await OlmMachine.open(store, USER, DEVICE)
    # the server knows no keys for this device, and takes its claim of the device ID
    # (one key, before the cycles below: the claim is an upload like the others, a
    # pure function of the committed account)
    await pass_device_check(machine, USER, DEVICE)
    if args.resume:
        requests = await outgoing(machine)
        log_sent(args.log, "resume", requests[0].body() if requests else {})
        await store.close()
        return

    install_hooks(store, args)
    for cycle in (1, 2):
        state["cycle"], state["phase"] = cycle, "outgoing"
        (upload,) = await outgoing(machine)
        assert isinstance(upload, KeysUploadRequest)
        log_sent(args.log, f"cycle{cycle}", upload.body())
        crash_if("after_handout", args)
        state["phase"] = "mark"
        await machine.mark_request_as_sent(
            upload.request_id, {"one_time_key_counts": {"signed_curve25519": 50}}
        )
        state["phase"] = "sync"
        await machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": 10})
    await store.close()


if __name__ == "__main__":
    asyncio.run(main())
