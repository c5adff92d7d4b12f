"""Helpers for tests against the real Synapse: counted and faulty HTTP, key look-ups."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import vodozemac

from olmstead import (
    Client,
    CrossSigningSettings,
    LeaseSettings,
    PickleKey,
    Session,
    SqliteStore,
    UploadPolicy,
)

KEY = PickleKey(b"i" * 32)
LEASE = LeaseSettings(duration=1.0, renew_every=0.3, wait=10.0)
UPLOAD_PATH = "/_matrix/client/v3/keys/upload"

#: a fault: given the request, answer in its place (or raise), or None to pass it on
Fault = Callable[[httpx.Request], httpx.Response | None]


@dataclass
class Wire(httpx.AsyncBaseTransport):
    """The real network, with every upload counted and faults injected where asked."""

    uploads: list[tuple[float, dict[str, Any], int | str]] = field(default_factory=list)
    #: every request: method, path and query parameters
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    faults_before: list[Fault] = field(default_factory=list)
    faults_after: list[Fault] = field(default_factory=list)
    _inner: httpx.AsyncHTTPTransport = field(default_factory=httpx.AsyncHTTPTransport)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path, dict(request.url.params)))
        is_upload = request.url.path == UPLOAD_PATH
        if not is_upload:
            return await self._inner.handle_async_request(request)
        body = json.loads(request.content)
        started = time.monotonic()
        try:
            if self.faults_before:
                answer = self.faults_before.pop(0)(request)
                if answer is not None:
                    self.uploads.append((started, body, answer.status_code))
                    return answer
            response = await self._inner.handle_async_request(request)
            await response.aread()
            if self.faults_after:
                answer = self.faults_after.pop(0)(request)  # the server did get it
                if answer is not None:
                    self.uploads.append((started, body, f"{response.status_code}, then lost"))
                    return answer
        except httpx.TransportError as exc:
            self.uploads.append((started, body, type(exc).__name__))
            raise
        self.uploads.append((started, body, response.status_code))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def server_error(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(500, json={"errcode": "M_UNKNOWN", "error": "Internal server error"})


def drop(request: httpx.Request) -> httpx.Response:
    raise httpx.RemoteProtocolError(
        "Server disconnected without sending a response.", request=request
    )


def rate_limited(seconds: float) -> Fault:
    def answer(_request: httpx.Request) -> httpx.Response:
        body = {"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests"}
        return httpx.Response(429, json=body, headers={"Retry-After": str(seconds)})

    return answer


async def open_client(
    homeserver_url: str,
    store_path: Path,
    session: Session | None = None,
    wire: Wire | None = None,
    policy: UploadPolicy | None = None,
    cross_signing: CrossSigningSettings | None = None,
) -> Client:
    store = await SqliteStore.open(store_path, KEY, lease=LEASE)
    client = Client(
        homeserver_url,
        store=store,
        transport=wire or Wire(),
        upload_policy=policy,
        cross_signing=cross_signing,
    )
    if session is not None:
        client.restore(session)
    return client


async def close_client(client: Client) -> None:
    await client.close()
    if client.store is not None:
        await client.store.close()


def session_of(homeserver_url: str, registered: dict[str, Any]) -> Session:
    return Session(
        homeserver_url,
        registered["user_id"],
        registered["device_id"],
        registered["access_token"],
    )


async def server_device_keys(url: str, token: str, user_id: str, device_id: str) -> Any:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            "/_matrix/client/v3/keys/query",
            json={"device_keys": {user_id: [device_id]}},
            headers={"Authorization": f"Bearer {token}"},
        )
        answer.raise_for_status()
        return answer.json()["device_keys"].get(user_id, {}).get(device_id)


async def claim_one(url: str, token: str, user_id: str, device_id: str) -> tuple[str, Any] | None:
    """Claim one key of the device as another user would; None if nothing is left."""
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            "/_matrix/client/v3/keys/claim",
            json={"one_time_keys": {user_id: {device_id: "signed_curve25519"}}},
            headers={"Authorization": f"Bearer {token}"},
        )
        answer.raise_for_status()
        keys = answer.json()["one_time_keys"].get(user_id, {}).get(device_id, {})
        return next(iter(keys.items())) if keys else None


def opens_session(account: vodozemac.Account, public_key: str) -> bool:
    """Whether a peer that claimed ``public_key`` reaches ``account`` with its first message."""
    peer = vodozemac.Account()
    session = peer.create_outbound_session(
        account.curve25519_key, vodozemac.Curve25519PublicKey.from_base64(public_key)
    )
    message = session.encrypt(b"hello").to_pre_key()
    assert message is not None
    try:
        _, plaintext = account.create_inbound_session(peer.curve25519_key, message)
    except ValueError:
        return False
    return plaintext == b"hello"
