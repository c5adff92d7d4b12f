"""Our own device's keys as the server sees them: signed device keys and one-time keys.

Pure functions of a vodozemac ``Account``: the same account gives the same bytes
(Ed25519 signatures are deterministic), which is what lets a retry after a crash
send exactly what the first attempt sent.
"""

from __future__ import annotations

from typing import Any

import vodozemac

from olmstead.olm.signing import signable_bytes

__all__ = [
    "ALGORITHMS",
    "device_keys",
    "generate_fallback_key",
    "identity_keys",
    "sign_json",
    "signed_fallback_keys",
    "signed_one_time_keys",
    "unpublished_fallback_key",
]

ALGORITHMS = ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"]


def identity_keys(account: vodozemac.Account) -> dict[str, str]:
    return {
        "curve25519": account.curve25519_key.to_base64(),
        "ed25519": account.ed25519_key.to_base64(),
    }


def sign_json(
    account: vodozemac.Account, user_id: str, device_id: str, obj: dict[str, Any]
) -> dict[str, Any]:
    """``obj`` with our device's signature added (other signatures kept)."""
    signature = account.sign(signable_bytes(obj)).to_base64()
    signatures = {user: dict(sigs) for user, sigs in obj.get("signatures", {}).items()}
    signatures.setdefault(user_id, {})[f"ed25519:{device_id}"] = signature
    return {**obj, "signatures": signatures}


def device_keys(account: vodozemac.Account, user_id: str, device_id: str) -> dict[str, Any]:
    keys = identity_keys(account)
    body = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ALGORITHMS,
        "keys": {f"{algo}:{device_id}": key for algo, key in keys.items()},
    }
    return sign_json(account, user_id, device_id, body)


def signed_one_time_keys(
    account: vodozemac.Account, user_id: str, device_id: str
) -> dict[str, dict[str, Any]]:
    """The unpublished one-time keys, signed, as ``/keys/upload`` takes them."""
    return {
        f"signed_curve25519:{key_id}": sign_json(
            account, user_id, device_id, {"key": key.to_base64()}
        )
        for key_id, key in sorted(account.one_time_keys.items())
    }


def signed_fallback_keys(
    account: vodozemac.Account, user_id: str, device_id: str
) -> dict[str, dict[str, Any]]:
    """The unpublished fallback key, signed and flagged, as ``/keys/upload`` takes it."""
    return {
        f"signed_curve25519:{key_id}": sign_json(
            account, user_id, device_id, {"key": key.to_base64(), "fallback": True}
        )
        for key_id, key in sorted(unpublished_fallback_key(account).items())
    }


# vodozemac 0.10's type stubs leave out the fallback-key API the binding has.
def unpublished_fallback_key(
    account: vodozemac.Account,
) -> dict[str, vodozemac.Curve25519PublicKey]:
    keys: dict[str, vodozemac.Curve25519PublicKey] = account.fallback_key  # type: ignore[attr-defined]
    return keys


def generate_fallback_key(account: vodozemac.Account) -> None:
    account.generate_fallback_key()  # type: ignore[attr-defined]
