"""Signing and verifying JSON objects the Matrix way.

The signed bytes are the canonical JSON of the object without its
``signatures`` and ``unsigned`` members; signatures live under
``signatures[user_id]["ed25519:<key id>"]``.
"""

from __future__ import annotations

from typing import Any

from olmstead.olm import checked
from olmstead.olm.canonical_json import canonical_json

__all__ = ["signable_bytes", "signature_of", "verify_signed_json"]


def signable_bytes(obj: dict[str, Any]) -> bytes:
    """The bytes a signature over ``obj`` covers."""
    stripped = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    return canonical_json(stripped)


def signature_of(obj: dict[str, Any], user_id: str, key_id: str) -> str | None:
    """The base64 signature ``obj`` carries for ``user_id`` and ``ed25519:key_id``."""
    signatures = obj.get("signatures")
    if not isinstance(signatures, dict):
        return None
    by_user = signatures.get(user_id)
    if not isinstance(by_user, dict):
        return None
    value = by_user.get(f"ed25519:{key_id}")
    return value if isinstance(value, str) else None


def verify_signed_json(obj: dict[str, Any], user_id: str, key_id: str, ed25519_key: str) -> bool:
    """Whether ``obj`` carries a valid signature by ``ed25519_key`` as ``user_id``/``key_id``.

    Malformed keys, signatures or objects count as not signed: the caller only
    needs to know whether it may trust the object.
    """
    signature = signature_of(obj, user_id, key_id)
    if signature is None:
        return False
    try:
        signed = signable_bytes(obj)
    except (ValueError, TypeError, RecursionError):  # not canonical JSON: not signable
        return False
    return checked.verify_signature(ed25519_key, signed, signature)
