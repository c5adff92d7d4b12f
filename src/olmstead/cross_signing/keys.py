"""Cross-signing keys: Ed25519 key pairs kept as 32-byte seeds, and the JSON they sign.

vodozemac 0.10's binding exposes no Ed25519 secret key, so the keys are
``cryptography``'s Ed25519 (RFC 8032, the same signatures vodozemac verifies).
A cross-signing key object (spec: "Cross-signing") is
``{"user_id", "usage": [<usage>], "keys": {"ed25519:<public>": <public>}, "signatures"}``;
the key ID is the unpadded base64 public key itself.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from olmstead.olm.signing import signable_bytes

__all__ = [
    "MASTER",
    "SELF_SIGNING",
    "USAGES",
    "USER_SIGNING",
    "SigningKey",
    "add_signature",
    "b64decode",
    "b64encode",
    "key_object",
    "public_key_of",
]

MASTER = "master"
SELF_SIGNING = "self_signing"
USER_SIGNING = "user_signing"
USAGES = (MASTER, SELF_SIGNING, USER_SIGNING)


def b64encode(data: bytes) -> str:
    """Unpadded standard base64, as Matrix writes keys and signatures."""
    return base64.b64encode(data).decode().rstrip("=")


def b64decode(text: str) -> bytes:
    """Standard base64, padded or not; raises ``ValueError`` on anything else."""
    if not isinstance(text, str):
        raise ValueError("not a string")
    stripped = text.rstrip("=")
    try:
        return base64.b64decode(stripped + "=" * (-len(stripped) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64: {exc}") from None


@dataclass(frozen=True)
class SigningKey:
    """One cross-signing private key (its 32-byte Ed25519 seed)."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(32))

    @property
    def public_key(self) -> str:
        """The public key, unpadded base64 (it is also the key's ID)."""
        raw = (
            Ed25519PrivateKey.from_private_bytes(self.seed)
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        return b64encode(raw)

    def sign(self, message: bytes) -> str:
        return b64encode(Ed25519PrivateKey.from_private_bytes(self.seed).sign(message))

    def sign_json(self, user_id: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """``obj`` with this key's signature added under ``user_id`` (others kept)."""
        return add_signature(obj, user_id, self.public_key, self.sign(signable_bytes(dict(obj))))


def add_signature(
    obj: Mapping[str, Any], user_id: str, key_id: str, signature: str
) -> dict[str, Any]:
    signatures = obj.get("signatures")
    merged: dict[str, dict[str, str]] = {}
    if isinstance(signatures, Mapping):
        merged = {u: dict(s) for u, s in signatures.items() if isinstance(s, Mapping)}
    merged.setdefault(user_id, {})[f"ed25519:{key_id}"] = signature
    return {**obj, "signatures": merged}


def key_object(user_id: str, usage: str, public_key: str) -> dict[str, Any]:
    """An unsigned cross-signing key object."""
    return {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{public_key}": public_key}}


def public_key_of(obj: Any, user_id: str, usage: str) -> str | None:
    """The public key of a cross-signing key object, if it is well formed for ``user_id``.

    Well formed: an object naming ``user_id``, with ``usage`` among its usages and
    exactly one ``ed25519:<key>`` entry whose ID is the key itself.
    """
    if not isinstance(obj, Mapping) or obj.get("user_id") != user_id:
        return None
    usages = obj.get("usage")
    if not isinstance(usages, list) or usage not in usages:
        return None
    keys = obj.get("keys")
    if not isinstance(keys, Mapping) or len(keys) != 1:
        return None
    ((key_id, value),) = keys.items()
    if not isinstance(value, str) or key_id != f"ed25519:{value}":
        return None
    try:
        if len(b64decode(value)) != 32:
            return None
    except ValueError:
        return None
    return value
