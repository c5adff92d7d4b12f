"""Which method and path each request the machine hands out travels on."""

from __future__ import annotations

from olmstead.requests import (
    KeysClaimRequest,
    KeysQueryRequest,
    KeysUploadRequest,
    OutgoingRequest,
)

__all__ = ["CLIENT_V3", "route"]

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
