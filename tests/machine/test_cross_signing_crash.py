"""SIGKILL at each step of a cross-signing bootstrap: after a restart the same keys and
the same requests go out again, never new ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.machine.cross_signing_crash_driver import POINTS

ROOT = Path(__file__).resolve().parents[2]
STEPS = 7  # the key upload, the signatures, five account data events


def run(tmp_path: Path, *args: str) -> int:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.machine.cross_signing_crash_driver",
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


def log(tmp_path: Path) -> list[tuple[str, dict[str, Any]]]:
    lines = (tmp_path / "sent.jsonl").read_text().splitlines()
    return [(e["tag"], e["body"]) for e in map(json.loads, lines)]


CASES = [("after_bootstrap_commit", 0)] + [
    (point, step) for point in POINTS[1:] for step in (0, 1, 2, STEPS - 1)
]


@pytest.mark.parametrize(("point", "step"), CASES)
def test_a_killed_bootstrap_resumes_with_the_same_keys(
    tmp_path: Path, point: str, step: int
) -> None:
    assert run(tmp_path, "--crash-at", point, "--step", str(step)) == -signal.SIGKILL
    assert run(tmp_path, "--resume") == 0
    entries = log(tmp_path)
    keys = {body["key"] for tag, body in entries if tag == "recovery_key"}
    assert len(keys) == 1  # the restart gave the same recovery key: the same secret storage
    sent = [(tag, body) for tag, body in entries if tag.startswith("step")]
    before, resumed = sent[:-1], sent[-1][1] if sent else None
    by_id = {body["id"]: body["body"] for _tag, body in before}
    if point == "after_commit_response" and step == STEPS - 1:
        assert entries[-1][0] == "done"  # all confirmed: nothing goes out again
        return
    assert resumed is not None
    if point in ("after_handout", "before_commit_response"):
        # the request whose answer was not recorded goes out again, byte for byte
        assert by_id[resumed["id"]] == resumed["body"]
        assert list(by_id)[-1] == resumed["id"]
    else:  # committed: the next one in order, never one sent before
        assert resumed["id"] not in by_id
        assert len(by_id) == (0 if point == "after_bootstrap_commit" else step + 1)
    # never two different sets of public keys
    uploads = [b["body"] for _t, b in sent if "master_key" in b["body"]]
    assert len({json.dumps(u, sort_keys=True) for u in uploads}) == 1
