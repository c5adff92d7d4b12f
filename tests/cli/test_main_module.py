"""``python -m olmstead`` is the ``olmstead`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_python_m_olmstead_is_the_olmstead_command(tmp_path: Path) -> None:
    module = subprocess.run(
        [sys.executable, "-m", "olmstead", "--help"], capture_output=True, text=True, check=False
    )
    script = Path(sys.executable).with_name("olmstead")
    command = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert module.returncode == 0, module.stderr
    assert module.stdout == command.stdout
    assert module.stdout.startswith("Usage: olmstead ")
    # a subcommand with an error exits as the command does
    missing = tmp_path / "none.db"
    args = ["store", "rekey", "--store", str(missing)]
    failed = subprocess.run(
        [sys.executable, "-m", "olmstead", *args], capture_output=True, text=True, check=False
    )
    assert failed.returncode == 2
    assert "no store at" in failed.stderr
