"""The benchmarks at CI size (``--quick``), so they never rot: every row, with numbers.

Against the session's Synapse and the test PostgreSQL. No timing is asserted
(a shared machine makes timed assertions flaky): only that every benchmark ran,
did its work correctly (the benchmarks check their own results) and produced a
figure beside a baseline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import main
from tests.conftest import POSTGRES_DSN, postgres_or_skip

EXPECTED = [
    "encrypt 300 room events",
    "decrypt 300 room events",
    "/keys/query answer, 10 devices",
    "/keys/claim answer, 10 Olm sessions",
    "share a room key to 10 devices",
    "first encrypted send, 3 devices (Synapse)",
    *(
        f"{backend}, 2,000 sessions: {figure}"
        for backend in ("SQLite", "PostgreSQL")
        for figure in ("open", "lookup p50", "lookup p99", "peak memory")
    ),
]


async def test_quick_benchmarks_print_every_row(
    homeserver: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await postgres_or_skip()
    rows = await main(
        [
            "--quick",
            "--homeserver",
            homeserver.base_url,
            "--store-cache",
            str(tmp_path / "cache"),
            "--postgres",
            POSTGRES_DSN,
        ]
    )
    assert [row.name for row in rows] == EXPECTED
    for row in rows:
        assert math.isfinite(row.figure), row
        assert row.figure > 0, row
        assert math.isfinite(row.baseline), row
        assert row.baseline > 0, row
        assert math.isfinite(row.ratio), row
    printed = capsys.readouterr().out
    for name in EXPECTED:
        assert name in printed
    assert printed.count("\n|") == len(EXPECTED) + 1  # the header rule and one line a row

    # a second run reuses the stores it built rather than building them again
    cache = sorted(p.name for p in (tmp_path / "cache").iterdir())
    again = await main(
        ["--quick", "--only", "store-sqlite", "--store-cache", str(tmp_path / "cache")]
    )
    assert [row.name for row in again] == EXPECTED[6:10]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cache
