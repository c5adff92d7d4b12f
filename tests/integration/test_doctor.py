"""``olmstead doctor`` and ``olmstead repair`` on setups broken the ways the seeds describe.

Each test breaks a real device on the real Synapse one way, asserts that doctor
names that cause and no other (human and JSON output), repairs it, and shows the
repaired device sending and receiving encrypted messages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner, Result
from nio import AsyncClient, AsyncClientConfig

from olmstead import Client, DeviceIdInUse, LeaseSettings, PickleKey, Session, SqliteStore
from olmstead.cli.main import main
from olmstead.client.rooms import RoomEvent
from olmstead.repair import read_session_file
from tests.conftest import pause
from tests.integration.harness import KEY, close_client, open_client, server_device_keys, session_of
from tests.integration.mautrix_device import mautrix_device

TEXT_KEY = "doctor test key"
RAW_KEY_ENV = {"OLMSTEAD_PICKLE_KEY": TEXT_KEY}
#: the errors and warnings a healthy device may still show: none
SEVERE = {"warning", "error"}


def run(*args: str, env: dict[str, str]) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def doctor(store: Path | str, env: dict[str, str], *extra: str) -> tuple[Result, Result]:
    """The human and the JSON report for the same store."""
    human = run("doctor", "--store", str(store), *extra, env=env)
    machine = run("doctor", "--store", str(store), "--json", *extra, env=env)
    return human, machine


def causes(result: Result) -> dict[str, str]:
    return {f["cause"]: f["verdict"] for f in json.loads(result.stdout)["findings"]}


def problems(result: Result) -> dict[str, str]:
    return {cause: verdict for cause, verdict in causes(result).items() if verdict in SEVERE}


def key_file(directory: Path) -> Path:
    """The harness's raw pickle key, as a key file."""
    path = directory / "harness.key"
    path.write_text(base64.b64encode(b"i" * 32).decode())
    path.chmod(0o600)  # a key file readable by others is a finding of its own
    return path


def server_env(user: dict[str, Any], token: str | None = None) -> dict[str, str]:
    return {
        "OLMSTEAD_ACCESS_TOKEN": token or user["access_token"],
        "OLMSTEAD_PASSWORD": user["password"],
    }


async def make_device(url: str, path: Path, user: dict[str, Any], key: PickleKey) -> None:
    client = Client(url, store=await SqliteStore.open(path, key))
    client.restore(session_of(url, user))
    await client.init_crypto()
    await client.sync_once()
    await close_client(client)


async def talks(url: str, store: Path, session: Session, key: PickleKey, peer: Any) -> None:
    """The device in ``store`` and a fresh olmstead peer exchange encrypted messages."""
    client = Client(url, store=await SqliteStore.open(store, key))
    client.restore(session)
    other = await open_client(url, store.with_name(f"peer-{uuid.uuid4().hex[:6]}.db"))
    other.restore(session_of(url, peer))
    seen: list[Any] = []
    heard: list[Any] = []
    client.on_room_event(seen.append)
    other.on_room_event(heard.append)
    client.on_decryption_failure(lambda *failure: seen.append(failure))
    other.on_decryption_failure(lambda *failure: heard.append(failure))
    try:
        await client.init_crypto()
        await other.init_crypto()
        await client.sync_once()
        room = await client.create_room(invite=[peer["user_id"]])
        await other.sync_once()
        await other.join(room)
        await client.sync_once()
        await client.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "fixed"})
        await other.sync_once()
        await other.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "heard"})
        await client.sync_once()
        assert ("fixed", True) in texts(heard), heard
        assert ("heard", True) in texts(seen), seen
        assert [e for e in seen + heard if not isinstance(e, RoomEvent)] == []
        assert client.machine is not None
        assert client.machine.key_problem is None
    finally:
        await close_client(client)
        await close_client(other)


def texts(seen: list[Any]) -> list[tuple[Any, bool]]:
    return [
        (e.content.get("body"), e.encrypted)
        for e in seen
        if isinstance(e, RoomEvent) and e.type == "m.room.message"
    ]


