"""What the machine asks the caller to send: frozen request types, no HTTP.

The HTTP layer maps each type to its method and path; the machine neither knows
nor cares how a request travels. ``request_id`` ties the response passed to
``OlmMachine.mark_request_as_sent`` back to the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "AccountDataRequest",
    "DeviceSigningUploadRequest",
    "KeysClaimRequest",
    "KeysQueryRequest",
    "KeysUploadRequest",
    "OutgoingRequest",
    "SignaturesUploadRequest",
    "ToDeviceRequest",
]


@dataclass(frozen=True)
class KeysUploadRequest:
    """``POST /keys/upload``.

    Its ``request_id`` is a digest of the body: a retry of the same pending keys
    has the same ID, even across a restart.
    """

    request_id: str
    device_keys: dict[str, Any] | None
    one_time_keys: dict[str, Any]
    fallback_keys: dict[str, Any]

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.device_keys is not None:
            body["device_keys"] = self.device_keys
        if self.one_time_keys:
            body["one_time_keys"] = self.one_time_keys
        if self.fallback_keys:
            body["fallback_keys"] = self.fallback_keys
        return body


@dataclass(frozen=True)
class KeysQueryRequest:
    """``POST /keys/query`` for the listed devices of each user (an empty list: all)."""

    request_id: str
    device_keys: dict[str, list[str]]

    def body(self) -> dict[str, Any]:
        return {"device_keys": self.device_keys}


@dataclass(frozen=True)
class KeysClaimRequest:
    """``POST /keys/claim``: one key of ``algorithm`` for each listed device."""

    request_id: str
    one_time_keys: dict[str, dict[str, str]]

    def body(self) -> dict[str, Any]:
        return {"one_time_keys": self.one_time_keys}


@dataclass(frozen=True)
class ToDeviceRequest:
    """``PUT /sendToDevice/{event_type}/{txn_id}``; the request ID is the transaction ID."""

    request_id: str
    event_type: str
    messages: dict[str, dict[str, dict[str, Any]]]

    def body(self) -> dict[str, Any]:
        return {"messages": self.messages}


@dataclass(frozen=True)
class AccountDataRequest:
    """``PUT /user/{user_id}/account_data/{event_type}``: ``content`` replaces the old."""

    request_id: str
    user_id: str
    event_type: str
    content: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return self.content


@dataclass(frozen=True)
class DeviceSigningUploadRequest:
    """``POST /keys/device_signing/upload``: our master, self-signing and user-signing keys.

    The server may answer 401 with user-interactive auth flows (spec: "User-Interactive
    Authentication API"); the client then sends ``body(auth)`` again. Spec v1.11 lets a
    first upload through without auth.
    """

    request_id: str
    master_key: dict[str, Any]
    self_signing_key: dict[str, Any]
    user_signing_key: dict[str, Any]

    def body(self, auth: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "master_key": self.master_key,
            "self_signing_key": self.self_signing_key,
            "user_signing_key": self.user_signing_key,
        }
        if auth is not None:
            body["auth"] = auth
        return body


@dataclass(frozen=True)
class SignaturesUploadRequest:
    """``POST /keys/signatures/upload``: user ID -> key ID (device ID or public key) -> the
    signed object, carrying only the new signatures."""

    request_id: str
    signed_keys: dict[str, dict[str, dict[str, Any]]]

    def body(self) -> dict[str, Any]:
        return dict(self.signed_keys)


OutgoingRequest = (
    KeysUploadRequest
    | KeysQueryRequest
    | KeysClaimRequest
    | ToDeviceRequest
    | AccountDataRequest
    | DeviceSigningUploadRequest
    | SignaturesUploadRequest
)
