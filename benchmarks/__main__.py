"""``python -m benchmarks``: run the benchmarks and print one table.

Full sizes by default (what the README reports); ``--quick`` shrinks every size
so the whole run takes seconds (the test suite runs it that way so the
benchmarks never rot). ``--only`` picks benchmarks by name.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import device_keys, megolm_events, store_size
from benchmarks.table import Row, render

NAMES = ("megolm", "devices", "first-send", "store-sqlite", "store-postgres")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=NAMES,
        default=list(NAMES),
        metavar="NAME",
        help=f"run only these ({', '.join(NAMES)})",
    )
    parser.add_argument(
        "--repeat", type=int, help="runs per figure, the best kept (default 5, quick 1)"
    )
    parser.add_argument("--events", type=int, help="room events (default 10,000)")
    parser.add_argument(
        "--devices", type=int, help="devices to query, claim, share to (default 150)"
    )
    parser.add_argument("--send-devices", type=int, help="devices for the first send (default 50)")
    parser.add_argument(
        "--sessions", type=int, help="sessions in the big store (default 1,000,000)"
    )
    parser.add_argument(
        "--homeserver", help="a running Synapse's base URL (default: start a throwaway one)"
    )
    parser.add_argument(
        "--store-cache",
        type=Path,
        default=Path(".benchmark-cache"),
        help="where the big stores are built once and kept (default ./.benchmark-cache)",
    )
    parser.add_argument(
        "--postgres",
        default=store_size.DEFAULT_POSTGRES,
        help="PostgreSQL DSN for the store benchmark (created if missing)",
    )
    return parser


def _judged(rows: list[Row], at_target_size: bool) -> list[Row]:
    """The targets hold for the issue's sizes: at other sizes the rows are not judged."""
    if at_target_size:
        return rows
    return [replace(row, target="at full size only", met=None) for row in rows]


async def main(argv: list[str] | None = None) -> list[Row]:
    args = _parser().parse_args(argv)
    quick = args.quick
    repeat = args.repeat or (1 if quick else 5)
    events = args.events or (300 if quick else 10_000)
    devices = args.devices or (10 if quick else 150)
    send_devices = args.send_devices or (3 if quick else 50)
    sessions = args.sessions or (2_000 if quick else 1_000_000)
    logging.getLogger("nio").setLevel(logging.ERROR)  # nio warns for every session it makes
    rows: list[Row] = []
    started = time.monotonic()
    if "megolm" in args.only:
        rows += _judged(await megolm_events.run(events, repeat), events == 10_000)
    if "devices" in args.only:
        rows += _judged(await device_keys.run(devices, repeat), devices == 150)
    if "first-send" in args.only:
        from benchmarks import first_send  # needs matrix-nio: only when asked for

        ran = await first_send.run(send_devices, args.homeserver, min(repeat, 5))
        rows += _judged(ran, send_devices == 50)
    backends = [b for b in ("sqlite", "postgres") if f"store-{b}" in args.only]
    if backends:
        cache = args.store_cache.expanduser()
        ran = await store_size.run(
            sessions, backends, cache, args.postgres, 3 if quick else 11, min(repeat, 3)
        )
        rows += _judged(ran, sessions == 1_000_000)
    print(render(rows))
    print(
        f"\n{platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}, best of {repeat}; "
        "ratio = olmstead's time / the baseline's time (lower is better); "
        f"{time.monotonic() - started:.0f} s",
    )
    return rows


if __name__ == "__main__":
    rows = asyncio.run(main(sys.argv[1:]))
    sys.exit(0)
