"""``CrossSigningMachine``: our cross-signing identity, secret storage and recovery.

It decides and builds; the ``OlmMachine`` commits what it returns and only then
adopts it. Every request about our identity goes through one outbox kept in the
store (``CrossSigningRecord.state["outbox"]``): committed before it is handed out,
handed out one at a time in order (the signatures need the keys on the server
first), and removed only when the server confirmed it. After a crash the same
requests, with the same keys and bytes, go out again; a bootstrap that was
interrupted is resumed, never started over with new keys.

Spec: client-server API, "Cross-signing" and "Secret storage".
"""

from __future__ import annotations

import logging
import os
import secrets
import string
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from olmstead.backoff import Backoff
from olmstead.cross_signing import secret_storage as ssss
from olmstead.cross_signing.identity import published_identity
from olmstead.cross_signing.keys import (
    MASTER,
    SELF_SIGNING,
    USAGES,
    USER_SIGNING,
    SigningKey,
    b64decode,
    b64encode,
    key_object,
    public_key_of,
)
from olmstead.cross_signing.record import CrossSigningRecord
from olmstead.errors import (
    CrossSigningExists,
    CrossSigningMissing,
    InvalidSignature,
    LocalProtocolError,
    SecretsMismatch,
    SecretStorageMissing,
    SignatureUploadFailed,
    WrongPassphrase,
    WrongRecoveryKey,
)
from olmstead.requests import (
    AccountDataRequest,
    DeviceSigningUploadRequest,
    SignaturesUploadRequest,
)

__all__ = ["SECRET_NAMES", "CrossSigningMachine", "CrossSigningStatus"]

log = logging.getLogger(__name__)

#: the account data type of each cross-signing secret (spec: "Storing secrets")
SECRET_NAMES = {
    MASTER: "m.cross_signing.master",
    SELF_SIGNING: "m.cross_signing.self_signing",
    USER_SIGNING: "m.cross_signing.user_signing",
}
#: a handed-out request nobody reported on may go out again after this long (seconds)
IN_FLIGHT_TIMEOUT = 120.0

CrossSigningRequest = DeviceSigningUploadRequest | SignaturesUploadRequest | AccountDataRequest
Signer = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class CrossSigningStatus:
    """What this store holds of our identity.

    ``has_keys``: the private keys are here. ``published``: the server confirmed our
    public keys (before that they are not ours yet). ``pending``: requests still to
    reach the server. ``public_keys``: usage -> public key, for the keys held.
    """

    has_keys: bool
    published: bool
    pending: int
    public_keys: dict[str, str]