def saved_session(store: Path) -> Session:
    saved = Path(f"{store}.session.json")
    assert saved.stat().st_mode & 0o077 == 0  # it holds an access token
    return read_session_file(saved)


async def device_exists(url: str, token: str, device_id: str) -> bool:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.get(
            f"/_matrix/client/v3/devices/{device_id}",
            headers={"Authorization": f"Bearer {token}"},
        )
        return answer.status_code == 200


# --- the tests ---------------------------------------------------------------------------------


async def test_a_healthy_device_is_all_ok(homeserver: Any, new_user: Any, tmp_path: Path) -> None:
    url, user = homeserver.base_url, new_user()
    path = tmp_path / "bot.db"
    await make_device(url, path, user, PickleKey(TEXT_KEY))
    env = {**RAW_KEY_ENV, **server_env(user)}
    human, report = await asyncio.to_thread(doctor, path, env, "--homeserver", url)
    assert human.exit_code == 0, human.output
    assert problems(report) == {}
    found = set(causes(report))
    assert {"key_ok", "device_ok", "one_time_keys_ok", "fallback_key_ok", "lock_free"} <= found
    assert json.loads(report.output)["device"]["device_id"] == user["device_id"]
    fixed = await asyncio.to_thread(run, "repair", "--store", str(path), "--yes", env=env)
    assert fixed.exit_code == 0
    assert "all is well" in fixed.output


