"""One repair to a libolm account pickle before vodozemac reads it.

libolm keeps, as the last field of an account pickle (versions 3 and 4), the ID of
the *last* one-time key it issued; vodozemac 0.10 reads that field as the *next*
ID to issue. Its first new key therefore takes the ID of the newest existing key
and replaces it: a published key whose private half is lost (a peer that claimed
it cannot start a session), and a second key under an ID that may be on the server.

``bump_key_counter`` opens the pickle as libolm sealed it (HKDF-SHA-256 with info
"Pickle" gives an AES-256-CBC key, an HMAC-SHA-256 key and an IV; the MAC is
truncated to 8 bytes), adds one to that counter, and seals it again. Nothing else
in the pickle changes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import struct

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["bump_key_counter"]

log = logging.getLogger(__name__)

_COUNTER_AT_END = (3, 4)  # the account pickle versions whose last field is the counter


def bump_key_counter(pickle: str, key: bytes) -> str:
    """The pickle with its one-time key counter past the newest issued ID.

    Raises ``ValueError`` if ``key`` does not open the pickle (as vodozemac would).
    A version without the counter at the end is returned unchanged, with a warning.
    """
    aes_key, mac_key, iv = _keys(key)
    sealed = base64.b64decode(pickle + "=" * (-len(pickle) % 4))
    body, mac = sealed[:-8], sealed[-8:]
    if not hmac.compare_digest(hmac.new(mac_key, body, hashlib.sha256).digest()[:8], mac):
        raise ValueError("the pickle key does not open this libolm pickle")
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(decryptor.update(body) + decryptor.finalize()) + unpadder.finalize()
    (version,) = struct.unpack(">I", plain[:4])
    if version not in _COUNTER_AT_END:
        log.warning("libolm account pickle version %d: key counter left as it is", version)
        return pickle
    (last_issued,) = struct.unpack(">I", plain[-4:])
    plain = plain[:-4] + struct.pack(">I", last_issued + 1)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    body = encryptor.update(padder.update(plain) + padder.finalize()) + encryptor.finalize()
    mac = hmac.new(mac_key, body, hashlib.sha256).digest()[:8]
    return base64.b64encode(body + mac).decode().rstrip("=")


def _keys(key: bytes) -> tuple[bytes, bytes, bytes]:
    material = HKDF(hashes.SHA256(), 80, salt=None, info=b"Pickle").derive(key)
    return material[:32], material[32:64], material[64:]
