"""Doctor against odd and hostile server answers: never a traceback, never a diagnosis that
repair would act on when the server only failed; and a store it reads stays as it was."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import vodozemac

from olmstead import PickleKey, SqliteStore
from olmstead.doctor import Credentials, diagnose
from olmstead.repair import RepairOptions, plan_repairs
from olmstead.store.base import AccountRecord, Changes

USER, DEVICE = "@bot:example.org", "BOTDEVICE"
KEY = PickleKey(b"d" * 32)

Handler = Callable[[httpx.Request], httpx.Response]


async def shared_device(path: Path) -> vodozemac.Account:
    account = vodozemac.Account()
    store = await SqliteStore.open(path, KEY)
    await store.save_changes(Changes(account=AccountRecord(USER, DEVICE, account, shared=True)))
    await store.close()
    return account


def server(account: vodozemac.Account, **answers: httpx.Response) -> Handler:
    """A homeserver that answers as given for some endpoints and well for the rest."""
    keys = {f"ed25519:{DEVICE}": account.ed25519_key.to_base64()}

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        for name, answer in answers.items():
            if path.endswith(name.replace("_", "/")):
                return answer
        if path.endswith("/account/whoami"):
            return httpx.Response(200, json={"user_id": USER, "device_id": DEVICE})
        if path.endswith("/keys/query"):
            return httpx.Response(200, json={"device_keys": {USER: {DEVICE: {"keys": keys}}}})
        if "/account_data/" in path:
            return httpx.Response(404, json={"errcode": "M_NOT_FOUND"})
        if path.endswith("/sync"):
            body = {
                "device_one_time_keys_count": {"signed_curve25519": 50},
                "device_unused_fallback_key_types": ["signed_curve25519"],
            }
            return httpx.Response(200, json=body)
        return httpx.Response(404, json={"errcode": "M_UNRECOGNIZED"})

    return handle


async def diagnosed(path: Path, handler: Handler) -> Any:
    return await diagnose(
        str(path),
        KEY,
        server=Credentials("http://homeserver.test", "token"),
        transport=httpx.MockTransport(handler),
    )


def problems(report: Any) -> dict[str, str]:
    return {f.cause: f.verdict for f in report.findings if f.verdict != "ok"}


async def test_a_healthy_answer_is_all_ok(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    account = await shared_device(path)
    report = await diagnosed(path, server(account))
    assert problems(report) == {}
    assert {"device_ok", "one_time_keys_ok", "fallback_key_ok"} <= {
        f.cause for f in report.findings
    }


@pytest.mark.parametrize(
    ("answers", "cause"),
    [
        ({"whoami": httpx.Response(502, text="Bad Gateway")}, "server_error"),
        ({"whoami": httpx.Response(429, json={"errcode": "M_LIMIT_EXCEEDED"})}, "server_error"),
        ({"whoami": httpx.Response(200, json=["not", "an", "object"])}, "server_error"),
        ({"keys_query": httpx.Response(500, json={"errcode": "M_UNKNOWN"})}, "server_error"),
        ({"keys_query": httpx.Response(200, json={"device_keys": None})}, "server_error"),
        ({"keys_query": httpx.Response(200, text="<html>")}, "server_error"),
    ],
    ids=["502", "429", "list", "query-500", "null-device-keys", "html"],
)
async def test_a_failing_server_concludes_nothing_and_plans_no_repair(
    tmp_path: Path, answers: dict[str, httpx.Response], cause: str
) -> None:
    path = tmp_path / "bot.db"
    account = await shared_device(path)
    report = await diagnosed(path, server(account, **answers))
    assert problems(report) == {cause: "error"}
    options = RepairOptions(
        str(path), KEY, server=Credentials("http://homeserver.test", "t"), password=lambda: "pw"
    )
    assert plan_repairs(report, options) == []  # a proxy's 502 never replaces a device


async def test_a_refused_token_is_told_from_an_expired_one(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    account = await shared_device(path)
    gone = httpx.Response(401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})
    report = await diagnosed(path, server(account, whoami=gone))
    assert problems(report) == {"token_invalid": "error"}

    expired = httpx.Response(
        401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "expired", "soft_logout": True}
    )
    report = await diagnosed(path, server(account, whoami=expired))
    assert problems(report) == {"token_expired": "error"}
    options = RepairOptions(
        str(path), KEY, server=Credentials("http://homeserver.test", "t"), password=lambda: "pw"
    )
    assert plan_repairs(report, options) == []  # log in again to the same device: no move


async def test_odd_counts_and_markers_are_warnings_not_tracebacks(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    account = await shared_device(path)
    odd_sync = httpx.Response(200, json={"device_one_time_keys_count": None})
    report = await diagnosed(path, server(account, sync=odd_sync))
    assert problems(report) == {"no_one_time_keys": "warning"}

    broken_marker = httpx.Response(500, text="oops")

    def handler(request: httpx.Request) -> httpx.Response:
        if "/account_data/" in request.url.path:
            return broken_marker
        return server(account)(request)

    report = await diagnosed(path, handler)
    assert problems(report) == {"marker_unreadable": "warning"}
    throttled = httpx.Response(429, json={"errcode": "M_LIMIT_EXCEEDED"})
    report = await diagnosed(path, server(account, sync=throttled))
    assert problems(report) == {"server_error": "warning"}


async def test_doctor_leaves_a_dead_writer_s_store_exactly_as_it_found_it(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    await shared_device(path)
    # a process commits and dies before any checkpoint: its commit lives in the WAL only
    died = (
        "import os, sqlite3\n"
        f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "c.execute(\"INSERT INTO kv (key, value) VALUES ('sync_token', 's1')\")\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", died], check=True)

    def digests() -> dict[str, str]:
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tmp_path.iterdir())
            # -shm is SQLite's shared-memory index, which every reader touches: not data
            if p.name in ("bot.db", "bot.db-wal")
        }

    before = digests()
    assert "bot.db-wal" in before
    report = await diagnose(str(path), KEY)
    assert "key_ok" in {f.cause for f in report.findings}
    assert json.loads(report.to_json())["device"]["device_id"] == DEVICE
    assert digests() == before  # no checkpoint folded the log in, nothing was deleted
