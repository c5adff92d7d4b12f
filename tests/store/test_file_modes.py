"""Files that hold keys are their owner's alone, whatever the umask; doctor and repair see to
the ones that are not."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

from olmstead import OlmMachine, PickleKey, Session, SqliteStore
from olmstead.doctor import diagnose
from olmstead.repair import RepairOptions, _save_session, plan_repairs, read_session_file

KEY = PickleKey(b"m" * 32)

#: run with umask 0: every file a process creates would be 0666 unless olmstead sees to it
MAKE_FILES = textwrap.dedent(
    """
    import asyncio, json, os, stat, sys
    from pathlib import Path
    from olmstead import Changes, OlmMachine, PickleKey, SqliteStore, load_or_create_key_file
    from olmstead.cli.main import main as cli

    os.umask(0)
    here = Path(sys.argv[1])

    async def make() -> None:
        key = load_or_create_key_file(here / "pickle.key")
        store = await SqliteStore.open(here / "bot.db", key)
        await OlmMachine.open(store, "@bot:example.org", "BOTDEVICE")
        await store.save_changes(Changes(values={"sync_token": "s1"}))  # -wal, -shm
        # they go when the store closes: their modes are taken while it is open
        modes = {n: stat.S_IMODE((here / n).stat().st_mode) for n in ("bot.db-wal", "bot.db-shm")}
        Path(sys.argv[2]).write_text(json.dumps(modes))
        await store.copy_to(here / "bot.db.before-rekey")  # what repair keeps
        await store.close()

    asyncio.run(make())
    os.environ["OLMSTEAD_EXPORT_PASSPHRASE"] = "export passphrase"
    cli(["keys", "export", "--store", str(here / "bot.db"), "--key-file",
         str(here / "pickle.key"), str(here / "keys.txt")], standalone_mode=False)
    """
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_holding_keys_is_0600_under_a_permissive_umask(tmp_path: Path) -> None:
    here = tmp_path / "files"
    here.mkdir()
    while_open = tmp_path / "modes-while-open.json"
    subprocess.run(
        [sys.executable, "-c", MAKE_FILES, str(here), str(while_open)], check=True, timeout=60
    )
    made = {path.name: mode(path) for path in here.iterdir()}
    made.update(json.loads(while_open.read_text()))
    expected = {
        "bot.db",
        "bot.db-wal",
        "bot.db-shm",
        "bot.db.before-rekey",
        "pickle.key",
        "keys.txt",
    }
    assert expected <= set(made), made
    assert {name: m for name, m in made.items() if m != 0o600} == {}


async def test_doctor_flags_a_store_others_can_read_and_repair_fixes_it(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    store = await SqliteStore.open(path, KEY)
    await OlmMachine.open(store, "@bot:example.org", "BOTDEVICE")
    await store.close()
    key_file = tmp_path / "pickle.key"
    key_file.write_bytes(b"not read here\n")
    os.chmod(path, 0o644)  # as a store from before, or a copy made by hand, would be
    os.chmod(key_file, 0o640)

    report = await diagnose(str(path), KEY, key_file=key_file)
    flagged = [f for f in report.findings if f.cause == "files_readable"]
    assert len(flagged) == 1
    assert flagged[0].verdict == "warning"
    assert str(path) in flagged[0].evidence
    assert str(key_file) in flagged[0].evidence
    assert report.exit_code == 1

    repairs = plan_repairs(report, RepairOptions(str(path), KEY))
    assert [r.cause for r in repairs] == ["files_readable"]
    await repairs[0].run()
    assert mode(path) == 0o600
    assert mode(key_file) == 0o600

    again = await diagnose(str(path), KEY, key_file=key_file)
    assert "files_readable" not in again.causes()
    assert any(f.cause == "files_private" for f in again.findings)


def test_a_session_file_written_over_one_others_can_read_is_0600(tmp_path: Path) -> None:
    # the file a move to a new device writes holds an access token; one already there
    # (an earlier move, a file the operator made) must not keep its looser mode
    path = tmp_path / "session.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    session = Session("https://example.org", "@bot:example.org", "NEWDEVICE", "secret-token")
    _save_session(session, path)
    assert mode(path) == 0o600
    assert read_session_file(path) == session
