"""Secret storage ``m.secret_storage.v1.aes-hmac-sha2`` and the recovery key format.

Spec: client-server API, "Secret storage" (MSC1946, MSC2472). Every secret is
encrypted under a 32-byte secret storage key:

- HKDF-SHA-256 of the key, salt 32 zero bytes, info the secret's name (the
  account data type, e.g. ``m.cross_signing.master``), 64 bytes: the first 32
  the AES-256 key, the last 32 the HMAC-SHA-256 key;
- AES-256-CTR with a random 16-byte IV whose bit 63 is cleared;
- HMAC-SHA-256 over the ciphertext.

The key's description (account data ``m.secret_storage.key.<id>``) carries ``iv``
and ``mac`` of 32 zero bytes encrypted under the name ``""``: a key that
reproduces the MAC is the right one. A passphrase (``m.pbkdf2``) gives the key by
PBKDF2-HMAC-SHA-512 with the description's salt and iterations.

The recovery key (spec: "Key representation") is ``0x8B 0x01``, the 32-byte key
and a parity byte (the XOR of all bytes before it), base58 in the Bitcoin
alphabet, with a space every 4 characters.

All cryptography is from ``cryptography``; base58 from the ``base58`` library.
"""

from __future__ import annotations

import hmac
import os
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

import base58
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from olmstead.cross_signing.keys import b64decode, b64encode
from olmstead.errors import InvalidRecoveryKey

__all__ = [
    "AES_HMAC_SHA2",
    "DEFAULT_KEY_TYPE",
    "PBKDF2",
    "PBKDF2_ITERATIONS",
    "EncryptedSecret",
    "KeyDescription",
    "decode_recovery_key",
    "decrypt_secret",
    "derive_key",
    "encode_recovery_key",
    "encrypt_secret",
    "key_description",
    "key_matches",
    "key_type",
    "read_encrypted_secret",
    "read_key_description",
]

AES_HMAC_SHA2 = "m.secret_storage.v1.aes-hmac-sha2"
PBKDF2 = "m.pbkdf2"
DEFAULT_KEY_TYPE = "m.secret_storage.default_key"
#: PBKDF2-SHA-512 rounds for a new passphrase (matrix-rust-sdk uses the same)
PBKDF2_ITERATIONS = 500_000
#: the most rounds a key description may ask for: a hostile server cannot make us spin
MAX_PBKDF2_ITERATIONS = 10_000_000
_PREFIX = b"\x8b\x01"


def key_type(key_id: str) -> str:
    """The account data type of a key's description."""
    return f"m.secret_storage.key.{key_id}"


def _keys(key: bytes, name: str) -> tuple[bytes, bytes]:
    derived = HKDF(hashes.SHA256(), 64, b"\x00" * 32, name.encode()).derive(key)
    return derived[:32], derived[32:]


@dataclass(frozen=True)
class EncryptedSecret:
    iv: bytes
    ciphertext: bytes
    mac: bytes

    def to_json(self) -> dict[str, str]:
        return {
            "iv": b64encode(self.iv),
            "ciphertext": b64encode(self.ciphertext),
            "mac": b64encode(self.mac),
        }


def encrypt_secret(
    key: bytes, name: str, plaintext: bytes, iv: bytes | None = None
) -> EncryptedSecret:
    """Encrypt ``plaintext`` as the secret ``name`` under the 32-byte ``key``."""
    aes_key, mac_key = _keys(key, name)
    raw = bytearray(iv if iv is not None else os.urandom(16))
    raw[8] &= 0x7F  # bit 63 cleared: AES-CTR implementations differ on counter overflow
    encryptor = Cipher(algorithms.AES(aes_key), modes.CTR(bytes(raw))).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    mac = hmac.new(mac_key, ciphertext, sha256).digest()
    return EncryptedSecret(bytes(raw), ciphertext, mac)


def decrypt_secret(key: bytes, name: str, secret: EncryptedSecret) -> bytes | None:
    """The plaintext, or ``None`` if the MAC does not match (another key, or tampered)."""
    aes_key, mac_key = _keys(key, name)
    mac = hmac.new(mac_key, secret.ciphertext, sha256).digest()
    if not hmac.compare_digest(mac, secret.mac):
        return None
    decryptor = Cipher(algorithms.AES(aes_key), modes.CTR(secret.iv)).decryptor()
    return decryptor.update(secret.ciphertext) + decryptor.finalize()


