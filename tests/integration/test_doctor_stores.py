"""``olmstead doctor`` and ``repair`` on the other stores: PostgreSQL (one account among
many), and a matrix-nio store read in place."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from olmstead import Client, LeaseSettings, PickleKey
from olmstead.cli.main import main
from olmstead.store.postgres import PostgresStore
from tests.conftest import POSTGRES_DSN, pause, postgres_or_skip
from tests.integration.harness import close_client, session_of
from tests.integration.nio_peer import NioPeer
from tests.integration.test_doctor import (
    causes,
    doctor,
    make_device,
    problems,
    run,
    server_env,
)

PG_KEY = "postgres doctor key"


async def test_a_postgres_account_diagnosed_released_and_rekeyed(
    homeserver: Any, new_user: Any
) -> None:
    await postgres_or_skip()
    url, user = homeserver.base_url, new_user()
    account = f"doctor-{uuid.uuid4().hex[:8]}"
    store = await PostgresStore.open(
        POSTGRES_DSN, PickleKey("mautrix.bridge.e2ee"), account=account
    )
    client = Client(url, store=store)
    client.restore(session_of(url, user))
    await client.init_crypto()
    await client.sync_once()
    await close_client(client)
    where = ("--account", account, "--homeserver", url)
    env = {"OLMSTEAD_PICKLE_KEY": PG_KEY, **server_env(user)}

    human, report = await asyncio.to_thread(doctor, POSTGRES_DSN, env, *where)
    assert problems(report) == {"wrong_pickle_key": "error"}, human.output
    assert "the known default 'mautrix.bridge.e2ee' opens it" in human.output
    # another account in the same database is not this one
    other = await asyncio.to_thread(doctor, POSTGRES_DSN, env, "--account", f"{account}-none")
    assert problems(other[1]) == {"store_corrupt": "error"}
    assert "holds no account" in other[0].output

    # a holder that froze leaves a stale lease; repair releases it, then rekeys
    lease = LeaseSettings(duration=0.6, renew_every=0.2, wait=0.3)
    holder = await PostgresStore.open(
        POSTGRES_DSN,
        PickleKey("mautrix.bridge.e2ee"),
        account=account,
        lease=lease,
        holder="bridge-1",
    )
    held = await asyncio.to_thread(doctor, POSTGRES_DSN, env, *where)
    assert problems(held[1]) == {"lock_held": "error"}
    assert "bridge-1" in held[0].output
    pause(holder)
    await asyncio.sleep(1.0)
    fixed = await asyncio.to_thread(
        run, "repair", "--store", POSTGRES_DSN, *where, "--yes", env=env
    )
    assert "released the lease bridge-1 left behind" in fixed.output, fixed.output
    assert "re-encrypted every secret" in fixed.output
    assert fixed.exit_code == 0, fixed.output
    await holder.close()
    _human, after = await asyncio.to_thread(doctor, POSTGRES_DSN, env, *where)
    assert problems(after) == {}
    assert {"key_ok", "device_ok", "lock_free"} <= set(causes(after))


async def test_repair_asks_before_each_fix(homeserver: Any, new_user: Any, tmp_path: Path) -> None:
    url, user = homeserver.base_url, new_user()
    path = tmp_path / "bot.db"
    await make_device(url, path, user, PickleKey("mautrix.bridge.e2ee"))
    env = {"OLMSTEAD_PICKLE_KEY": PG_KEY}
    declined = await asyncio.to_thread(
        CliRunner().invoke, main, ["repair", "--store", str(path)], input="n\n", env=env
    )
    assert "Do it?" in declined.output
    assert "skipped" in declined.output
    assert declined.exit_code == 2  # nothing was done: still the wrong key
    assert problems((await asyncio.to_thread(doctor, path, env))[1]) == {
        "wrong_pickle_key": "error"
    }


async def test_a_matrix_nio_store_is_diagnosed_where_it_lies(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    nio = await NioPeer.login(url, user, tmp_path / "nio", "nio")
    device_id, token = nio.device_id, str(nio.client.access_token)
    await nio.close()
    nio_db = tmp_path / "nio" / f"{user['user_id']}_{device_id}.db"
    before = nio_db.read_bytes()
    env = {"OLMSTEAD_ACCESS_TOKEN": token}
    human, report = await asyncio.to_thread(doctor, nio_db, env, "--homeserver", url)
    assert "Pickle key (Enter for none" in report.stderr  # asked, on stderr; no answer: none
    body = json.loads(report.stdout)
    assert body["kind"] == "matrix-nio"
    assert body["device"]["device_id"] == device_id
    assert problems(report)["legacy_default_key"] == "warning"
    assert "'DEFAULT_KEY'" in human.output
    assert causes(report)["device_ok"] == "ok"
    assert "wrong_pickle_key" not in causes(report)
    assert nio_db.read_bytes() == before  # diagnosis only reads