async def test_a_wrong_pickle_key_is_named_and_rekeyed(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user, peer = homeserver.base_url, new_user(), new_user()
    path = tmp_path / "bridge.db"
    await make_device(url, path, user, PickleKey("mautrix.bridge.e2ee"))  # the old default
    env = {**RAW_KEY_ENV, **server_env(user)}
    human, report = await asyncio.to_thread(doctor, path, env, "--homeserver", url)
    assert human.exit_code == 2
    assert "the known default 'mautrix.bridge.e2ee' opens it" in human.output
    assert problems(report) == {"wrong_pickle_key": "error"}

    fixed = await asyncio.to_thread(
        run, "repair", "--store", str(path), "--homeserver", url, "--yes", env=env
    )
    assert "re-encrypted every secret" in fixed.output, fixed.output
    assert fixed.exit_code == 0, fixed.output
    (kept,) = tmp_path.glob("bridge.db.before-rekey-*")  # should the new key be lost
    assert kept.stat().st_mode & 0o077 == 0
    old = await SqliteStore.open(kept, PickleKey("mautrix.bridge.e2ee"))
    assert (await old.load_account()) is not None
    await old.close()
    await talks(url, path, session_of(url, user), PickleKey(TEXT_KEY), peer)


async def test_a_stale_lock_is_named_and_released(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user, peer = homeserver.base_url, new_user(), new_user()
    path = tmp_path / "bot.db"
    await make_device(url, path, user, PickleKey(TEXT_KEY))
    lease = LeaseSettings(duration=0.6, renew_every=0.2, wait=0.3)
    holder = await SqliteStore.open(path, PickleKey(TEXT_KEY), lease=lease, holder="bot-1")
    human, report = await asyncio.to_thread(doctor, path, RAW_KEY_ENV)
    assert human.exit_code == 2
    assert problems(report) == {"lock_held": "error"}
    assert "bot-1" in human.output

    pause(holder)  # the holder freezes (or dies) and its lease runs out
    await asyncio.sleep(1.0)
    env = {**RAW_KEY_ENV, **server_env(user)}
    human, report = await asyncio.to_thread(doctor, path, env, "--homeserver", url)
    assert problems(report) == {"lock_stale": "warning"}
    assert "bot-1" in human.output
    fixed = await asyncio.to_thread(
        run, "repair", "--store", str(path), "--homeserver", url, "--yes", env=env
    )
    assert "released the lease bot-1 left behind" in fixed.output, fixed.output
    assert fixed.exit_code == 0, fixed.output
    assert SqliteStore.read_lease(path).expires_at == 0  # type: ignore[union-attr]
    await talks(url, path, session_of(url, user), PickleKey(TEXT_KEY), peer)


async def test_a_lost_store_or_a_reused_device_id_moves_to_a_new_device(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    for how in ("lost store", "reused device ID"):
        user, peer = new_user(), new_user()
        first = await open_client(url, tmp_path / f"{how}-first.db", session_of(url, user))
        await first.init_crypto()
        await close_client(first)
        session = session_of(url, user)
        if how == "reused device ID":  # a new login that names the old device's ID
            login = Client(url)
            session = await login.login(
                user["localpart"], user["password"], device_id=user["device_id"]
            )
            await login.close()
        path = tmp_path / f"{how}.db"
        replacement = await open_client(url, path, session)
        with contextlib.suppress(DeviceIdInUse):
            await replacement.init_crypto()
        await close_client(replacement)

        env = {"OLMSTEAD_PICKLE_KEY": "unused", **server_env(user, session.access_token)}
        extra = ("--homeserver", url, "--key-file", str(key_file(tmp_path)))
        human, report = await asyncio.to_thread(doctor, path, env, *extra)
        assert human.exit_code == 2, human.output
        assert problems(report) == {
            "device_id_in_use": "error",
            "keys_never_uploaded": "warning",
        }, how
        assert "olmstead uploaded nothing over it" in human.output

        fixed = await asyncio.to_thread(
            run, "repair", "--store", str(path), *extra, "--yes", env=env
        )
        assert fixed.exit_code == 0, fixed.output
        new = saved_session(path)
        assert new.device_id != user["device_id"]
        assert f"deleted device {user['device_id']}" in fixed.output
        assert not await device_exists(url, new.access_token, user["device_id"])
        await talks(url, path, new, KEY, peer)


async def test_a_second_client_on_the_same_token_is_named_and_the_device_moves_on(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user, peer = homeserver.base_url, new_user(), new_user()
    path = tmp_path / "bot.db"
    bot = await open_client(url, path, session_of(url, user))
    await bot.init_crypto()
    await bot.sync_once()
    sender = await open_client(url, tmp_path / "sender.db", session_of(url, peer))
    await sender.init_crypto()
    room = await sender.create_room(invite=[user["user_id"]])
    await bot.sync_once()
    await bot.join(room)
    await sender.sync_once()
    await sender.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "history"})
    await bot.sync_once()
    await close_client(bot)
    await close_client(sender)

    # matrix-nio, started with the bot's access token and its own store, uploads its keys
    nio_dir = tmp_path / "nio"
    nio_dir.mkdir()
    nio = AsyncClient(
        url,
        user["user_id"],
        device_id=user["device_id"],
        store_path=str(nio_dir),
        config=AsyncClientConfig(encryption_enabled=True),
    )
    nio.restore_login(user["user_id"], user["device_id"], user["access_token"])
    await nio.keys_upload()
    await nio.close()
    on_server = await server_device_keys(
        url, user["access_token"], user["user_id"], user["device_id"]
    )
    assert (
        on_server["keys"][f"ed25519:{user['device_id']}"]
        == nio.olm.account.identity_keys["ed25519"]
    )

    env = {"OLMSTEAD_PICKLE_KEY": "unused", **server_env(user)}
    extra = ("--homeserver", url, "--key-file", str(key_file(tmp_path)))
    human, report = await asyncio.to_thread(doctor, path, env, *extra)
    assert problems(report) == {"device_taken_over": "error"}
    assert "two clients on one access token" in human.output

    fixed = await asyncio.to_thread(
        run, "repair", "--store", str(path), *extra, "--yes", "--keep-old-device", env=env
    )
    assert fixed.exit_code == 0, fixed.output
    assert "room keys carried over" in fixed.output
    assert list(tmp_path.glob(f"bot.db.replaced-{user['device_id']}-*"))  # the old store kept
    new = saved_session(path)
    assert await device_exists(url, new.access_token, user["device_id"])  # as asked: kept

    # history stays readable: the new device decrypts the message sent to the old one
    store = await SqliteStore.open(path, KEY)
    client = Client(url, store=store)
    client.restore(new)
    machine = await client.init_crypto()
    events = await client.http.request(
        "GET", f"/_matrix/client/v3/rooms/{room}/messages", params={"dir": "b", "limit": "50"}
    )
    encrypted = [e for e in events["chunk"] if e["type"] == "m.room.encrypted"]
    bodies = [(await machine.decrypt_room_event(room, e)).content["body"] for e in encrypted]
    assert "history" in bodies
    await close_client(client)
    await talks(url, path, new, KEY, new_user())  # the sender's device has its store


async def test_a_rolled_back_store_is_named_and_drained(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user, peer = homeserver.base_url, new_user(), new_user()
    path = tmp_path / "bot.db"
    bot = await open_client(url, path, session_of(url, user))
    await bot.init_crypto()
    await close_client(bot)
    backup = tmp_path / "backup.db"
    shutil.copy(path, backup)

    async with httpx.AsyncClient(base_url=url) as http:  # a peer starts 30 sessions
        for _ in range(30):
            await http.post(
                "/_matrix/client/v3/keys/claim",
                json={"one_time_keys": {user["user_id"]: {user["device_id"]: "signed_curve25519"}}},
                headers={"Authorization": f"Bearer {peer['access_token']}"},
            )
    bot = await open_client(url, path, session_of(url, user))
    await bot.init_crypto()
    await bot.sync_once()  # refills: 30 new keys the backup never issued
    await close_client(bot)
    shutil.copy(backup, path)  # the rollback

    env = {"OLMSTEAD_PICKLE_KEY": "unused", **server_env(user)}
    extra = ("--homeserver", url, "--key-file", str(key_file(tmp_path)))
    human, report = await asyncio.to_thread(doctor, path, env, *extra)
    assert human.exit_code == 2, human.output
    assert problems(report) == {"store_rolled_back": "error"}
    assert "restored from an older copy" in human.output

    fixed = await asyncio.to_thread(run, "repair", "--store", str(path), *extra, "--yes", env=env)
    assert fixed.exit_code == 0, fixed.output
    assert "the stale ones among them" in fixed.output
    _human, after = await asyncio.to_thread(doctor, path, env, *extra)
    assert problems(after) == {}
    await talks(url, path, session_of(url, user), KEY, peer)


async def test_a_mautrix_store_with_a_legacy_key_is_named_and_moved(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user, peer = homeserver.base_url, new_user(), new_user()
    mautrix_db = tmp_path / "mautrix-crypto.db"
    await mautrix_device(url, user, mautrix_db)
    env = {**server_env(user), "OLMSTEAD_PICKLE_KEY": TEXT_KEY}
    human, report = await asyncio.to_thread(doctor, mautrix_db, env, "--homeserver", url)
    assert json.loads(report.output)["kind"] == "mautrix"
    # mautrix-python (libolm) uploads no fallback key: true, and said apart from the key
    assert problems(report) == {"legacy_default_key": "warning", "fallback_key_missing": "warning"}
    assert "'mautrix.bridge.e2ee'" in human.output
    assert "device_ok" in causes(report)

    target = tmp_path / "moved.db"
    fixed = await asyncio.to_thread(
        run,
        "repair",
        "--store",
        str(mautrix_db),
        "--homeserver",
        url,
        "--into",
        str(target),
        "--yes",
        env=env,
    )
    assert fixed.exit_code == 0, fixed.output
    assert f"into {target}" in fixed.output
    after = causes((await asyncio.to_thread(doctor, target, env, "--homeserver", url))[1])
    assert "legacy_default_key" not in after
    assert after["device_ok"] == "ok"
    await talks(url, target, session_of(url, user), PickleKey(TEXT_KEY), peer)
