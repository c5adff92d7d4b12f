"""Bootstraps cross-signing over an SQLite store and SIGKILLs itself at a chosen step.

Run by test_cross_signing_crash.py as a separate process. Every request that leaves
the machine is logged (fsynced) first, as the network would have seen it; the
server's view of our keys is kept in a JSON file beside the store.

    cross_signing_crash_driver.py STORE LOG --crash-at POINT --step N
    cross_signing_crash_driver.py STORE LOG --resume
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from typing import Any

from olmstead import LeaseSettings, OlmMachine, SqliteStore
from tests.conftest import KEY
from tests.machine.crash_driver import log_sent
from tests.machine.test_cross_signing import ITERATIONS, OwnKeys, settle
from tests.machine.test_keys_upload import ok, pass_device_check

USER, DEVICE = "@bot:example.org", "CRASHDEV"
POINTS = (
    "after_bootstrap_commit",  # keys and outbox committed, nothing handed out
    "after_handout",  # request N left, no answer
    "before_commit_response",  # the server answered request N, nothing recorded
    "after_commit_response",  # the answer to request N is committed
)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("log")
    parser.add_argument("--crash-at", choices=POINTS)
    parser.add_argument("--step", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    store = await SqliteStore.open(
        args.store, KEY, lease=LeaseSettings(duration=1.0, renew_every=0.3)
    )
    machine = await OlmMachine.open(store, USER, DEVICE)
    if not machine.device_keys_shared:
        await pass_device_check(machine, USER, DEVICE)
        (upload,) = await machine.outgoing_requests()
        await machine.mark_request_as_sent(upload.request_id, ok(50))
        await settle(machine)

    def crash(point: str, step: int = 0) -> None:
        if args.crash_at == point and step == args.step:
            os.kill(os.getpid(), signal.SIGKILL)

    server = OwnKeys()
    server.add_device(machine)
    key = await machine.bootstrap_cross_signing(server.query(), iterations=ITERATIONS)
    log_sent(args.log, "recovery_key", {"key": key})
    crash("after_bootstrap_commit")
    step = 0
    while True:
        requests = await machine.outgoing_requests()
        if not requests:
            break
        for request in requests:
            body: dict[str, Any] = json.loads(json.dumps(request.body()))
            log_sent(args.log, f"step{step}", {"id": request.request_id, "body": body})
            if args.resume:
                await store.close()
                return
            crash("after_handout", step)
            answer = server.take(request)
            original = store.save_changes

            async def save(
                changes: Any,
                *,
                generation: int | None = None,
                step: int = step,
                original: Any = original,
            ) -> None:
                crash("before_commit_response", step)
                await original(changes, generation=generation)
                crash("after_commit_response", step)

            store.save_changes = save  # type: ignore[method-assign]
            await machine.mark_request_as_sent(request.request_id, answer)
            store.save_changes = original  # type: ignore[method-assign]
            step += 1
    log_sent(args.log, "done", {})
    await store.close()


if __name__ == "__main__":
    asyncio.run(main())
