"""Cross-signing for the bot's user, uploaded by hand (the test's own code, not olmstead's).

Stands in for our own bootstrap, which another change builds, so that the tests of
*other* users' identities can reach "verified by us": the bot's master key signed by
its device (as the bootstrap signs it), its device signed by its self-signing key,
and a peer's master key signed by its user-signing key.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx

from olmstead import OlmMachine
from tests.cross_signing_keys import CrossSigningIdentity, canonical


def _device_signed(machine: OlmMachine, obj: dict[str, Any]) -> dict[str, Any]:
    signed = copy.deepcopy(obj)
    signature = machine._record.account.sign(canonical(signed)).to_base64()
    signed.setdefault("signatures", {}).setdefault(machine.user_id, {})[
        f"ed25519:{machine.device_id}"
    ] = signature
    return signed


async def cross_sign_by_hand(
    url: str, user: dict[str, Any], machine: OlmMachine, verify: list[str]
) -> CrossSigningIdentity:
    """Upload cross-signing keys for ``user`` and sign the master keys of ``verify``."""
    identity = CrossSigningIdentity(machine.user_id)
    headers = {"Authorization": f"Bearer {user['access_token']}"}
    async with httpx.AsyncClient(base_url=url, headers=headers) as http:
        body: dict[str, Any] = {
            "master_key": identity.master_key(),
            "self_signing_key": identity.self_signing_key(),
            "user_signing_key": identity.user_signing_key(),
        }
        answer = await http.post("/_matrix/client/v3/keys/device_signing/upload", json=body)
        if answer.status_code == 401:  # older servers ask for a password even the first time
            body["auth"] = {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": machine.user_id},
                "password": user["password"],
                "session": answer.json().get("session"),
            }
            answer = await http.post("/_matrix/client/v3/keys/device_signing/upload", json=body)
        answer.raise_for_status()
        query = await http.post(
            "/_matrix/client/v3/keys/query", json={"device_keys": {key: [] for key in verify}}
        )
        query.raise_for_status()
        masters = query.json().get("master_keys", {})
        signatures: dict[str, Any] = {
            machine.user_id: {
                identity.master.public: _device_signed(machine, identity.master_key()),
                machine.device_id: identity.sign_device(machine.device_keys()),
            }
        }
        for other in verify:
            master = masters[other]
            ((_key_id, key),) = master["keys"].items()
            signatures[other] = {key: identity.sign_user(master)}
        answer = await http.post("/_matrix/client/v3/keys/signatures/upload", json=signatures)
        answer.raise_for_status()
        assert answer.json().get("failures", {}) == {}, answer.json()
    return identity
