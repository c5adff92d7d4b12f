"""``rekey`` killed (SIGKILL) at every few rows: the store always opens with exactly one key.

A store full of secrets is rekeyed by a separate process that dies after 1, 4, 7, …
rows, and once right after the commit. After every death: the store opens with one
of the two keys, refuses the other, and every secret is there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from olmstead import CryptoStore, PickleKey, SqliteStore, WrongPickleKey
from olmstead.store.postgres import PostgresStore
from tests.conftest import FAST_LEASE, KEY, OTHER_KEY, POSTGRES_DSN, postgres_or_skip
from tests.store.secrets_fixture import Secrets, assert_intact, fill

ROOT = Path(__file__).resolve().parents[2]


async def open_with(spec: str, key: PickleKey) -> CryptoStore:
    lease = FAST_LEASE.__class__(duration=0.6, renew_every=0.2, wait=10.0, poll=0.05)
    if spec.startswith("postgresql://"):
        dsn, account = spec.split("#")
        return await PostgresStore.open(dsn, key, account=account, lease=lease)
    return await SqliteStore.open(spec, key, lease=lease)


async def opens_with_exactly(
    spec: str, right: PickleKey, wrong: PickleKey, secrets: Secrets
) -> None:
    with pytest.raises(WrongPickleKey):
        await open_with(spec, wrong)
    store = await open_with(spec, right)
    try:
        await assert_intact(store, secrets)
    finally:
        await store.close()


def rekey_and_die(spec: str, kill_at: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.store.rekey_driver", spec, kill_at],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_rekey_interrupted_anywhere_leaves_one_key(tmp_path: Path, backend: str) -> None:
    if backend == "postgres":
        asyncio.run(postgres_or_skip())
        spec = f"{POSTGRES_DSN}#rekey-{uuid.uuid4().hex}"
    else:
        spec = str(tmp_path / "crypto.db")

    async def setup() -> Secrets:
        store = await open_with(spec, KEY)
        try:
            return await fill(store, count=30)
        finally:
            await store.close()

    secrets = asyncio.run(setup())
    points = list(range(1, secrets.rows, 3))  # 1 row in, 4 rows in, …, the last row
    assert len(points) >= 20
    for kill_at in points:
        rekey_and_die(spec, str(kill_at))
        asyncio.run(opens_with_exactly(spec, KEY, OTHER_KEY, secrets))
    rekey_and_die(spec, "committed")
    asyncio.run(opens_with_exactly(spec, OTHER_KEY, KEY, secrets))
