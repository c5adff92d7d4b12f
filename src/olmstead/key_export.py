"""Room keys in the key export file format Element and other clients read and write.

The format (the Matrix spec's "Key exports"): a JSON list of sessions, encrypted
with AES-256-CTR under a key made by PBKDF2-HMAC-SHA-512 from the passphrase,
authenticated with HMAC-SHA-256, armoured in base64 between
``-----BEGIN MEGOLM SESSION DATA-----`` and ``-----END MEGOLM SESSION DATA-----``.

Binary layout: version ``0x01`` | salt (16) | IV (16, bit 63 clear) | rounds
(u32, big-endian) | ciphertext | HMAC-SHA-256 of all that precedes it (32).
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import struct
from collections.abc import Iterable
from hashlib import sha256
from typing import Any

import vodozemac
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from olmstead import boundary
from olmstead.errors import KeyFileError
from olmstead.olm import checked
from olmstead.sessions.group_sessions import MEGOLM_ALGORITHM
from olmstead.store.base import InboundGroupSessionRecord

__all__ = [
    "decrypt_key_file",
    "encrypt_key_file",
    "export_entries",
    "import_entries",
    "read_key_file",
]

HEADER = "-----BEGIN MEGOLM SESSION DATA-----"
FOOTER = "-----END MEGOLM SESSION DATA-----"
#: Element's choice; the spec asks for at least 100,000
DEFAULT_ROUNDS = 500_000
#: the most PBKDF2 rounds a file may ask for (20 times Element's, several seconds): the
#: count comes from the file, before its MAC can be checked
MAX_ROUNDS = 10_000_000


def encrypt_key_file(plaintext: bytes, passphrase: str, rounds: int = DEFAULT_ROUNDS) -> str:
    """The armoured file for ``plaintext`` (a JSON list of sessions)."""
    salt = secrets.token_bytes(16)
    iv = bytearray(secrets.token_bytes(16))
    iv[8] &= 0x7F  # bit 63 clear: the counter never wraps into the nonce half
    aes_key, mac_key = _keys(passphrase, salt, rounds)
    encryptor = Cipher(algorithms.AES(aes_key), modes.CTR(bytes(iv))).encryptor()
    body = b"\x01" + salt + bytes(iv) + struct.pack(">I", rounds)
    body += encryptor.update(plaintext) + encryptor.finalize()
    body += hmac.new(mac_key, body, sha256).digest()
    encoded = base64.b64encode(body).decode()
    lines = [encoded[i : i + 96] for i in range(0, len(encoded), 96)]
    return "\n".join([HEADER, *lines, FOOTER]) + "\n"


def decrypt_key_file(armoured: str, passphrase: str) -> bytes:
    """The JSON a key file holds; ``KeyFileError`` if it is damaged or the passphrase wrong.

    Read as Element reads it (matrix-react-sdk's ``unpackMegolmKeyFile``), so files that
    other clients and editors wrote import: lines end in LF or CRLF, each line is trimmed
    of surrounding whitespace, text before the BEGIN line and after the END line is
    ignored, the last line needs no newline, and a UTF-8 byte order mark is dropped.
    """
    encoded = "".join(_armoured_lines(armoured.removeprefix("\ufeff")))
    encoded = "".join(encoded.split())  # whitespace inside lines, as atob ignores it
    try:
        body = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except ValueError as exc:
        raise KeyFileError(f"the key file is damaged: its base64 does not decode ({exc})") from None
    if len(body) < 1 + 16 + 16 + 4 + 32 or body[0] != 1:
        raise KeyFileError("the key file is damaged or of an unknown version")
    salt, iv = body[1:17], body[17:33]
    (rounds,) = struct.unpack(">I", body[33:37])
    if not 1 <= rounds <= MAX_ROUNDS:
        # 0 is a ValueError in the KDF, 2**31 and more a panic, and 2**31 - 1 half an hour
        raise KeyFileError(
            f"the key file asks for {rounds} PBKDF2 rounds; olmstead reads 1 to {MAX_ROUNDS}"
        )
    aes_key, mac_key = _keys(passphrase, salt, rounds)
    if not hmac.compare_digest(hmac.new(mac_key, body[:-32], sha256).digest(), body[-32:]):
        raise KeyFileError(
            "the passphrase is wrong, or the key file was changed: its MAC does not match"
        )
    decryptor = Cipher(algorithms.AES(aes_key), modes.CTR(iv)).decryptor()
    return decryptor.update(body[37:-32]) + decryptor.finalize()


def _armoured_lines(text: str) -> list[str]:
    """The lines between the BEGIN and END lines (each trimmed), as Element finds them."""
    lines = [line.strip() for line in text.split("\n")]
    try:
        start = lines.index(HEADER)
    except ValueError:
        raise KeyFileError(
            "not a key export file: no line reads -----BEGIN MEGOLM SESSION DATA-----"
        ) from None
    if start == len(lines) - 1:  # Element needs a line end after the BEGIN line
        raise KeyFileError("the key file ends after its BEGIN line")
    try:
        end = lines.index(FOOTER, start + 1)
    except ValueError:
        raise KeyFileError(
            "the key file is cut short: no line reads -----END MEGOLM SESSION DATA-----"
        ) from None
    return lines[start + 1 : end]


def _keys(passphrase: str, salt: bytes, rounds: int) -> tuple[bytes, bytes]:
    derived = PBKDF2HMAC(hashes.SHA512(), 64, salt, rounds).derive(passphrase.encode())
    return derived[:32], derived[32:]


def export_entries(records: Iterable[InboundGroupSessionRecord]) -> list[dict[str, Any]]:
    """Sessions as export entries, each from the earliest index we can decrypt."""
    entries = []
    for record in records:
        exported = record.session.export_at(record.session.first_known_index)
        if exported is None:
            continue
        entries.append(
            {
                "algorithm": MEGOLM_ALGORITHM,
                "room_id": record.room_id,
                "sender_key": record.sender_key,
                "sender_claimed_keys": {"ed25519": record.signing_key},
                "session_id": record.session_id,
                "session_key": exported.to_base64(),
                "forwarding_curve25519_key_chain": [],
            }
        )
    return entries


def import_entries(entries: Any) -> tuple[list[InboundGroupSessionRecord], int]:
    """Sessions from export entries; and how many entries were unusable and skipped."""
    if not isinstance(entries, list):
        raise KeyFileError("the key file does not hold a list of sessions")
    records, skipped = [], 0
    for entry in entries:
        try:
            if entry["algorithm"] != MEGOLM_ALGORITHM:
                raise ValueError("not a Megolm session")
            room_id, sender_key = entry["room_id"], entry["sender_key"]
            signing_key = entry["sender_claimed_keys"]["ed25519"]
            if not all(boundary.is_identifier(v) for v in (room_id, sender_key, signing_key)):
                raise ValueError("a room ID or key that no store can hold")
            with checked.binding("not a session key", KeyFileError):
                session = vodozemac.InboundGroupSession.import_session(
                    vodozemac.ExportedSessionKey(entry["session_key"])
                )
            if session.session_id != entry["session_id"]:
                raise ValueError("its session ID does not match its key")
            records.append(InboundGroupSessionRecord(room_id, sender_key, signing_key, session))
        except (KeyError, TypeError, ValueError, KeyFileError):
            skipped += 1
    return records, skipped


def read_key_file(armoured: str, passphrase: str) -> tuple[list[InboundGroupSessionRecord], int]:
    """The sessions a key file holds, and how many of its entries were unusable."""
    try:
        entries = json.loads(decrypt_key_file(armoured, passphrase))
    except ValueError as exc:
        raise KeyFileError(f"the key file decrypts, but not to JSON: {exc}") from None
    return import_entries(entries)


def entries_json(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps(entries).encode()
