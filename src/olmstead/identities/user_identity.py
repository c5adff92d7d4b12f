"""Other users' cross-signing identities, read from ``/keys/query`` and checked link by link.

A ``/keys/query`` answer carries, per user, ``master_keys``, ``self_signing_keys`` and
(for our own user only) ``user_signing_keys`` (spec v1.18, "Cross-signing"). Each is a
``CrossSigningKey`` object: ``user_id``, ``usage`` and ``keys`` with exactly one
``ed25519:<public key>`` entry whose value is that same key, plus ``signatures``.

Every link of the chain is checked before anything is kept:

- the master key names the user it is listed under, has usage ``master``, exactly one
  well-formed Ed25519 key, and any signature it carries by itself verifies;
- the self-signing key is the same shape with usage ``self_signing`` and is signed by
  that master key;
- the user-signing key likewise with usage ``user_signing``, signed by the master key.

A user whose keys fail any check keeps what was stored before; the refusal is logged
and returned. The first master key that checks out is pinned (trust on first use); a
different one later is never adopted silently: it is kept beside the pinned one as
``changed_to`` and reported (``IdentityChanged``) until the application calls
``OlmMachine.acknowledge_identity_change``. If we had verified the pinned identity when
it changed, sharing room keys with that user stops until then.

Pure: the machine reads the stored identities it needs and commits what this returns.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from olmstead.errors import OlmsteadError
from olmstead.identities.device import Device
from olmstead.olm import checked
from olmstead.olm.canonical_json import nested_within
from olmstead.olm.signing import signable_bytes, signature_of, verify_signed_json

__all__ = [
    "MAX_KEY_OBJECT_DEPTH",
    "CrossSigningKey",
    "IdentityChanged",
    "IdentityOutcome",
    "InvalidCrossSigningKey",
    "UserIdentity",
    "apply_identities",
    "check_identity",
]

log = logging.getLogger(__name__)

#: how deep a cross-signing key object may nest (a real one is 3 levels:
#: ``signatures`` → user → key); deeper ones are refused where they enter
MAX_KEY_OBJECT_DEPTH = 16


class InvalidCrossSigningKey(ValueError):
    """A cross-signing key object failed a check; the message says which."""


@dataclass(frozen=True)
class CrossSigningKey:
    """One checked cross-signing key of ``user_id``: its Ed25519 public key and the object."""

    user_id: str
    usage: str
    #: the Ed25519 public key, unpadded base64; also its key ID (``ed25519:<key>``)
    key: str
    #: the object as the server sent it, kept for re-verification and later signatures
    data: dict[str, Any]

    @classmethod
    def from_json(cls, user_id: str, usage: str, data: Any) -> CrossSigningKey:
        """Check the shape of a cross-signing key object listed under ``user_id``.

        Raises ``InvalidCrossSigningKey``. Signatures by other keys are checked by
        the caller (``signed_by``).
        """
        if not isinstance(data, dict):
            raise InvalidCrossSigningKey(f"the {usage} key is not an object")
        if not nested_within(data, MAX_KEY_OBJECT_DEPTH):
            # it is stored as sent: one nested thousands deep would fail to serialise
            raise InvalidCrossSigningKey(
                f"the {usage} key object is nested deeper than {MAX_KEY_OBJECT_DEPTH} levels"
            )
        if data.get("user_id") != user_id:
            raise InvalidCrossSigningKey(
                f"the {usage} key listed under {user_id} names {data.get('user_id')!r}"
            )
        usages = data.get("usage")
        if not isinstance(usages, list) or usage not in usages:
            raise InvalidCrossSigningKey(f"the {usage} key's usage is {usages!r}")
        keys = data.get("keys")
        if not isinstance(keys, dict) or len(keys) != 1:
            raise InvalidCrossSigningKey(f"the {usage} key object must hold exactly one key")
        ((key_id, key),) = keys.items()
        if not isinstance(key, str) or key_id != f"ed25519:{key}":
            raise InvalidCrossSigningKey(f"the {usage} key's ID {key_id!r} does not name its key")
        if key.endswith("="):  # one key, one name: a padded spelling could fake a change
            raise InvalidCrossSigningKey(f"the {usage} key {key!r} is not unpadded base64")
        # a key that is not a valid Ed25519 point cannot sign: refuse it here, not later
        if not _is_ed25519(key):
            raise InvalidCrossSigningKey(f"the {usage} key {key!r} is not an Ed25519 key")
        return cls(user_id, usage, key, data)

    def signed_by(self, user_id: str, key_id: str, ed25519: str) -> bool:
        """Whether the object carries a valid signature by ``ed25519`` as ``user_id``/``key_id``."""
        return verify_signed_json(self.data, user_id, key_id, ed25519)

    def signs(self, keys: dict[str, Any]) -> bool:
        """Whether this key signed ``keys`` (a device's keys, or another cross-signing key)."""
        return verify_signed_json(keys, self.user_id, self.key, self.key)


def _is_ed25519(key: str) -> bool:
    # through the checked place: vodozemac panics (a BaseException) on a 33-byte key
    try:
        checked.ed25519_key(key, "key")
    except OlmsteadError:
        return False
    return True


@dataclass(frozen=True)
class UserIdentity:
    """A user's pinned cross-signing identity, and a changed one awaiting acknowledgement."""

    user_id: str
    master: CrossSigningKey
    self_signing: CrossSigningKey
    #: only ever known for our own user
    user_signing: CrossSigningKey | None = None
    #: the identity the server lists now, if its master key differs from the pinned one
    changed_to: UserIdentity | None = None
    #: we had verified the pinned identity when it changed: no room keys until acknowledged
    was_verified: bool = False

    @property
    def master_key(self) -> str:
        """The pinned master key (Ed25519, unpadded base64)."""
        return self.master.key

    @property
    def changed(self) -> bool:
        """The server lists another master key than the pinned one."""
        return self.changed_to is not None

    def signs_device(self, device: Device) -> bool:
        """Whether the pinned self-signing key signed ``device``'s keys."""
        return device.user_id == self.user_id and self.self_signing.signs(device.keys)

    def to_json(self) -> str:
        """The stored form: the key objects as the server sent them, the change, the flag."""
        return json.dumps(self._plain(), sort_keys=True)

    def _plain(self) -> dict[str, Any]:
        return {
            "master": self.master.data,
            "self_signing": self.self_signing.data,
            "user_signing": None if self.user_signing is None else self.user_signing.data,
            "changed_to": None if self.changed_to is None else self.changed_to._plain(),
            "was_verified": self.was_verified,
        }

    @classmethod
    def from_json(cls, user_id: str, data: str) -> UserIdentity:
        """An identity as the store kept it (checked when it was accepted)."""
        return cls._from_plain(user_id, json.loads(data))

    @classmethod
    def _from_plain(cls, user_id: str, plain: dict[str, Any]) -> UserIdentity:
        user_signing = plain.get("user_signing")
        changed_to = plain.get("changed_to")
        return cls(
            user_id,
            _stored_key(user_id, "master", plain["master"]),
            _stored_key(user_id, "self_signing", plain["self_signing"]),
            None if user_signing is None else _stored_key(user_id, "user_signing", user_signing),
            None if changed_to is None else cls._from_plain(user_id, changed_to),
            bool(plain.get("was_verified", False)),
        )


def _stored_key(user_id: str, usage: str, data: dict[str, Any]) -> CrossSigningKey:
    ((_key_id, key),) = data["keys"].items()
    return CrossSigningKey(user_id, usage, key, data)


def _with_signatures_of(old: CrossSigningKey, new: CrossSigningKey) -> CrossSigningKey:
    """``new`` (the same key as ``old``) with every signature of ``old`` it lacks.

    If the signed content differs (the server changed the object), ``old`` is kept whole:
    its signatures would not verify over the new content.
    """
    try:
        same = signable_bytes(old.data) == signable_bytes(new.data)
    except RecursionError:  # nested thousands deep: not a key object we adopt
        same = False
    if not same:
        return old
    merged: dict[str, Any] = {}
    for source in (new.data, old.data):  # old's last: the signature we had stays
        signatures = source.get("signatures")
        for user_id, by_key in (signatures if isinstance(signatures, dict) else {}).items():
            if isinstance(by_key, dict):
                merged.setdefault(user_id, {}).update(by_key)
    return replace(new, data={**new.data, "signatures": merged})


def check_identity(
    user_id: str, master: Any, self_signing: Any, user_signing: Any = None
) -> UserIdentity:
    """Check one user's chain (see the module docstring); raises ``InvalidCrossSigningKey``."""
    master_key = CrossSigningKey.from_json(user_id, "master", master)
    if signature_of(master_key.data, user_id, master_key.key) is not None and not (
        master_key.signs(master_key.data)
    ):
        raise InvalidCrossSigningKey("the master key's signature by itself does not verify")
    if self_signing is None:
        raise InvalidCrossSigningKey("the master key comes without a self-signing key")
    ssk = CrossSigningKey.from_json(user_id, "self_signing", self_signing)
    if not master_key.signs(ssk.data):
        raise InvalidCrossSigningKey("the self-signing key is not signed by the master key")
    usk = None
    if user_signing is not None:
        usk = CrossSigningKey.from_json(user_id, "user_signing", user_signing)
        if not master_key.signs(usk.data):
            raise InvalidCrossSigningKey("the user-signing key is not signed by the master key")
    return UserIdentity(user_id, master_key, ssk, usk)


@dataclass(frozen=True)
class IdentityChanged:
    """A user's master key changed on the server; the pinned one is kept until acknowledged.

    ``was_verified``: we had verified the pinned identity, so room keys stop going to
    the user's devices until ``OlmMachine.acknowledge_identity_change(user_id)``.
    """

    user_id: str
    old_master_key: str
    new_master_key: str
    was_verified: bool


@dataclass
class IdentityOutcome:
    """What one ``/keys/query`` answer changes in identities, for the machine to commit."""

    identities: list[UserIdentity] = field(default_factory=list)
    changes: list[IdentityChanged] = field(default_factory=list)
    #: users whose keys were refused, with why (also logged)
    refused: list[tuple[str, str]] = field(default_factory=list)


def apply_identities(
    response: Mapping[str, Any],
    users: Iterable[str],
    stored: Mapping[str, UserIdentity | None],
    is_verified: Callable[[UserIdentity], bool],
) -> IdentityOutcome:
    """Apply the cross-signing keys of a ``/keys/query`` answer for ``users``.

    ``stored``: each user's identity as stored; ``is_verified(identity)`` tells whether
    we verified an identity (decided by the machine from our own). Users the answer does
    not list keep what was stored (a server that lost their keys cannot take trust away
    silently, nor give any).
    """
    outcome = IdentityOutcome()
    sections: dict[str, Mapping[str, Any]] = {}
    for name in ("master_keys", "self_signing_keys", "user_signing_keys"):
        section = response.get(name)
        sections[name] = section if isinstance(section, Mapping) else {}
    for user_id in users:
        master = sections["master_keys"].get(user_id)
        if master is None:
            continue
        try:
            new = check_identity(
                user_id,
                master,
                sections["self_signing_keys"].get(user_id),
                sections["user_signing_keys"].get(user_id),
            )
        except InvalidCrossSigningKey as exc:
            log.warning("refused the cross-signing keys of %s: %s", user_id, exc)
            outcome.refused.append((user_id, str(exc)))
            continue
        old = stored.get(user_id)
        if old is None:
            outcome.identities.append(new)  # trust on first use: pinned
            continue
        if old.master.key == new.master.key:
            # same identity: newer objects (more signatures, a rotated self-signing key
            # the master signed);
            # a pending change, if any, was undone on the server. Signatures are never
            # taken away: a server that dropped ours over their master key could otherwise
            # unverify them first, and then change it without blocking sharing
            updated = replace(
                new,
                master=_with_signatures_of(old.master, new.master),
                changed_to=None,
                was_verified=False,
            )
            if updated != old:
                outcome.identities.append(updated)
            continue
        if old.changed_to is not None and old.changed_to == new:
            continue  # already reported
        was_verified = old.was_verified if old.changed_to is not None else is_verified(old)
        outcome.identities.append(replace(old, changed_to=new, was_verified=was_verified))
        if old.changed_to is None or old.changed_to.master.key != new.master.key:
            log.warning(
                "the master key of %s changed from %s to %s; the old one stays pinned until "
                "the change is acknowledged%s",
                user_id,
                old.master.key,
                new.master.key,
                " (we had verified it: no room keys go to them meanwhile)" if was_verified else "",
            )
            outcome.changes.append(
                IdentityChanged(user_id, old.master.key, new.master.key, was_verified)
            )
    return outcome
