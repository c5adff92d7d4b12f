"""Trust levels of other devices, and the room key sharing strategies built on them.

A device's trust level is decided from public data only (spec v1.18, "Cross-signing"):

- ``VERIFIED``: its owner cross-signed it, and we verified the owner (their master key
  carries a valid signature by our user-signing key, and our own master key is ours:
  signed by this device's Ed25519 key). Our own user's devices are verified when they
  are cross-signed and our master key is ours.
- ``CROSS_SIGNED``: its owner's self-signing key signed its device keys, along a chain
  that checks out to the owner's pinned master key.
- ``OWNER_HAS_NO_IDENTITY``: its owner has published no cross-signing keys (that passed
  the checks).
- ``NOT_SIGNED``: its owner has an identity, but it does not sign this device.
- ``UNKNOWN_DEVICE``: (received events only) no device we know, with keys that match,
  sent the event.

Sharing strategies (MSC4153, in the spec since v1.18 as "exclude insecure devices"):
``ALL_DEVICES`` shares with every device that has identity keys; ``EXCLUDE_INSECURE``
only with devices cross-signed by their owner (``VERIFIED`` or ``CROSS_SIGNED``), the
others get ``m.room_key.withheld`` with code ``m.unverified``; ``VERIFIED_ONLY`` only
with ``VERIFIED`` devices. Whatever the strategy, no device of a user whose verified
identity changed gets a key until the application acknowledges the change.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from olmstead.identities.device import Device
from olmstead.identities.user_identity import UserIdentity

__all__ = [
    "SharingStrategy",
    "TrustLevel",
    "WithheldDevice",
    "device_trust",
    "is_verified",
    "split_recipients",
]


class TrustLevel(enum.Enum):
    """How far a device is trusted; see the module docstring for each level."""

    VERIFIED = "verified"
    CROSS_SIGNED = "cross_signed"
    OWNER_HAS_NO_IDENTITY = "owner_has_no_identity"
    NOT_SIGNED = "not_signed"
    UNKNOWN_DEVICE = "unknown_device"

    @property
    def cross_signed(self) -> bool:
        """Whether its owner cross-signed it (what MSC4153 calls a secure device)."""
        return self in (TrustLevel.VERIFIED, TrustLevel.CROSS_SIGNED)


def is_verified(
    identity: UserIdentity, own_identity: UserIdentity | None, own_device: tuple[str, str, str]
) -> bool:
    """Whether we verified ``identity``, from public data alone.

    ``own_device``: our user ID, device ID and Ed25519 key. Our own master key is ours
    if this device's key signed it (our bootstrap does, as mautrix does); another user is
    verified if our user-signing key, signed by that master key, signed their master key.
    """
    user_id, device_id, ed25519 = own_device
    if own_identity is None or not own_identity.master.signed_by(user_id, device_id, ed25519):
        return False
    if identity.user_id == user_id:
        return identity.master.key == own_identity.master.key
    usk = own_identity.user_signing
    return usk is not None and identity.master.signed_by(user_id, usk.key, usk.key)


def device_trust(device: Device, identity: UserIdentity | None, verified: bool) -> TrustLevel:
    """The trust level of ``device``, given its owner's pinned identity and whether we
    verified that identity (``is_verified``)."""
    if identity is None:
        return TrustLevel.OWNER_HAS_NO_IDENTITY
    if not identity.signs_device(device):
        return TrustLevel.NOT_SIGNED
    return TrustLevel.VERIFIED if verified else TrustLevel.CROSS_SIGNED


class SharingStrategy(enum.Enum):
    """Which devices get our room keys; see the module docstring."""

    ALL_DEVICES = "all_devices"
    EXCLUDE_INSECURE = "exclude_insecure"
    VERIFIED_ONLY = "verified_only"


@dataclass(frozen=True)
class WithheldDevice:
    """A device that gets ``m.room_key.withheld`` instead of the room key, and why."""

    device: Device
    code: str
    reason: str


def split_recipients(
    devices: Iterable[Device],
    strategy: SharingStrategy,
    trust_of: Callable[[Device], TrustLevel],
    blocked_users: Iterable[str] = (),
) -> tuple[list[Device], list[WithheldDevice]]:
    """Split the room's devices into those that get the key and those that are refused.

    ``blocked_users``: users whose verified identity changed and was not acknowledged.
    Refused devices get ``m.unverified`` (the spec's code for a device the sender does
    not trust enough).
    """
    blocked = set(blocked_users)
    share: list[Device] = []
    withheld: list[WithheldDevice] = []
    for device in devices:
        if device.user_id in blocked:
            withheld.append(
                WithheldDevice(
                    device,
                    "m.unverified",
                    "the identity of this user changed since we verified it; the new one "
                    "is not trusted until it is acknowledged",
                )
            )
            continue
        if strategy is SharingStrategy.ALL_DEVICES:
            share.append(device)
            continue
        level = trust_of(device)
        trusted = (
            level.cross_signed
            if strategy is SharingStrategy.EXCLUDE_INSECURE
            else level is TrustLevel.VERIFIED
        )
        if trusted:
            share.append(device)
        else:
            withheld.append(
                WithheldDevice(
                    device,
                    "m.unverified",
                    "this device is not cross-signed by its owner"
                    if strategy is SharingStrategy.EXCLUDE_INSECURE
                    else "this device is not verified",
                )
            )
    return share, withheld
