"""Pickle keys: what the operator gives, and the key file that is stored before it is used."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from olmstead import LocalProtocolError, PickleKey, load_or_create_key_file
from olmstead.store.pickle_key import fingerprint


def test_raw_keys_must_be_32_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        PickleKey(b"x" * 31)
    with pytest.raises(LocalProtocolError, match="empty"):
        PickleKey("")


def test_fingerprints_are_short_and_do_not_contain_the_key() -> None:
    key = bytes(range(32))
    shown = fingerprint(key)
    assert re.fullmatch(r"[0-9a-f]{4}(-[0-9a-f]{4}){3}", shown)
    assert key.hex()[:8] not in shown.replace("-", "")
    assert fingerprint(bytes(range(1, 33))) != shown


def test_key_check_record_proves_the_same_passphrase_only() -> None:
    record, derived = PickleKey("correct horse").new_key_check()
    assert PickleKey("correct horse").check(record, "s").key == derived.key
    assert len(derived.key) == 32
    # the same passphrase in another store has another salt, hence another key
    _, elsewhere = PickleKey("correct horse").new_key_check()
    assert elsewhere.key != derived.key
    assert "correct horse" not in repr(derived)
    assert "horse" not in repr(PickleKey("correct horse"))


def test_key_file_is_created_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "pickle.key"
    key = load_or_create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_key_file(path)
    record, derived = key.new_key_check()
    assert again.check(record, "s").key == derived.key
    assert [p.name for p in tmp_path.iterdir()] == ["pickle.key"]  # no temp file left
