"""An olmstead bot killed mid-conversation with matrix-nio and restarted loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.integration.harness import session_of
from tests.integration.nio_peer import NioPeer

ROOT = Path(__file__).resolve().parents[2]


def start_bot(session: Any, store: Path, log: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.echo_bot_process",
            json.dumps(session.__dict__),
            str(store),
            str(log),
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def received(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [json.loads(line)["body"] for line in log.read_text().splitlines()]


async def until(
    condition: Any, nio: NioPeer, bot: subprocess.Popen[str], seconds: float = 60
) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert bot.poll() is None, bot.stderr.read() if bot.stderr else ""
        assert time.monotonic() < deadline, (
            f"timed out; nio has {nio.bodies()}, undecryptable {nio.undecryptable}"
        )
        await nio.sync()
        await asyncio.sleep(0.2)


async def test_every_message_before_and_after_a_kill_is_decrypted(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    bot_user, nio_user = new_user(), new_user()
    session = session_of(url, bot_user)
    store, log = tmp_path / "bot.db", tmp_path / "received.jsonl"
    nio = await NioPeer.login(url, nio_user, tmp_path / "nio", "nio")
    created = await nio.client.room_create(
        invite=[bot_user["user_id"]],
        initial_state=[
            {
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }
        ],
    )
    room = created.room_id
    async with httpx.AsyncClient(base_url=url) as http:
        joined = await http.post(
            f"/_matrix/client/v3/rooms/{room}/join",
            json={},
            headers={"Authorization": f"Bearer {bot_user['access_token']}"},
        )
        joined.raise_for_status()
    await nio.sync()

    ready = Path(f"{log}.ready")
    bot = start_bot(session, store, log)
    try:
        await until(ready.exists, nio, bot)
        await nio.sync()  # sees the bot's new device keys before it first sends
        for n in (1, 2, 3):
            await nio.send_text(room, f"m{n}")
            await until(lambda n=n: f"echo: m{n}" in nio.bodies(), nio, bot)
        bot.send_signal(signal.SIGKILL)  # mid-conversation: it may have been syncing
        bot.wait(10)

        for n in (4, 5):  # said while the bot is dead
            await nio.send_text(room, f"m{n}")
        bot = start_bot(session, store, log)
        await until(lambda: "echo: m5" in nio.bodies(), nio, bot, seconds=90)
        await nio.send_text(room, "m6")
        await until(lambda: "echo: m6" in nio.bodies(), nio, bot)
    finally:
        bot.kill()
        bot.wait(10)
        await nio.close()

    assert set(received(log)) == {f"m{n}" for n in range(1, 7)}
    assert all(json.loads(line)["encrypted"] for line in log.read_text().splitlines())
    assert {f"echo: m{n}" for n in range(1, 7)} <= set(nio.bodies())
    assert nio.undecryptable == []
