"""Our own cross-signing identity as ``/keys/query`` publishes it, checked link by link.

The chain (spec: "Cross-signing"): the master key signs the self-signing and the
user-signing keys; the self-signing key signs each of our devices. A link that
is missing, malformed or whose signature does not verify is reported as such;
nothing the server sends is trusted because it is there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from olmstead.cross_signing.keys import MASTER, SELF_SIGNING, USER_SIGNING, public_key_of
from olmstead.olm.signing import verify_signed_json

__all__ = ["OwnIdentity", "published_identity"]


@dataclass(frozen=True)
class OwnIdentity:
    """Our cross-signing keys as the server publishes them, with what checks out.

    A key is ``None`` when the server publishes none, or a malformed one.
    ``self_signing_valid`` / ``user_signing_valid``: signed by the published master
    key. ``device_signed``: the server's keys for ``device_id`` are ``device_ed25519``
    and carry a valid signature of the (valid) self-signing key.
    ``master_signed_by_device``: the master key carries our device's signature.
    """

    user_id: str
    master_key: str | None
    self_signing_key: str | None
    user_signing_key: str | None
    self_signing_valid: bool
    user_signing_valid: bool
    device_signed: bool
    master_signed_by_device: bool

    @property
    def public_keys(self) -> dict[str, str | None]:
        return {
            MASTER: self.master_key,
            SELF_SIGNING: self.self_signing_key,
            USER_SIGNING: self.user_signing_key,
        }


def _entry(response: Mapping[str, Any], section: str, user_id: str) -> Any:
    found = response.get(section)
    return found.get(user_id) if isinstance(found, Mapping) else None


def published_identity(
    response: Mapping[str, Any], user_id: str, device_id: str, device_ed25519: str
) -> OwnIdentity:
    """Check our identity in a ``/keys/query`` answer for our own user (any shape accepted)."""
    if not isinstance(response, Mapping):
        response = {}
    master_obj = _entry(response, "master_keys", user_id)
    ssk_obj = _entry(response, "self_signing_keys", user_id)
    usk_obj = _entry(response, "user_signing_keys", user_id)
    master = public_key_of(master_obj, user_id, MASTER)
    ssk = public_key_of(ssk_obj, user_id, SELF_SIGNING)
    usk = public_key_of(usk_obj, user_id, USER_SIGNING)
    ssk_valid = (
        master is not None
        and ssk is not None
        and verify_signed_json(dict(ssk_obj), user_id, master, master)
    )
    usk_valid = (
        master is not None
        and usk is not None
        and verify_signed_json(dict(usk_obj), user_id, master, master)
    )
    devices = _entry(response, "device_keys", user_id)
    device = devices.get(device_id) if isinstance(devices, Mapping) else None
    device_signed = False
    if ssk_valid and isinstance(device, Mapping) and ssk is not None:
        keys = device.get("keys")
        ours = isinstance(keys, Mapping) and keys.get(f"ed25519:{device_id}") == device_ed25519
        device_signed = (
            ours
            and device.get("user_id") == user_id
            and device.get("device_id") == device_id
            and verify_signed_json(dict(device), user_id, ssk, ssk)
        )
    master_by_device = master is not None and verify_signed_json(
        dict(master_obj), user_id, device_id, device_ed25519
    )
    return OwnIdentity(
        user_id, master, ssk, usk, ssk_valid, usk_valid, device_signed, master_by_device
    )
