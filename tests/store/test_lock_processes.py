"""Two processes on one SQLite store: one writer at a time, waits, timeouts, dead holders."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import POSTGRES_DSN, postgres_or_skip

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgres"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the processes meet: an SQLite file, or one account in PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "shared.db")
    asyncio.run(postgres_or_skip())
    return f"{POSTGRES_DSN}#lock-{uuid.uuid4().hex}"


class Procs:
    def __init__(self, tmp_path: Path, store: str) -> None:
        self.store = store
        self.events_path = tmp_path / "events.jsonl"
        self.events_path.touch()

    def start(self, name: str, hold: float, wait: float) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.store.lock_driver",
                str(self.store),
                str(self.events_path),
                name,
                "--hold",
                str(hold),
                "--wait",
                str(wait),
            ],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.events_path.read_text().splitlines()]

    def wait_for(self, name: str, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if e["name"] == name and e["event"] == kind:
                    return e
            time.sleep(0.02)
        raise AssertionError(f"{name} never reported {kind}: {self.events()}")


def test_second_process_waits_for_the_first_and_sees_its_writes(
    tmp_path: Path, store_spec: str
) -> None:
    procs = Procs(tmp_path, store_spec)
    first = procs.start("first", hold=1.5, wait=5)
    got_first = procs.wait_for("first", "acquired")
    second = procs.start("second", hold=0, wait=20)
    assert first.wait(30) == 0
    assert second.wait(30) == 0, second.stderr

    released = procs.wait_for("first", "releasing")
    got_second = procs.wait_for("second", "acquired")
    assert got_second["t"] >= released["t"]  # never both at once
    assert got_second["previous_writer"] == "first"
    assert got_second["ed25519"] == got_first["ed25519"]  # the same device, not a new one
    assert (got_first["generation"], got_second["generation"]) == (1, 2)


def test_second_process_gives_up_naming_the_holder(tmp_path: Path, store_spec: str) -> None:
    procs = Procs(tmp_path, store_spec)
    first = procs.start("first", hold=4, wait=5)
    got_first = procs.wait_for("first", "acquired")
    second = procs.start("second", hold=0, wait=0.5)
    assert second.wait(30) == 3
    locked = procs.wait_for("second", "locked")
    assert locked["holder"] == "first"
    assert abs(locked["since"] - got_first["t"]) < 2.0
    assert first.wait(30) == 0
    assert not [e for e in procs.events() if e["name"] == "second" and e["event"] == "acquired"]


def test_a_killed_holder_is_replaced_once_its_lease_expires(
    tmp_path: Path, store_spec: str
) -> None:
    procs = Procs(tmp_path, store_spec)
    first = procs.start("first", hold=60, wait=5)
    got_first = procs.wait_for("first", "acquired")
    time.sleep(0.3)  # let it commit its write
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    killed_at = time.time()
    second = procs.start("second", hold=0, wait=20)
    assert second.wait(30) == 0, second.stderr

    got_second = procs.wait_for("second", "acquired")
    assert got_second["previous_writer"] == "first"
    assert got_second["ed25519"] == got_first["ed25519"]
    assert got_second["generation"] == 2
    assert got_second["t"] - killed_at < 5.0  # a lease lasts 1 s; no wait for the full 20
