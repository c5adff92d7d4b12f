"""``olmstead trust`` against the real Synapse: status, bootstrap, status again."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from olmstead.cli.main import main
from tests.integration.harness import close_client, open_client, session_of


def test_trust_status_bootstrap_and_status_again(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    path = tmp_path / "bot.db"

    async def first_start() -> None:
        client = await open_client(url, path, session_of(url, user))
        await client.init_crypto()
        await close_client(client)

    asyncio.run(first_start())
    (tmp_path / "key").write_text(base64.b64encode(b"i" * 32).decode())  # harness KEY
    env = {"OLMSTEAD_ACCESS_TOKEN": user["access_token"]}
    args = ["--store", str(path), "--key-file", str(tmp_path / "key"), "--homeserver", url]
    runner = CliRunner()

    before = runner.invoke(main, ["trust", "status", *args], env=env)
    assert before.exit_code == 0, before.output
    assert "master key on the server: none" in before.output
    assert "withhold" in before.output

    made = runner.invoke(main, ["trust", "bootstrap", *args], env=env)
    assert made.exit_code == 0, made.output
    recovery_key = made.output.strip().splitlines()[-1]
    assert recovery_key.startswith("Es")
    assert recovery_key not in " ".join(args)  # printed, never taken from the command line

    after = runner.invoke(main, ["trust", "status", *args], env=env)
    assert after.exit_code == 0, after.output
    assert "signed by the self-signing key: True" in after.output
    assert "private keys in this store: True (published: True)" in after.output
