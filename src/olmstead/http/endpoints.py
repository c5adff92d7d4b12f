"""Which method and path each request the machine hands out travels on."""

from __future__ import annotations

from urllib.parse import quote

from olmstead.requests import (
    AccountDataRequest,
    DeviceSigningUploadRequest,
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    OutgoingRequest,
    SignaturesUploadRequest,
    ToDeviceRequest,
)

__all__ = ["CLIENT_V3", "account_data_path", "route"]

CLIENT_V3 = "/_matrix/client/v3"


def route(request: OutgoingRequest) -> tuple[str, str]:
    """``(method, path)`` for a machine request."""
    match request:
        case KeysUploadRequest():
            return "POST", f"{CLIENT_V3}/keys/upload"
        case KeysQueryRequest():
            return "POST", f"{CLIENT_V3}/keys/query"
        case KeysClaimRequest():
            return "POST", f"{CLIENT_V3}/keys/claim"
        case ToDeviceRequest(request_id=txn_id, event_type=event_type):
            return "PUT", f"{CLIENT_V3}/sendToDevice/{quote(event_type, safe='')}/{txn_id}"
        case AccountDataRequest(user_id=user_id, event_type=event_type):
            return "PUT", account_data_path(user_id, event_type)
        case DeviceSigningUploadRequest():
            return "POST", f"{CLIENT_V3}/keys/device_signing/upload"
        case SignaturesUploadRequest():
            return "POST", f"{CLIENT_V3}/keys/signatures/upload"


def account_data_path(user_id: str, event_type: str) -> str:
    return f"{CLIENT_V3}/user/{quote(user_id, safe='')}/account_data/{quote(event_type, safe='')}"
