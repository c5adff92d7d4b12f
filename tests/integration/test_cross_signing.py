"""Our cross-signing identity against the real Synapse: bootstrap, recovery on a second
device with nothing else online, our device watched, and the start race."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from nio import AsyncClient, AsyncClientConfig

from olmstead import (
    Client,
    CrossSigningExists,
    CrossSigningSettings,
    DeviceIdentityConflict,
    DeviceIdInUse,
    DeviceKeysReplaced,
    OlmsteadError,
    WrongRecoveryKey,
    published_identity,
)
from olmstead.olm.signing import verify_signed_json
from tests.integration.harness import (
    Wire,
    close_client,
    open_client,
    server_device_keys,
    session_of,
)


async def own_keys(url: str, token: str, user_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            "/_matrix/client/v3/keys/query",
            json={"device_keys": {user_id: []}},
            headers={"Authorization": f"Bearer {token}"},
        )
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result


async def started(url: str, path: Path, registered: dict[str, Any]) -> Client:
    client = await open_client(url, path, session_of(url, registered), Wire())
    await client.init_crypto()
    return client


async def test_bootstrap_publishes_a_chain_that_verifies_and_a_second_device_recovers(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    first = await started(url, tmp_path / "first.db", user)
    assert first.machine is not None
    recovery_key = await first.bootstrap_cross_signing()  # no auth asked: a first upload
    published = await own_keys(url, user["access_token"], user["user_id"])
    identity = published_identity(
        published, user["user_id"], user["device_id"], first.machine.identity_keys["ed25519"]
    )
    assert identity.self_signing_valid
    assert identity.user_signing_valid
    assert identity.device_signed  # checked by olmstead's own verifier on Synapse's answer
    assert identity.master_signed_by_device
    assert first.machine.cross_signing_status.published
    await close_client(first)  # nothing of ours is online from here on

    async with httpx.AsyncClient(base_url=url) as http:
        login = await http.post(
            "/_matrix/client/v3/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user["localpart"]},
                "password": user["password"],
            },
        )
    login.raise_for_status()
    session = session_of(url, login.json())
    second = await started(url, tmp_path / "second.db", login.json())
    before = await own_keys(url, session.access_token, user["user_id"])
    with pytest.raises(WrongRecoveryKey):
        await second.recover(
            recovery_key="EsTc LW2K PGiF wKEA 3As5 g5c4 BXwk qeeJ ZJV8 Q9fu gUMN UE4d"
        )
    assert await own_keys(url, session.access_token, user["user_id"]) == before
    assert second.machine is not None
    assert await second.machine.store.load_cross_signing() is None

    await second.recover(recovery_key=recovery_key)
    after = await own_keys(url, session.access_token, user["user_id"])
    recovered = published_identity(
        after, user["user_id"], session.device_id, second.machine.identity_keys["ed25519"]
    )
    assert recovered.device_signed
    assert recovered.master_key == identity.master_key  # the same identity, not a new one
    await close_client(second)


async def test_a_device_whose_keys_matrix_nio_replaces_reports_it_within_one_sync(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    client = await started(url, tmp_path / "bot.db", user)
    problems: list[OlmsteadError] = []
    client.on_key_problem(problems.append)
    await client.sync_once()  # the initial sync: from here on, changes are news

    (tmp_path / "nio").mkdir()
    nio = AsyncClient(
        url,
        user["user_id"],
        device_id=user["device_id"],
        store_path=str(tmp_path / "nio"),
        config=AsyncClientConfig(encryption_enabled=True),
    )
    nio.restore_login(user["user_id"], user["device_id"], user["access_token"])
    await nio.keys_upload()  # its own identity over ours (Synapse writes device keys first)
    await nio.close()
    on_server = await server_device_keys(
        url, user["access_token"], user["user_id"], user["device_id"]
    )
    assert client.machine is not None
    assert (
        on_server["keys"][f"ed25519:{user['device_id']}"] != client.machine.identity_keys["ed25519"]
    )

    await client.sync_once()
    assert [type(p) for p in problems] == [DeviceKeysReplaced]
    assert isinstance(client.machine.key_problem, DeviceKeysReplaced)
    await close_client(client)


async def test_two_clients_starting_together_on_a_new_device_leave_one_owner(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url = homeserver.base_url
    for round_ in range(20):
        user = new_user()
        clients = [
            await open_client(url, tmp_path / f"r{round_}-{n}.db", session_of(url, user), Wire())
            for n in (0, 1)
        ]
        outcomes = await asyncio.gather(*(c.init_crypto() for c in clients), return_exceptions=True)
        owners = [
            c for c, o in zip(clients, outcomes, strict=True) if not isinstance(o, BaseException)
        ]
        stopped = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(owners) == 1, (round_, outcomes)
        assert len(stopped) == 1
        assert isinstance(stopped[0], DeviceIdInUse | DeviceIdentityConflict), stopped[0]
        owner = owners[0]
        assert owner.machine is not None
        assert owner.machine.device_keys_shared
        on_server = await server_device_keys(
            url, user["access_token"], user["user_id"], user["device_id"]
        )
        assert on_server["keys"] == owner.machine.device_keys()["keys"]  # never replaced
        # and the owner's keys stay: a sync later they are still the ones on the server
        await owner.sync_once()
        assert owner.machine.key_problem is None
        for client in clients:
            await close_client(client)


async def login_again(url: str, user: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            "/_matrix/client/v3/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user["localpart"]},
                "password": user["password"],
            },
        )
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


async def test_a_second_bootstrap_that_raced_the_first_never_resets_the_identity(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    first = await started(url, tmp_path / "first.db", user)
    second_login = await login_again(url, user)
    second = await open_client(
        url,
        tmp_path / "second.db",
        session_of(url, second_login),
        Wire(),
        cross_signing=CrossSigningSettings(password=user["password"]),
    )
    await second.init_crypto()
    assert second.machine is not None
    stale = await second.own_keys()  # looked up before the first device bootstrapped
    recovery_key = await first.bootstrap_cross_signing()
    published = await own_keys(url, user["access_token"], user["user_id"])

    await second.machine.bootstrap_cross_signing(stale)
    with pytest.raises(CrossSigningExists):  # Synapse asked for auth: not answered
        await second.process_outgoing(raise_trust_errors=True)
    assert await own_keys(url, user["access_token"], user["user_id"]) == published
    # the way out: recover the account's keys, which replaces the unsent ones
    await second.recover(recovery_key=recovery_key)
    assert second.machine.cross_signing_status.pending == 0
    after = await own_keys(url, user["access_token"], user["user_id"])
    user_id = user["user_id"]
    assert after["master_keys"][user_id]["keys"] == published["master_keys"][user_id]["keys"]
    assert after["self_signing_keys"] == published["self_signing_keys"]
    await close_client(first)
    await close_client(second)


async def test_bootstrap_on_first_start_hands_the_recovery_key_over_once(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    keys: list[str] = []
    settings = CrossSigningSettings(bootstrap_on_start=True, on_recovery_key=keys.append)
    for _start in range(2):  # the second start finds the identity and makes none
        client = await open_client(
            url, tmp_path / "bot.db", session_of(url, user), Wire(), cross_signing=settings
        )
        await client.init_crypto()
        assert client.machine is not None
        assert client.machine.cross_signing_status.published
        await close_client(client)
    assert len(keys) == 1
    assert keys[0].startswith("Es")


async def test_signing_another_users_master_key_is_accepted_by_synapse(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, alice, bob = homeserver.base_url, new_user(), new_user()
    ours = await started(url, tmp_path / "alice.db", alice)
    theirs = await started(url, tmp_path / "bob.db", bob)
    await ours.bootstrap_cross_signing()
    await theirs.bootstrap_cross_signing()
    their_master = (await own_keys(url, alice["access_token"], bob["user_id"]))["master_keys"][
        bob["user_id"]
    ]
    assert ours.machine is not None
    await ours.machine.sign_user(bob["user_id"], their_master)
    await ours.process_outgoing(raise_trust_errors=True)  # refused signatures would raise
    seen = (await own_keys(url, alice["access_token"], bob["user_id"]))["master_keys"][
        bob["user_id"]
    ]
    usk = ours.machine.cross_signing_status.public_keys["user_signing"]
    assert verify_signed_json(seen, alice["user_id"], usk, usk)
    await close_client(ours)
    await close_client(theirs)