class CrossSigningMachine:
    def __init__(
        self, user_id: str, device_id: str, record: CrossSigningRecord | None, backoff: Backoff
    ) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.record = record
        self._in_flight: str | None = None
        self._in_flight_since = 0.0
        self._backoff = backoff

    # --- what we hold ------------------------------------------------------------------------

    def status(self) -> CrossSigningStatus:
        record = self.record
        if record is None:
            return CrossSigningStatus(False, False, 0, {})
        return CrossSigningStatus(
            all(u in record.secrets for u in USAGES),
            bool(record.state.get("published")),
            len(record.state.get("outbox", [])),
            self.public_keys(),
        )

    def public_keys(self) -> dict[str, str]:
        if self.record is None:
            return {}
        return {u: self._key(u).public_key for u in USAGES if u in self.record.secrets}

    def _key(self, usage: str) -> SigningKey:
        assert self.record is not None
        return SigningKey(b64decode(self.record.secrets[usage]))

    def adopt(self, record: CrossSigningRecord, *, fresh: bool = False) -> None:
        """Take ``record`` as ours: call only once it is committed. ``fresh``: a new outbox
        (a bootstrap, a recovery), so nothing of the old one is in flight or backing off."""
        self.record = record
        if fresh:
            self._in_flight = None
            self._backoff.succeeded()

    def forget(self, record: CrossSigningRecord | None) -> None:
        """The store moved on under us: take its record, drop what was in flight."""
        self.record = record
        self._in_flight = None

    # --- the outbox --------------------------------------------------------------------------

    def next_request(self, now: float) -> CrossSigningRequest | None:
        """The head of the outbox, if nothing is in flight and the backoff allows it."""
        outbox = self.record.state.get("outbox", []) if self.record else []
        if not outbox or not self._backoff.ready(now):
            return None
        if self._in_flight is not None and now - self._in_flight_since < IN_FLIGHT_TIMEOUT:
            return None
        entry = outbox[0]
        self._in_flight, self._in_flight_since = entry["id"], now
        return _request(self.user_id, entry)

    def owns(self, request_id: str) -> bool:
        return self._in_flight is not None and self._in_flight == request_id

    def on_response(
        self, request_id: str, response: Mapping[str, Any]
    ) -> tuple[CrossSigningRecord, SignatureUploadFailed | None]:
        """The record without the confirmed request (to commit), and any refused signatures."""
        assert self.record is not None
        assert self.owns(request_id)
        self._in_flight = None
        self._backoff.succeeded()
        record = self.record.copy()
        entry = record.state["outbox"].pop(0)
        problem = None
        if entry["kind"] == "device_signing":
            record.state["published"] = True
            log.info("the server confirmed the cross-signing keys of %s", self.user_id)
        elif entry["kind"] == "signatures":
            failures = response.get("failures") if isinstance(response, Mapping) else None
            if isinstance(failures, Mapping) and failures:
                problem = SignatureUploadFailed(_failures(failures))
                log.warning("%s", problem)
        return record, problem

    def on_failure(self, request_id: str, now: float) -> None:
        if self.owns(request_id):
            self._in_flight = None
            self._backoff.failed(now)

    # --- making an identity ------------------------------------------------------------------

    def bootstrap(
        self,
        own_keys: Mapping[str, Any],
        device_keys: dict[str, Any],
        sign_with_device: Signer,
        passphrase: str | None,
        iterations: int,
    ) -> tuple[CrossSigningRecord | None, str]:
        """New keys and secret storage, or the ones an interrupted bootstrap made.

        ``own_keys`` is the ``/keys/query`` answer for our own user: if it shows a
        master key this store does not hold, ``CrossSigningExists`` (recover instead).
        Returns the record to commit (``None``: nothing new) and the recovery key.
        """
        record = self.record
        published = published_identity(own_keys, self.user_id, self.device_id, "")
        if record is not None and all(u in record.secrets for u in USAGES):
            if published.master_key not in (None, self.public_keys()[MASTER]):
                raise CrossSigningExists(self.user_id, str(published.master_key))
            key = record.secrets.get("secret_storage_key")
            return None, ssss.encode_recovery_key(b64decode(key)) if key else ""
        if published.master_key is not None:
            raise CrossSigningExists(self.user_id, published.master_key)
        keys = {usage: SigningKey.generate() for usage in USAGES}
        passphrase_info = None
        if passphrase is not None:
            passphrase_info = (ssss.new_salt(), iterations)
            storage_key = ssss.derive_key(passphrase, *passphrase_info)
        else:
            storage_key = os.urandom(32)
        key_id = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
        record = CrossSigningRecord(
            {u: b64encode(k.seed) for u, k in keys.items()}
            | {"secret_storage_key": b64encode(storage_key)},
            {
                "published": False,
                "secret_storage_key_id": key_id,
                "passphrase": list(passphrase_info) if passphrase_info else None,
                "outbox": [],
            },
        )
        master = keys[MASTER]
        master_obj = key_object(self.user_id, MASTER, master.public_key)
        ssk_obj = master.sign_json(
            self.user_id, key_object(self.user_id, SELF_SIGNING, keys[SELF_SIGNING].public_key)
        )
        usk_obj = master.sign_json(
            self.user_id, key_object(self.user_id, USER_SIGNING, keys[USER_SIGNING].public_key)
        )
        outbox: list[dict[str, Any]] = record.state["outbox"]
        outbox.append(
            _entry(
                "device_signing",
                body={
                    "master_key": master_obj,
                    "self_signing_key": ssk_obj,
                    "user_signing_key": usk_obj,
                },
            )
        )
        outbox.append(
            _entry("signatures", body=self._own_signatures(keys, device_keys, sign_with_device))
        )
        description = ssss.key_description(storage_key, passphrase_info)
        outbox.append(_account_data(ssss.key_type(key_id), description))
        for usage, name in SECRET_NAMES.items():
            sealed = ssss.encrypt_secret(storage_key, name, record.secrets[usage].encode())
            outbox.append(_account_data(name, {"encrypted": {key_id: sealed.to_json()}}))
        # the default key last: a reader never finds a default without its secrets
        outbox.append(_account_data(ssss.DEFAULT_KEY_TYPE, {"key": key_id}))
        return record, ssss.encode_recovery_key(storage_key)

    def _own_signatures(
        self, keys: Mapping[str, SigningKey], device_keys: dict[str, Any], sign_with_device: Signer
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """Our device signed by the self-signing key, and the master key by our device."""
        device = {k: v for k, v in device_keys.items() if k not in ("signatures", "unsigned")}
        master_obj = key_object(self.user_id, MASTER, keys[MASTER].public_key)
        by_device = sign_with_device(master_obj)
        return {
            self.user_id: {
                self.device_id: keys[SELF_SIGNING].sign_json(self.user_id, device),
                keys[MASTER].public_key: by_device,
            }
        }

    # --- recovering it on another device ----------------------------------------------------

    def recover(
        self,
        own_keys: Mapping[str, Any],
        account_data: Mapping[str, Any],
        recovery_key: bytes | None,
        passphrase: str | None,
        device_keys: dict[str, Any],
        sign_with_device: Signer,
    ) -> CrossSigningRecord:
        """Open secret storage, check every secret against the published keys: the record.

        ``account_data`` maps account data types to their content, as the server holds
        them (absent: not there). Raises ``SecretStorageMissing``, ``WrongRecoveryKey``,
        ``WrongPassphrase``, ``SecretsMismatch``, ``CrossSigningMissing`` or
        ``InvalidSignature``; on any of them nothing is to be committed or sent.
        """
        default = account_data.get(ssss.DEFAULT_KEY_TYPE)
        key_id = default.get("key") if isinstance(default, Mapping) else None
        if not isinstance(key_id, str):
            raise SecretStorageMissing(
                f"{self.user_id} has no default secret storage key "
                f"({ssss.DEFAULT_KEY_TYPE}): cross-signing was set up without secret storage, "
                "or not at all. Nothing was stored or sent."
            )
        description = ssss.read_key_description(key_id, account_data.get(ssss.key_type(key_id)))
        if description is None:
            raise SecretStorageMissing(
                f"the secret storage key {key_id!r} of {self.user_id} has no description olmstead "
                f"can use (algorithm {ssss.AES_HMAC_SHA2} with iv and mac). Nothing was stored "
                "or sent."
            )
        if recovery_key is not None:
            key = recovery_key
            if not ssss.key_matches(key, description):
                raise WrongRecoveryKey(key_id)
        elif passphrase is not None:
            if description.passphrase is None:
                raise SecretStorageMissing(
                    f"the secret storage key {key_id!r} was not made from a passphrase: use the "
                    "recovery key. Nothing was stored or sent."
                )
            key = ssss.derive_key(passphrase, *description.passphrase)
            if not ssss.key_matches(key, description):
                raise WrongPassphrase(key_id)
        else:
            raise LocalProtocolError("recover needs a recovery key or a passphrase")
        found: dict[str, SigningKey] = {}
        for usage, name in SECRET_NAMES.items():
            sealed = ssss.read_encrypted_secret(account_data.get(name), key_id)
            plain = None if sealed is None else ssss.decrypt_secret(key, name, sealed)
            if plain is None:
                raise SecretStorageMissing(
                    f"the secret {name} of {self.user_id} is missing from secret storage key "
                    f"{key_id!r}, or does not decrypt with it (damaged). Nothing was stored or "
                    "sent."
                )
            try:
                found[usage] = SigningKey(b64decode(plain.decode()))
            except (ValueError, UnicodeDecodeError):
                raise SecretsMismatch(self.user_id, [usage]) from None
        published = published_identity(own_keys, self.user_id, self.device_id, "")
        if published.master_key is None:
            raise CrossSigningMissing(
                f"the server publishes no master key for {self.user_id}: there is no identity "
                "to recover. Nothing was stored or sent."
            )
        if not (published.self_signing_valid and published.user_signing_valid):
            raise InvalidSignature(
                f"the self-signing or user-signing key the server publishes for {self.user_id} "
                "is missing or not signed by its master key. Nothing was stored or sent."
            )
        wrong = [u for u in USAGES if found[u].public_key != published.public_keys[u]]
        if wrong:
            raise SecretsMismatch(self.user_id, wrong)
        record = CrossSigningRecord(
            {u: b64encode(k.seed) for u, k in found.items()},
            {
                "published": True,
                "secret_storage_key_id": key_id,
                "passphrase": None,
                "recovered": True,
                "outbox": [
                    _entry(
                        "signatures",
                        body=self._own_signatures(found, device_keys, sign_with_device),
                    )
                ],
            },
        )
        return record

    # --- signing others ------------------------------------------------------------------------

    def sign_user(self, user_id: str, master_key: Any) -> CrossSigningRecord:
        """The record with a signature of ``user_id``'s master key (our user-signing key)
        added to the outbox: the end of a verification. Raises ``CrossSigningMissing`` or
        ``InvalidSignature``."""
        status = self.status()
        if not status.has_keys or not status.published:
            raise CrossSigningMissing(
                "signing another user needs our own cross-signing keys, published: run "
                "bootstrap_cross_signing() or recover() first"
            )
        if user_id == self.user_id:
            raise LocalProtocolError("our own master key is signed by our devices, not by us")
        public = public_key_of(master_key, user_id, MASTER)
        if public is None:
            raise InvalidSignature(
                f"the master key given for {user_id} is not a well-formed cross-signing master "
                "key of that user. Nothing was signed."
            )
        unsigned = {k: v for k, v in master_key.items() if k not in ("signatures", "unsigned")}
        signed = self._key(USER_SIGNING).sign_json(self.user_id, unsigned)
        assert self.record is not None
        record = self.record.copy()
        record.state.setdefault("outbox", []).append(
            _entry("signatures", body={user_id: {public: signed}})
        )
        return record


def _entry(kind: str, **fields: Any) -> dict[str, Any]:
    return {"id": f"{kind}-{uuid.uuid4().hex[:16]}", "kind": kind, **fields}


def _account_data(event_type: str, content: dict[str, Any]) -> dict[str, Any]:
    return _entry("account_data", event_type=event_type, content=content)


def _request(user_id: str, entry: Mapping[str, Any]) -> CrossSigningRequest:
    kind, request_id = entry["kind"], entry["id"]
    if kind == "device_signing":
        body = entry["body"]
        return DeviceSigningUploadRequest(
            request_id, body["master_key"], body["self_signing_key"], body["user_signing_key"]
        )
    if kind == "signatures":
        return SignaturesUploadRequest(request_id, entry["body"])
    return AccountDataRequest(request_id, user_id, entry["event_type"], entry["content"])


def _failures(failures: Mapping[str, Any]) -> dict[str, dict[str, object]]:
    """The server's failures map, kept to strings and small objects (it is hostile input)."""
    clean: dict[str, dict[str, object]] = {}
    for user, keys in list(failures.items())[:100]:
        if isinstance(user, str) and isinstance(keys, Mapping):
            clean[user] = {
                str(key): (
                    {k: str(v)[:200] for k, v in detail.items() if k in ("errcode", "error")}
                    if isinstance(detail, Mapping)
                    else str(detail)[:200]
                )
                for key, detail in list(keys.items())[:100]
            }
    return clean
