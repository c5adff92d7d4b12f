"""Encrypted attachments: the spec's ``EncryptedFile`` ("Sending encrypted attachments").

A file sent into an encrypted room is encrypted before it is uploaded: AES-256-CTR
under a random 256-bit key, with a random 128-bit counter block whose low 64 bits
start at zero (so the counter never wraps into the random half), and the SHA-256 of
the ciphertext. The key (a JSON Web Key), the IV and the hash travel inside the
Megolm-encrypted event as its ``file`` (and ``info.thumbnail_file``) field::

    {"url": "mxc://example.org/abc", "v": "v2", "iv": "<16 bytes, unpadded base64>",
     "hashes": {"sha256": "<unpadded base64>"},
     "key": {"kty": "oct", "alg": "A256CTR", "ext": true, "key_ops": ["encrypt", "decrypt"],
             "k": "<32 bytes, unpadded base64url>"}}

Everything here works a chunk at a time (``AttachmentEncryptor``,
``AttachmentDecryptor``), so a file of any size passes through a fixed amount of
memory; ``Client.upload_encrypted`` and ``Client.download_decrypted`` drive them over
HTTP. File info from an event is hostile input: ``EncryptedFile.from_content`` checks
every field and raises an ``AttachmentError`` for anything the spec does not allow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from olmstead.errors import (
    AttachmentHashMismatch,
    AttachmentInfoInvalid,
    AttachmentKeyInvalid,
    AttachmentVersionUnknown,
    LocalProtocolError,
)

__all__ = [
    "CHUNK_SIZE",
    "AttachmentDecryptor",
    "AttachmentEncryptor",
    "EncryptedFile",
    "decrypt_attachment",
    "encrypt_attachment",
    "file_content",
    "parse_mxc",
]

#: bytes read, encrypted and sent (or received and decrypted) at a time: 1 MiB
CHUNK_SIZE = 1 << 20
VERSION = "v2"

# mxc://<server name>/<media id>: a server name (host, IPv4, [IPv6], optional port) and
# a media ID of [A-Za-z0-9_-] (spec: "Matrix Content (mxc://) URIs"). A host starts with
# a letter or digit: the grammar's "." and ".." would be dot segments in the download
# path, and mxc://../config would fetch /_matrix/client/v1/media/config with our token
_MXC = re.compile(
    r"mxc://(?P<server>[A-Za-z0-9][A-Za-z0-9.\-]*(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?)"
    r"/(?P<media>[A-Za-z0-9_\-]+)"
)


def parse_mxc(url: object) -> tuple[str, str]:
    """``(server_name, media_id)`` of an ``mxc://`` URI; ``AttachmentInfoInvalid`` otherwise."""
    if not isinstance(url, str) or len(url) > 1024:
        raise AttachmentInfoInvalid("the file's url is not an mxc:// URI")
    match = _MXC.fullmatch(url)
    if match is None:
        raise AttachmentInfoInvalid(f"the file's url {url[:100]!r} is not an mxc:// URI")
    return match["server"], match["media"]


