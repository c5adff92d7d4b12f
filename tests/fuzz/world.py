"""Real machines for the fuzz suite: built once, restored to a snapshot before every example.

Every example starts from the same stored state: the victim's ``MemoryDatabase``
is copied from a snapshot and a machine is opened over the copy, so what one
example did (accepted or refused) cannot leak into the next. ``dump`` is what
"the store is unchanged" is compared on: everything a store holds but its lease.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from olmstead import KeysUploadRequest, LeaseSettings, MemoryDatabase, MemoryStore, OlmMachine
from tests.conftest import KEY
from tests.machine.pair import Peer
from tests.machine.test_keys_upload import Clock, ok, pass_device_check

T = TypeVar("T")

#: examples run between event-loop turns: a lease must outlast Hypothesis's own work
LONG_LEASE = LeaseSettings(duration=3600.0, renew_every=1800.0, wait=1.0, poll=0.01)

_loop = asyncio.new_event_loop()


def run(call: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
    """Run ``call`` on the suite's one event loop (Hypothesis drives plain functions)."""
    return _loop.run_until_complete(call)


async def fuzz_peer(user_id: str, device_id: str, clock: Clock | None = None) -> Peer:
    """A machine whose keys are published, as ``tests.machine.pair.new_peer`` makes one."""
    db, clock = MemoryDatabase(), clock or Clock()
    store = await MemoryStore.open(KEY, db, lease=LONG_LEASE)
    machine = await OlmMachine.open(store, user_id, device_id, clock=clock)
    await pass_device_check(machine, user_id, device_id)
    (upload,) = await machine.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    await machine.mark_request_as_sent(upload.request_id, ok(50))
    return Peer(machine, db, upload, clock)


def dump(db: MemoryDatabase) -> dict[str, Any]:
    """Everything ``db`` holds except its lease, to compare byte for byte."""
    return {f.name: copy.deepcopy(getattr(db, f.name)) for f in fields(db) if f.name != "lock"}


def unstorable(value: Any, where: str = "store") -> list[str]:
    """What in a dump no SQL backend could hold: strings with NUL or a lone surrogate,
    integers past 64 bits. The memory store takes anything; the others must too."""
    found: list[str] = []
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            found.append(f"{where}: a lone surrogate")
        if "\x00" in value:
            found.append(f"{where}: a NUL")
    elif isinstance(value, bool) or value is None or isinstance(value, float):
        pass
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            found.append(f"{where}: {value} is past 64 bits")
    elif isinstance(value, dict):
        for key, item in value.items():
            found += unstorable(key, f"{where} key")
            found += unstorable(item, f"{where}[{key!r:.40}]")
    elif isinstance(value, list | tuple | set):
        for item in value:
            found += unstorable(item, where)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            found += unstorable(getattr(value, name), f"{where}.{name}")
    return found


@dataclass
class Snapshot:
    """A peer's stored state, to open fresh machines over."""

    peer: Peer
    state: dict[str, Any]

    @classmethod
    def of(cls, peer: Peer) -> Snapshot:
        return cls(peer, dump(peer.db))

    async def restore(self) -> Peer:
        """A new machine over a copy of the snapshot (the caller closes its store)."""
        db = MemoryDatabase(**copy.deepcopy(self.state))
        store = await MemoryStore.open(KEY, db, lease=LONG_LEASE)
        peer = self.peer
        clock = Clock()
        clock.now = peer.clock.now
        machine = await OlmMachine.open(store, peer.user_id, peer.device_id, clock=clock)
        restored = Peer(machine, db, peer.published, clock)
        restored.claimed = set(peer.claimed)
        return restored
