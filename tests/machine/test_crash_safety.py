"""SIGKILL between every step of a key upload: never a different key under an ID that left.

Each case kills a real process (crash_driver.py) at one step of one of two upload
cycles, restarts the device from its SQLite store, and compares what the
restarted machine sends with everything that had left the machine before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.machine.crash_driver import POINTS

ROOT = Path(__file__).resolve().parents[2]


def run_driver(tmp_path: Path, *args: str) -> int:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.machine.crash_driver",
            str(tmp_path / "s.db"),
            str(tmp_path / "sent.jsonl"),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    return proc.returncode


def sent(tmp_path: Path) -> list[tuple[str, dict[str, Any]]]:
    lines = (tmp_path / "sent.jsonl").read_text().splitlines()
    return [(e["tag"], e["body"]) for e in map(json.loads, lines)]


@pytest.mark.parametrize("cycle", [1, 2])
@pytest.mark.parametrize("point", POINTS)
def test_restart_resends_the_same_keys_or_none(tmp_path: Path, point: str, cycle: int) -> None:
    assert run_driver(tmp_path, "--crash-at", point, "--cycle", str(cycle)) == -signal.SIGKILL
    assert run_driver(tmp_path, "--resume") == 0

    log = sent(tmp_path)
    before, (resume_tag, resumed) = log[:-1], log[-1]
    assert resume_tag == "resume"

    # 1. never two keys under one ID, nor two identities for the device
    seen: dict[str, str] = {}
    identities = set()
    for _tag, body in log:
        for key_id, key in body.get("one_time_keys", {}).items():
            assert seen.setdefault(key_id, key["key"]) == key["key"], key_id
        if "device_keys" in body:
            identities.add(json.dumps(body["device_keys"]["keys"], sort_keys=True))
    assert len(identities) == 1

    # 2. what the restarted machine sends, step by step
    handed_out = [body for tag, body in before if tag == f"cycle{cycle}"]
    if point in ("after_handout", "before_commit_response"):
        assert handed_out == [resumed]  # exactly the request that left, again
    elif point == "after_commit_response":
        assert len(handed_out) == 1
        assert resumed == {}  # published: nothing pending, no count known yet
    elif point == "after_commit_generated":  # committed but never left: sent now
        assert handed_out == []
        # cycle 1 fills the server up to 50 beside the claim's key
        assert len(resumed["one_time_keys"]) == (49 if cycle == 1 else 40)
        assert ("device_keys" in resumed) == (cycle == 1)
    else:  # after_generate: made in memory only, so lost; nothing of it ever left
        assert handed_out == []
        if cycle == 1:  # a new device: a fresh full set beside the claim's key
            assert len(resumed["one_time_keys"]) == 49
            assert "device_keys" in resumed
        else:  # the committed count (50) asks for nothing until a sync reports less
            assert resumed == {}