def _unpadded(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _decode(
    value: object, *, urlsafe: bool, length: int, what: str, error: type[Exception]
) -> bytes:
    """Unpadded (or padded) base64 of exactly ``length`` bytes."""
    if not isinstance(value, str) or len(value) > 4 * length:
        raise error(f"the file's {what} is not base64 text")
    text = value.rstrip("=")
    if urlsafe:  # JWK k is base64url; accept the standard alphabet too, as clients do
        text = text.replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise error(f"the file's {what} is not valid base64") from None
    if len(raw) != length:
        raise error(f"the file's {what} is {len(raw)} bytes, not {length}")
    return raw


@dataclass(frozen=True)
class EncryptedFile:
    """One encrypted file: where it is and what decrypts and checks it.

    ``key`` is the raw 32-byte AES key, ``iv`` the 16-byte initial counter block,
    ``sha256`` the 32-byte digest of the ciphertext. ``to_content`` and
    ``from_content`` convert to and from the event's JSON.
    """

    url: str
    key: bytes
    iv: bytes
    sha256: bytes
    version: str = VERSION

    def __repr__(self) -> str:  # the key is a secret
        return f"EncryptedFile(url={self.url!r}, version={self.version!r})"

    def to_content(self) -> dict[str, Any]:
        """The JSON object the spec calls ``EncryptedFile``."""
        return {
            "url": self.url,
            "key": {
                "kty": "oct",
                "key_ops": ["encrypt", "decrypt"],
                "alg": "A256CTR",
                "k": base64.urlsafe_b64encode(self.key).decode().rstrip("="),
                "ext": True,
            },
            "iv": _unpadded(self.iv),
            "hashes": {"sha256": _unpadded(self.sha256)},
            "v": self.version,
        }

    @classmethod
    def from_content(cls, content: object) -> EncryptedFile:
        """Check an event's ``file`` object. Raises ``AttachmentInfoInvalid`` (shape, url,
        iv, hash), ``AttachmentVersionUnknown`` (``v`` other than ``"v2"``) or
        ``AttachmentKeyInvalid`` (the JWK)."""
        if isinstance(content, EncryptedFile):
            return content
        if not isinstance(content, Mapping):
            raise AttachmentInfoInvalid("the file info is not a JSON object")
        version = content.get("v")
        if version != VERSION:
            raise AttachmentVersionUnknown(version)
        url = content.get("url")
        parse_mxc(url)
        assert isinstance(url, str)
        iv = _decode(
            content.get("iv"), urlsafe=False, length=16, what="iv", error=AttachmentInfoInvalid
        )
        hashes = content.get("hashes")
        if not isinstance(hashes, Mapping) or "sha256" not in hashes:
            raise AttachmentInfoInvalid("the file info has no hashes.sha256")
        digest = _decode(
            hashes["sha256"],
            urlsafe=False,
            length=32,
            what="sha256 hash",
            error=AttachmentInfoInvalid,
        )
        return cls(url, _jwk_key(content.get("key")), iv, digest, VERSION)


def _jwk_key(jwk: object) -> bytes:
    if not isinstance(jwk, Mapping):
        raise AttachmentKeyInvalid("the file info has no key object")
    if jwk.get("kty") != "oct" or jwk.get("alg") != "A256CTR":
        raise AttachmentKeyInvalid(
            f"the file's key is not an AES-256-CTR key (kty {jwk.get('kty')!r}, "
            f"alg {jwk.get('alg')!r}; the spec's are 'oct' and 'A256CTR')"
        )
    ops = jwk.get("key_ops")
    if not isinstance(ops, list) or "decrypt" not in ops:
        raise AttachmentKeyInvalid("the file's key does not allow decryption (key_ops)")
    return _decode(jwk.get("k"), urlsafe=True, length=32, what="key", error=AttachmentKeyInvalid)


class AttachmentEncryptor:
    """Encrypts one file a chunk at a time: ``update`` each chunk, then ``finalize``.

    The key and IV are fresh for every file (never reuse one: CTR with a repeated
    key and IV gives the XOR of the plaintexts away).
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        # random high 64 bits, zero counter: 2**64 blocks before a wrap (spec: v2)
        self._iv = secrets.token_bytes(8) + bytes(8)
        self._cipher = Cipher(algorithms.AES(self._key), modes.CTR(self._iv)).encryptor()
        self._hash = hashlib.sha256()
        self._digest: bytes | None = None
        #: ciphertext bytes so far (equal to the plaintext's: CTR adds nothing)
        self.size = 0

    def update(self, chunk: bytes) -> bytes:
        if self._digest is not None:
            raise LocalProtocolError("this attachment is finished; encrypt a new file anew")
        ciphertext = self._cipher.update(chunk)
        self._hash.update(ciphertext)
        self.size += len(ciphertext)
        return ciphertext

    def finalize(self) -> bytes:
        """The last ciphertext bytes (always empty for CTR); after it, ``file_info``."""
        if self._digest is None:
            tail = self._cipher.finalize()
            self._hash.update(tail)
            self._digest = self._hash.digest()
            return tail
        return b""

    def file_info(self, url: str) -> EncryptedFile:
        """The ``EncryptedFile`` for the uploaded ciphertext at ``url`` (after ``finalize``)."""
        if self._digest is None:
            raise LocalProtocolError("call finalize() before file_info()")
        parse_mxc(url)
        return EncryptedFile(url, self._key, self._iv, self._digest)


class AttachmentDecryptor:
    """Decrypts one file a chunk at a time; ``verify`` checks the hash at the end.

    Plaintext from ``update`` is not known good until ``verify`` returns: hold it back
    (a temporary file, the last chunk) until then.
    """

    def __init__(self, file: EncryptedFile) -> None:
        self.file = file
        self._cipher = Cipher(algorithms.AES(file.key), modes.CTR(file.iv)).decryptor()
        self._hash = hashlib.sha256()
        # blocks left before the IV's low 64 bits (the counter) wrap: 2**64 from a v2 IV
        self._blocks_left = (1 << 64) - int.from_bytes(file.iv[8:], "big")
        self.size = 0

    def update(self, chunk: bytes) -> bytes:
        """Raises ``AttachmentInfoInvalid`` where the counter would wrap: browsers count
        in the low 64 bits only and start over, this cipher carries into the high half,
        so the same ciphertext (and hash) would show different plaintext in each."""
        if -(-(self.size + len(chunk)) // 16) > self._blocks_left:
            raise AttachmentInfoInvalid(
                "the file's iv leaves its 64-bit counter too little room: it would wrap "
                "within the file, where clients disagree on the plaintext"
            )
        self._hash.update(chunk)
        self.size += len(chunk)
        return self._cipher.update(chunk)

    def verify(self) -> bytes:
        """The last plaintext bytes, once the whole ciphertext's SHA-256 matched;
        ``AttachmentHashMismatch`` otherwise."""
        got = self._hash.digest()
        if not hmac.compare_digest(got, self.file.sha256):
            raise AttachmentHashMismatch(self.file.url, _unpadded(self.file.sha256), _unpadded(got))
        return self._cipher.finalize()


def encrypt_attachment(plaintext: bytes) -> tuple[bytes, AttachmentEncryptor]:
    """A small file's ciphertext at once; ``encryptor.file_info(url)`` after the upload."""
    encryptor = AttachmentEncryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    return ciphertext, encryptor


def decrypt_attachment(ciphertext: bytes, file: EncryptedFile | Mapping[str, Any]) -> bytes:
    """A small file's plaintext, its hash checked first. Raises an ``AttachmentError``."""
    decryptor = AttachmentDecryptor(EncryptedFile.from_content(file))
    plaintext = decryptor.update(ciphertext)
    return plaintext + decryptor.verify()


def file_content(
    file: EncryptedFile,
    *,
    body: str,
    msgtype: str = "m.file",
    mimetype: str | None = None,
    size: int | None = None,
    info: Mapping[str, Any] | None = None,
    thumbnail: EncryptedFile | None = None,
    thumbnail_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of an ``m.room.message`` carrying an encrypted file (``m.file``,
    ``m.image``, ``m.video``, ``m.audio``): ``file`` instead of ``url``, and the
    thumbnail's ``EncryptedFile`` as ``info.thumbnail_file`` (spec: "m.file",
    "m.image"). ``body`` is the file name or a description."""
    if msgtype not in ("m.file", "m.image", "m.video", "m.audio"):
        raise LocalProtocolError(
            f"{msgtype!r} carries no file; use m.file, m.image, m.video or m.audio"
        )
    details: dict[str, Any] = dict(info or {})
    if mimetype is not None:
        details["mimetype"] = mimetype
    if size is not None:
        details["size"] = size
    if thumbnail is not None:
        details["thumbnail_file"] = thumbnail.to_content()
        if thumbnail_info is not None:
            details["thumbnail_info"] = dict(thumbnail_info)
    content: dict[str, Any] = {"msgtype": msgtype, "body": body, "file": file.to_content()}
    if details:
        content["info"] = details
    return content
