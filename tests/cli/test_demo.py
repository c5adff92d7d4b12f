"""``olmstead demo`` end to end: its own throwaway Synapse, every verdict as it should be."""

from __future__ import annotations

import re

from click.testing import CliRunner

from olmstead.cli.main import main


def test_demo_prevents_detects_and_repairs() -> None:
    result = CliRunner().invoke(main, ["demo"], catch_exceptions=False)
    out = result.output
    assert result.exit_code == 0, out
    assert "refused, nothing uploaded" in out
    assert "DeviceIdInUse" in out
    assert "the device's keys on the server are unchanged" in out
    fingerprints = re.search(r"written with pickle key (\S+), but was opened with key (\S+)\.", out)
    assert fingerprints is not None
    assert fingerprints[1] != fingerprints[2]
    assert f"pickle key fingerprint {fingerprints[1]}" in out
    assert "byte-for-byte unchanged" in out
    drained = re.search(r"drained (\d+) stale keys", out)
    assert drained is not None
    assert int(drained[1]) >= 1
    assert "uploads blocked: False" in out
    assert "this is a bug" not in out
    assert "CHANGED" not in out