@dataclass(frozen=True)
class KeyDescription:
    """A secret storage key's description as the account data holds it, checked for shape."""

    key_id: str
    iv: bytes
    mac: bytes
    #: ``(salt, iterations)`` when the key comes from a passphrase
    passphrase: tuple[str, int] | None
    content: dict[str, Any]


def key_description(
    key: bytes, passphrase: tuple[str, int] | None = None, name: str = "olmstead"
) -> dict[str, Any]:
    """The content of a new key's description (``m.secret_storage.key.<id>``)."""
    check = encrypt_secret(key, "", b"\x00" * 32)
    content: dict[str, Any] = {
        "name": name,
        "algorithm": AES_HMAC_SHA2,
        "iv": b64encode(check.iv),
        "mac": b64encode(check.mac),
    }
    if passphrase is not None:
        salt, iterations = passphrase
        content["passphrase"] = {
            "algorithm": PBKDF2,
            "salt": salt,
            "iterations": iterations,
            "bits": 256,
        }
    return content


def read_key_description(key_id: str, content: Any) -> KeyDescription | None:
    """A description we can use, or ``None`` (another algorithm, or a malformed one)."""
    if not isinstance(content, Mapping) or content.get("algorithm") != AES_HMAC_SHA2:
        return None
    try:
        iv, mac = b64decode(content["iv"]), b64decode(content["mac"])
    except (KeyError, ValueError):
        return None
    if len(iv) != 16 or len(mac) != 32:
        return None
    passphrase = None
    info = content.get("passphrase")
    if isinstance(info, Mapping) and info.get("algorithm") == PBKDF2:
        salt, iterations, bits = info.get("salt"), info.get("iterations"), info.get("bits", 256)
        if (
            isinstance(salt, str)
            and isinstance(iterations, int)
            and not isinstance(iterations, bool)
            and 0 < iterations <= MAX_PBKDF2_ITERATIONS
            and bits == 256
        ):
            passphrase = (salt, iterations)
    return KeyDescription(key_id, iv, mac, passphrase, dict(content))


def key_matches(key: bytes, description: KeyDescription) -> bool:
    """Whether ``key`` is the key ``description`` describes (its ``mac`` check)."""
    check = encrypt_secret(key, "", b"\x00" * 32, description.iv)
    return hmac.compare_digest(check.mac, description.mac)


def read_encrypted_secret(content: Any, key_id: str) -> EncryptedSecret | None:
    """The secret's ciphertext under ``key_id`` from its account data, or ``None``."""
    encrypted = content.get("encrypted") if isinstance(content, Mapping) else None
    entry = encrypted.get(key_id) if isinstance(encrypted, Mapping) else None
    if not isinstance(entry, Mapping):
        return None
    try:
        iv, ciphertext, mac = (b64decode(entry[k]) for k in ("iv", "ciphertext", "mac"))
    except (KeyError, ValueError):
        return None
    if len(iv) != 16 or len(mac) != 32 or len(ciphertext) > 65536:
        return None
    return EncryptedSecret(iv, ciphertext, mac)


def new_salt() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(32))


def derive_key(passphrase: str, salt: str, iterations: int) -> bytes:
    """The secret storage key for a passphrase (``m.pbkdf2``: PBKDF2-HMAC-SHA-512)."""
    kdf = PBKDF2HMAC(hashes.SHA512(), 32, salt.encode(), iterations)
    return kdf.derive(passphrase.encode())


def encode_recovery_key(key: bytes) -> str:
    """The recovery key for a 32-byte secret storage key, spaced every 4 characters."""
    if len(key) != 32:
        raise ValueError("a secret storage key is 32 bytes")
    raw = _PREFIX + key
    parity = 0
    for byte in raw:
        parity ^= byte
    text = base58.b58encode(raw + bytes([parity])).decode()
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def decode_recovery_key(text: str) -> bytes:
    """The 32-byte key a recovery key encodes; raises ``InvalidRecoveryKey`` on a typo."""
    compact = "".join(text.split())
    try:
        raw = base58.b58decode(compact)
    except ValueError:
        raise InvalidRecoveryKey("it contains characters that are not base58") from None
    if len(raw) != 35 or raw[:2] != _PREFIX:
        raise InvalidRecoveryKey("it does not have the length and prefix of a recovery key")
    parity = 0
    for byte in raw:
        parity ^= byte
    if parity != 0:
        raise InvalidRecoveryKey("its parity check fails (a character is mistyped)")
    return raw[2:34]
