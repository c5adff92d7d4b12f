"""How the operator's pickle key becomes vodozemac's 32-byte key, and the key check.

The operator holds either a string (as bridge configs hold it) or 32 raw bytes.

- 32 raw bytes are used as the vodozemac key as they are: they are assumed to be
  random already (``olmstead.store.load_or_create_key_file`` makes such keys).
- A string is stretched with scrypt (N=2**15, r=8, p=1) and a 16-byte random salt
  kept in the store, to 32 bytes. Config strings are often short or well known
  (``mautrix.bridge.e2ee``), so the stretch and the per-store salt make a stolen
  store as costly to brute-force as the scrypt parameters allow.

A key's *fingerprint* (``1a2b-3c4d-5e6f-7a8b``, the first 8 bytes of SHA-256 over a
fixed label and the key material) is the same on every store and before and after a
rekey, so an operator can compare keys across stores and logs:

- for raw keys the material is the key itself (a digest of 256 random bits);
- for strings it is the string's own scrypt with a fixed label as its salt and twice
  the store's cost (N=2**16), never the store's salted key: a guess checked against a
  fingerprint costs twice one checked against the store's key check. What the fixed
  label gives up is a per-store salt *for the fingerprint*: one dictionary run serves
  every store, so a weak string is weak everywhere (use a key file where that matters).

Every store records a key check (version 2): the KDF parameters, a *check* digest of
the salted derived key (the same digest as a raw key's fingerprint, over the store's
key), the key's fingerprint, and a checksum over the record. On open, the given key
is derived with the stored parameters; a different check means the wrong key
(``WrongPickleKey``, naming the store's fingerprint and the given key's), a bad
checksum a damaged store (``StoreCorrupt``), both decided before anything is written.
Stores written before version 2 recorded only the salted digest as their
"fingerprint"; they open unchanged, show the new fingerprint once opened, and move to
version 2 when rekeyed (no schema change: the record is JSON in the meta table).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from olmstead.errors import LocalProtocolError, StoreCorrupt, WrongPickleKey
from olmstead.store.files import link_into_place

__all__ = ["DerivedKey", "PickleKey", "load_or_create_key_file"]

_FINGERPRINT_LABEL = b"olmstead pickle key fingerprint v1\x00"
#: the salt of a string key's own, store-independent stretch for its fingerprint
_FINGERPRINT_SALT = b"olmstead pickle key fingerprint v2: the same on every store"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
#: twice the store's cost: a fingerprint is never the cheaper thing to guess against
_FINGERPRINT_SCRYPT = {"n": 2**16, "r": 8, "p": 1}
_CHECK_VERSION = 2


@dataclass(frozen=True, repr=False)
class DerivedKey:
    """The 32-byte vodozemac pickle key and its public fingerprint."""

    key: bytes
    fingerprint: str

    def __repr__(self) -> str:  # never print the key itself
        return f"DerivedKey(fingerprint={self.fingerprint!r})"


class PickleKey:
    """The secret an operator configures: a string or exactly 32 raw bytes."""

    __slots__ = ("_fingerprint", "_secret")

    def __init__(self, secret: str | bytes) -> None:
        if isinstance(secret, bytes) and len(secret) != 32:
            raise LocalProtocolError(
                f"a raw pickle key must be exactly 32 bytes, got {len(secret)}; "
                "pass a string to have it stretched instead"
            )
        if isinstance(secret, str) and not secret:
            raise LocalProtocolError("the pickle key is empty; configure a non-empty key")
        self._secret = secret
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"PickleKey({'raw' if isinstance(self._secret, bytes) else 'passphrase'})"

    @property
    def is_raw(self) -> bool:
        return isinstance(self._secret, bytes)

    def fingerprint(self) -> str:
        """The key's fingerprint, the same on every store (see the module docstring).
        For a string this costs one scrypt (N=2**16, 64 MB, a fraction of a second),
        once per ``PickleKey``."""
        if self._fingerprint is None:
            if isinstance(self._secret, bytes):
                material = self._secret
            else:
                material = Scrypt(salt=_FINGERPRINT_SALT, length=32, **_FINGERPRINT_SCRYPT).derive(
                    self._secret.encode("utf-8")
                )
            self._fingerprint = fingerprint(material)
        return self._fingerprint

    def _derive_key(self, params: dict[str, Any]) -> bytes:
        if isinstance(self._secret, bytes):
            return self._secret
        salt = base64.b64decode(params["salt"])
        return Scrypt(
            salt=salt, length=32, n=int(params["n"]), r=int(params["r"]), p=int(params["p"])
        ).derive(self._secret.encode("utf-8"))

    def derive(self, params: dict[str, Any]) -> DerivedKey:
        """Derive the vodozemac key with a store's recorded KDF parameters."""
        return DerivedKey(self._derive_key(params), self.fingerprint())

    def new_key_check(self) -> tuple[str, DerivedKey]:
        """A fresh key check record (JSON) for a new store, with the derived key."""
        params: dict[str, Any] = {"kdf": "scrypt", **_SCRYPT}
        params["salt"] = base64.b64encode(secrets.token_bytes(16)).decode()
        derived = self.derive(params)
        record = {
            **params,
            "version": _CHECK_VERSION,
            "check": fingerprint(derived.key),
            "fingerprint": derived.fingerprint,
        }
        record["checksum"] = _checksum(record)
        return json.dumps(record, sort_keys=True), derived

    def check(self, record_json: str, store: str) -> DerivedKey:
        """Derive the key for a store and prove it is the one the store was written with."""
        try:
            record = json.loads(record_json)
            if not isinstance(record, dict) or record.get("checksum") != _checksum(record):
                raise ValueError("checksum mismatch")
            current = record.get("version") == _CHECK_VERSION
            if current:
                expected_check, expected = str(record["check"]), str(record["fingerprint"])
            else:  # version 1: the salted digest was the "fingerprint"; no other one kept
                expected_check = str(record["fingerprint"])
                expected = f"{expected_check} (this store's own check, from before olmstead "
                expected += "kept fingerprints that are the same on every store)"
            key = self._derive_key(record)
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreCorrupt(store, f"the pickle key check record is damaged: {exc}") from None
        if fingerprint(key) != expected_check:
            raise WrongPickleKey(store, expected=expected, given=self.fingerprint())
        # the right key: a version 2 record already names its fingerprint (no second scrypt)
        return DerivedKey(key, expected if current else self.fingerprint())


def fingerprint(key: bytes) -> str:
    digest = hashlib.sha256(_FINGERPRINT_LABEL + key).hexdigest()[:16]
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


def _checksum(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def load_or_create_key_file(path: str | os.PathLike[str]) -> PickleKey:
    """Read a raw pickle key from ``path``, creating it first if it does not exist.

    A new key is written with mode 0600, fsynced together with its directory, and
    read back before it is returned: a key is never used before it is durably
    stored, so a store can never end up written with a key nobody kept.
    """
    target = Path(path)
    if not target.exists():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, base64.b64encode(secrets.token_bytes(32)) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        link_into_place(tmp, target)  # a key another process wrote first wins
    raw = base64.b64decode(target.read_bytes().strip(), validate=True)
    return PickleKey(raw)
