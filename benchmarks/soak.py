"""A long run through two machines: does memory stay flat, and how fast does the store grow?

``python -m benchmarks.soak [--events 100000] [--batch 100] [--trace]``

Alice encrypts room events in batches (a bridge's queue), Bob decrypts them (a sync's
timeline), both on SQLite stores, with the room key rotated every 100 messages as
rooms do by default: every rotation is a new Megolm session, shared with Bob over
Olm. Prints resident memory (RSS) at the start, after warm-up (the first tenth) and
at the end, the growth after warm-up per 100,000 events against the target (at most
5 MB), and the store's growth per 1,000 events, table by table. ``--trace`` also
runs tracemalloc from the warm-up on and prints where memory grew the most.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.megolm_events import ROOM, _content, _pair
from benchmarks.peers import BenchDevice
from olmstead import RoomSettings
from olmstead.store.stats import TableStats, sqlite_table_stats

__all__ = ["SoakResult", "run"]

#: growth after warm-up allowed per 100,000 events
TARGET_MB_PER_100K = 5.0


@dataclass(frozen=True)
class SoakResult:
    events: int
    seconds: float
    rss_start: float
    rss_warm: float
    rss_end: float
    warm_events: int
    #: store bytes per table after warm-up and at the end (Bob's store: the receiving side)
    store_warm: list[TableStats]
    store_end: list[TableStats]
    top_growth: list[str]

    @property
    def growth_per_100k(self) -> float:
        after = self.events - self.warm_events
        return (self.rss_end - self.rss_warm) / after * 100_000 if after else 0.0


def rss_mb() -> float:
    """This process's resident memory, MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _rotate_and_share(alice: BenchDevice, bob: BenchDevice) -> None:
    """A new room key when the last one is spent, and Bob gets it over Olm."""
    settings = RoomSettings()  # rotation every 100 messages, as rooms do by default
    for share in await alice.machine.share_room_key(ROOM, [bob.user_id], settings):
        await alice.machine.mark_request_as_sent(share.request_id, {})
        content = share.messages.get(bob.user_id, {}).get(bob.device_id)
        if content is not None:
            event = {"type": share.event_type, "sender": alice.user_id, "content": content}
            await bob.machine.receive_sync_changes(to_device_events=[event])


async def _batch(alice: BenchDevice, bob: BenchDevice, first: int, size: int) -> None:
    await _rotate_and_share(alice, bob)
    contents = [("m.room.message", _content(first + n)) for n in range(size)]
    encrypted = await alice.machine.encrypt_room_events(ROOM, contents)
    timeline: list[dict[str, Any]] = [
        {
            "type": "m.room.encrypted",
            "sender": alice.user_id,
            "event_id": f"$e{first + n}",
            "origin_server_ts": 1_700_000_000_000 + first + n,
            "room_id": ROOM,
            "content": content,
        }
        for n, content in enumerate(encrypted)
    ]
    results = await bob.machine.decrypt_room_events(ROOM, timeline)
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise AssertionError(f"{len(failed)} of {size} events did not decrypt: {failed[0]}")


async def run(events: int, batch: int = 100, trace: bool = False) -> SoakResult:
    with tempfile.TemporaryDirectory(prefix="olmstead-soak-") as tmp:
        directory = Path(tmp)
        alice, bob = await _pair(directory, 99)  # its first key lasts 100 events too
        started = time.perf_counter()
        gc.collect()
        rss_start = rss_mb()
        warm_events = max(batch, (events // 10) // batch * batch)
        rss_warm, store_warm, snapshot = rss_start, [], None
        try:
            for first in range(0, events, batch):
                await _batch(alice, bob, first, min(batch, events - first))
                if first + batch == warm_events:
                    gc.collect()
                    rss_warm = rss_mb()
                    store_warm = sqlite_table_stats(directory / "BOB.db")
                    if trace:
                        tracemalloc.start(10)
                        snapshot = tracemalloc.take_snapshot()
            gc.collect()
            rss_end = rss_mb()
            top: list[str] = []
            if snapshot is not None:
                stats = tracemalloc.take_snapshot().compare_to(snapshot, "traceback")
                for stat in stats[:8]:
                    frame = stat.traceback.format()[-2:]
                    top.append(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d}  {frame}")
                tracemalloc.stop()
            store_end = sqlite_table_stats(directory / "BOB.db")
        finally:
            await alice.close()
            await bob.close()
        seconds = time.perf_counter() - started
    return SoakResult(
        events, seconds, rss_start, rss_warm, rss_end, warm_events, store_warm, store_end, top
    )


def report(result: SoakResult) -> str:
    met = "yes" if result.growth_per_100k <= TARGET_MB_PER_100K else "NO"
    lines = [
        f"{result.events:,} room events through two machines (SQLite) in "
        f"{result.seconds:.0f} s ({result.events / result.seconds:,.0f}/s)",
        f"RSS: start {result.rss_start:.1f} MB, after warm-up ({result.warm_events:,} events) "
        f"{result.rss_warm:.1f} MB, end {result.rss_end:.1f} MB",
        f"growth after warm-up: {result.growth_per_100k:+.2f} MB per 100,000 events "
        f"(target <= {TARGET_MB_PER_100K:.0f} MB: {'met' if met == 'yes' else 'NOT met'})",
        "store growth per 1,000 events after warm-up (receiving side):",
    ]
    after = (result.events - result.warm_events) / 1000
    warm = {t.table: t for t in result.store_warm}
    for table in result.store_end:
        before = warm.get(table.table, TableStats(table.table, 0, 0))
        if table.rows != before.rows or table.bytes != before.bytes:
            rows = (table.rows - before.rows) / after if after else 0.0
            size = (table.bytes - before.bytes) / after / 1024 if after else 0.0
            lines.append(f"  {table.table:<26} {rows:+9.1f} rows {size:+9.1f} KiB")
    if result.top_growth:
        lines.append("where memory grew most after warm-up (tracemalloc):")
        lines.extend(f"  {line}" for line in result.top_growth)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100, help="events per batch (a sync)")
    parser.add_argument("--trace", action="store_true", help="profile with tracemalloc")
    args = parser.parse_args()
    print(report(asyncio.run(run(args.events, args.batch, args.trace))))


if __name__ == "__main__":
    main()
