"""``Device``: another device's identity keys, accepted only once they check out.

A device listed by ``/keys/query`` is accepted when its keys object names the
user and device it was listed under, carries both identity keys, is signed by
its own Ed25519 key, and nests at most ``MAX_DEVICE_KEYS_DEPTH`` levels deep.
Anything else is refused with the reason, so a hostile or broken server cannot
slip in keys for a device under another's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from olmstead import boundary
from olmstead.errors import RemoteProtocolError
from olmstead.olm.canonical_json import nested_within
from olmstead.olm.signing import verify_signed_json

__all__ = ["MAX_DEVICE_KEYS_DEPTH", "Device", "InvalidDeviceKeys"]

#: how deep a device keys object may nest (a real one is 3 levels: ``signatures`` →
#: user → key); deeper ones are refused
MAX_DEVICE_KEYS_DEPTH = 16


class InvalidDeviceKeys(ValueError):
    """A device's keys object failed a check; the message says which."""


@dataclass(frozen=True)
class Device:
    user_id: str
    device_id: str
    ed25519: str
    curve25519: str
    algorithms: tuple[str, ...]
    display_name: str | None
    #: the signed keys object as the server sent it, kept for re-verification
    keys: dict[str, Any]
    #: the server stopped listing it; kept so old messages still verify
    deleted: bool = False

    @classmethod
    def from_keys(cls, user_id: str, device_id: str, keys: Any) -> Device:
        """Check a ``/keys/query`` entry listed under ``user_id``/``device_id``."""
        if not isinstance(keys, dict):
            raise InvalidDeviceKeys("the keys are not an object")
        if not nested_within(keys, MAX_DEVICE_KEYS_DEPTH):
            # kept as sent: one nested thousands deep (in unsigned, which the signature
            # does not cover) would fail to serialise when stored
            raise InvalidDeviceKeys(f"the keys nest deeper than {MAX_DEVICE_KEYS_DEPTH} levels")
        if keys.get("user_id") != user_id or keys.get("device_id") != device_id:
            raise InvalidDeviceKeys(
                f"listed as {user_id}/{device_id} but names itself "
                f"{boundary.show(keys.get('user_id'))}/{boundary.show(keys.get('device_id'))}"
            )
        key_map = keys.get("keys")
        ed25519 = key_map.get(f"ed25519:{device_id}") if isinstance(key_map, dict) else None
        curve25519 = key_map.get(f"curve25519:{device_id}") if isinstance(key_map, dict) else None
        if not isinstance(ed25519, str) or not isinstance(curve25519, str):
            raise InvalidDeviceKeys("an identity key (ed25519 or curve25519) is missing")
        try:  # checked here, so that no later use of the keys can fail on them
            canonical = (
                boundary.public_key(ed25519, f"keys.ed25519:{device_id}"),
                boundary.public_key(curve25519, f"keys.curve25519:{device_id}"),
            )
        except RemoteProtocolError as exc:
            raise InvalidDeviceKeys(str(exc)) from None
        # devices are found by their key strings: each key is kept in its one canonical
        # spelling (the keys object stays as it came, for its signature)
        ed25519, curve25519 = canonical
        if not verify_signed_json(keys, user_id, device_id, ed25519):
            raise InvalidDeviceKeys("the device's signature over its own keys does not verify")
        algorithms = keys.get("algorithms")
        unsigned = keys.get("unsigned")
        name = unsigned.get("device_display_name") if isinstance(unsigned, dict) else None
        return cls(
            user_id,
            device_id,
            ed25519,
            curve25519,
            tuple(a for a in algorithms if isinstance(a, str))
            if isinstance(algorithms, list)
            else (),
            name if isinstance(name, str) else None,
            keys,
        )

    def marked_deleted(self) -> Device:
        return replace(self, deleted=True)

    def to_json(self) -> str:
        return json.dumps(
            {"keys": self.keys, "display_name": self.display_name, "deleted": self.deleted},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, user_id: str, device_id: str, data: str) -> Device:
        """A device as the store kept it (it was checked when it was accepted)."""
        stored = json.loads(data)
        keys = stored["keys"]
        return cls(
            user_id,
            device_id,
            boundary.public_key(keys["keys"][f"ed25519:{device_id}"], "ed25519"),
            boundary.public_key(keys["keys"][f"curve25519:{device_id}"], "curve25519"),
            tuple(keys.get("algorithms", ())),
            stored.get("display_name"),
            keys,
            bool(stored.get("deleted", False)),
        )
