"""What the store keeps of our cross-signing identity: sealed private keys and plain state.

The private keys (and the secret storage key, until the operator has it) are
sealed with AES-256-GCM under the store's pickle key, as vodozemac pickles are:
a store opened with the wrong key never reads them, and ``rekey`` re-seals them.
The state beside them is not secret: whether the server confirmed the public
keys, and the outbox of requests committed before they leave.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["CrossSigningRecord", "SealedSecrets"]

_VERSION = "v1:"
_AAD = b"olmstead cross-signing secrets"


class SealedSecrets:
    """Secrets as a pickle: the shape ``CryptoStore.rekey`` re-wraps every secret with."""

    def __init__(self, secrets: dict[str, str]) -> None:
        self.secrets = secrets

    def pickle(self, key: bytes) -> str:
        nonce = os.urandom(12)
        sealed = AESGCM(key).encrypt(nonce, json.dumps(self.secrets).encode(), _AAD)
        return _VERSION + base64.b64encode(nonce + sealed).decode()

    @classmethod
    def from_pickle(cls, pickle: str, key: bytes) -> SealedSecrets:
        """Raises ``ValueError`` if the pickle is damaged or sealed under another key."""
        if not pickle.startswith(_VERSION):
            raise ValueError("not a sealed cross-signing pickle")
        try:
            raw = base64.b64decode(pickle[len(_VERSION) :], validate=True)
            plain = AESGCM(key).decrypt(raw[:12], raw[12:], _AAD)
            secrets = json.loads(plain)
        except (InvalidTag, ValueError) as exc:
            raise ValueError(f"the cross-signing secrets do not unseal: {exc!r}") from None
        if not isinstance(secrets, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()
        ):
            raise ValueError("the cross-signing secrets are not a map of strings")
        return cls(secrets)


@dataclass
class CrossSigningRecord:
    """Our cross-signing keys and the requests about them that must reach the server.

    ``secrets``: ``master``, ``self_signing``, ``user_signing`` (unpadded base64
    Ed25519 seeds) and ``secret_storage_key`` (unpadded base64, kept so a bootstrap
    that crashed hands out the same recovery key). ``state``: ``published`` (the
    server confirmed our public keys), ``outbox`` (pending requests, in order),
    ``secret_storage_key_id``, ``passphrase`` (``[salt, iterations]`` or ``None``).
    """

    secrets: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    def state_json(self) -> str:
        return json.dumps(self.state, sort_keys=True)

    def copy(self) -> CrossSigningRecord:
        return CrossSigningRecord(dict(self.secrets), json.loads(self.state_json()))

    @classmethod
    def from_row(cls, pickle: str, state_json: str, key: bytes) -> CrossSigningRecord:
        """Raises ``ValueError`` if the row does not unseal or its state is not an object."""
        secrets = SealedSecrets.from_pickle(pickle, key).secrets
        try:
            state = json.loads(state_json)
        except ValueError as exc:
            raise ValueError(f"the cross-signing state is not JSON: {exc}") from None
        if not isinstance(state, dict):
            raise ValueError("the cross-signing state is not an object")
        return cls(secrets, state)
