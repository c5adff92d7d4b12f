"""``doctor --trust`` and ``repair --trust`` against the real Synapse: no identity,
an unsigned device, a recovery key that does or does not open secret storage."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx

from olmstead import PickleKey
from olmstead.cross_signing import encode_recovery_key
from tests.integration.test_doctor import (
    RAW_KEY_ENV,
    TEXT_KEY,
    causes,
    doctor,
    make_device,
    run,
    server_env,
)


async def second_login(url: str, user: dict[str, Any]) -> dict[str, Any]:
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
    return {**user, **answer.json()}


async def test_doctor_finds_no_identity_and_repair_sets_it_up_then_a_second_device_recovers(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    url, user = homeserver.base_url, new_user()
    path = tmp_path / "bot.db"
    await make_device(url, path, user, PickleKey(TEXT_KEY))
    env = {**RAW_KEY_ENV, **server_env(user)}

    plain, _ = await asyncio.to_thread(doctor, path, env, "--homeserver", url)
    assert plain.exit_code == 0, plain.output  # without --trust: the checks of before
    human, report = await asyncio.to_thread(doctor, path, env, "--homeserver", url, "--trust")
    assert human.exit_code == 1, human.output
    assert causes(report)["no_cross_signing"] == "warning"
    assert "withhold" in human.output

    fixed = await asyncio.to_thread(
        run, "repair", "--store", str(path), "--homeserver", url, "--trust", "--yes", env=env
    )
    assert fixed.exit_code == 0, fixed.output
    found = re.search(r"the recovery key \(keep it safe\): ((?:\S{4} ){11}\S{4})", fixed.output)
    assert found is not None, fixed.output
    recovery_key = found[1]
    _, after = await asyncio.to_thread(doctor, path, env, "--homeserver", url, "--trust")
    assert causes(after)["cross_signed"] == "ok"

    good = {**env, "OLMSTEAD_RECOVERY_KEY": recovery_key}
    _, opened = await asyncio.to_thread(
        doctor, path, good, "--homeserver", url, "--check-recovery-key"
    )
    assert causes(opened)["secret_storage_ok"] == "ok"
    wrong = {**env, "OLMSTEAD_RECOVERY_KEY": encode_recovery_key(bytes(32))}  # well formed
    shut, unreadable = await asyncio.to_thread(
        doctor, path, wrong, "--homeserver", url, "--check-recovery-key"
    )
    assert shut.exit_code == 2, shut.output
    assert causes(unreadable)["secret_storage_unreadable"] == "error"
    assert "WrongRecoveryKey" in shut.output

    other_user = await second_login(url, user)
    other = tmp_path / "second.db"
    await make_device(url, other, other_user, PickleKey(TEXT_KEY))
    other_env = {**RAW_KEY_ENV, **server_env(other_user), "OLMSTEAD_RECOVERY_KEY": recovery_key}
    _, unsigned = await asyncio.to_thread(doctor, other, other_env, "--homeserver", url, "--trust")
    assert causes(unsigned)["device_not_cross_signed"] == "warning"
    recovered = await asyncio.to_thread(
        run, "repair", "--store", str(other), "--homeserver", url, "--trust", "--yes", env=other_env
    )
    assert recovered.exit_code == 0, recovered.output
    assert "recovered the cross-signing keys" in recovered.output
