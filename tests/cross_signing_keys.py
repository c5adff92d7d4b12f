"""Cross-signing keys for tests: a user's master, self-signing and user-signing keys.

Built with ``cryptography``'s Ed25519 (not olmstead's code), signed the spec's way
(canonical JSON without ``signatures`` and ``unsigned``), so the tests check
olmstead's verifier against an independent signer. ``KeysQueryAnswer`` assembles a
``/keys/query`` answer from devices and identities.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def canonical(obj: dict[str, Any]) -> bytes:
    stripped = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    return json.dumps(stripped, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


class SigningKey:
    """One Ed25519 key pair; ``public`` is unpadded base64, as Matrix writes keys."""

    def __init__(self) -> None:
        self._private = Ed25519PrivateKey.generate()
        raw = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public = _b64(raw)

    def sign(self, obj: dict[str, Any], user_id: str, key_id: str | None = None) -> dict[str, Any]:
        """``obj`` with this key's signature added as ``user_id``/``ed25519:<key_id>``."""
        signed = copy.deepcopy(obj)
        signature = _b64(self._private.sign(canonical(signed)))
        signed.setdefault("signatures", {}).setdefault(user_id, {})[
            f"ed25519:{key_id or self.public}"
        ] = signature
        return signed


@dataclass
class CrossSigningIdentity:
    """A user's three cross-signing keys and their public objects, correctly signed."""

    user_id: str
    master: SigningKey = field(default_factory=SigningKey)
    self_signing: SigningKey = field(default_factory=SigningKey)
    user_signing: SigningKey = field(default_factory=SigningKey)

    def key_object(self, usage: str, key: SigningKey) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "usage": [usage],
            "keys": {f"ed25519:{key.public}": key.public},
        }

    def master_key(self) -> dict[str, Any]:
        return self.key_object("master", self.master)

    def self_signing_key(self) -> dict[str, Any]:
        return self.master.sign(self.key_object("self_signing", self.self_signing), self.user_id)

    def user_signing_key(self) -> dict[str, Any]:
        return self.master.sign(self.key_object("user_signing", self.user_signing), self.user_id)

    def sign_device(self, device_keys: dict[str, Any]) -> dict[str, Any]:
        """The device's keys with this identity's self-signing signature added."""
        return self.self_signing.sign(device_keys, self.user_id)

    def sign_user(self, master_key: dict[str, Any]) -> dict[str, Any]:
        """Another user's master key object signed by this identity's user-signing key."""
        return self.user_signing.sign(master_key, self.user_id)


@dataclass
class KeysQueryAnswer:
    """A ``/keys/query`` answer, built up piece by piece."""

    device_keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    master_keys: dict[str, Any] = field(default_factory=dict)
    self_signing_keys: dict[str, Any] = field(default_factory=dict)
    user_signing_keys: dict[str, Any] = field(default_factory=dict)

    def device(self, keys: dict[str, Any]) -> KeysQueryAnswer:
        self.device_keys.setdefault(keys["user_id"], {})[keys["device_id"]] = keys
        return self

    def identity(
        self,
        identity: CrossSigningIdentity,
        *,
        master: dict[str, Any] | None = None,
        own: bool = False,
    ) -> KeysQueryAnswer:
        user = identity.user_id
        self.device_keys.setdefault(user, {})
        self.master_keys[user] = master if master is not None else identity.master_key()
        self.self_signing_keys[user] = identity.self_signing_key()
        if own:
            self.user_signing_keys[user] = identity.user_signing_key()
        return self

    def json(self) -> dict[str, Any]:
        return {
            "device_keys": self.device_keys,
            "master_keys": self.master_keys,
            "self_signing_keys": self.self_signing_keys,
            "user_signing_keys": self.user_signing_keys,
            "failures": {},
        }
