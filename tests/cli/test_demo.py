"""``olmstead demo`` end to end: its own throwaway Synapse, every verdict as it should be."""

from __future__ import annotations

import re

from click.testing import CliRunner

from olmstead.cli.main import main


def test_demo_prevents_diagnoses_and_repairs() -> None:
    result = CliRunner().invoke(main, ["demo"], catch_exceptions=False)
    out = result.output
    assert result.exit_code == 0, out
    # two devices talk before anything breaks, and after each repair
    assert out.count("both decrypted") == 4, out
    assert "FAILED" not in out
    # a lost store: refused before any upload, named, moved to a new device
    assert "refused, nothing uploaded: DeviceIdInUse" in out
    assert "the device's keys on the server are unchanged" in out
    assert "[error] device_id_in_use" in out
    moved = re.search(r"done: now device (\S+): .* deleted device (\S+);", out)
    assert moved is not None
    assert moved[1] != moved[2]
    # a wrong pickle key: both fingerprints, the store untouched, the default named, rekeyed
    fingerprints = re.search(r"WrongPickleKey: written with key (\S+), given (\S+)", out)
    assert fingerprints is not None
    assert fingerprints[1] != fingerprints[2]
    assert "byte-for-byte unchanged" in out
    assert "the known default 'mautrix.bridge.e2ee' opens it" in out
    rekeyed = re.search(r"re-encrypted every secret from key (\S+) to key (\S+),", out)
    assert rekeyed is not None
    assert rekeyed[1] == fingerprints[1]  # the old default's fingerprint, as the error said
    assert rekeyed[2] == fingerprints[2]  # the key given is the key the store now has
    # a rolled-back store: found from the marker, drained
    lost = re.search(r"Up to (\d+) keys on the server have no private half", out)
    assert lost is not None
    assert int(lost[1]) == 30
    assert re.search(r"drained (\d+) one-time keys of ours", out)
    assert out.count("doctor after the repair: all well") == 2
    assert "uploads blocked: False" in out
    assert "this is a bug" not in out
    assert "CHANGED" not in out
