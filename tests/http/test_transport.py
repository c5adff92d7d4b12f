"""Error mapping and backoff of the HTTP layer, over httpx's in-process mock transport.

What the real homeserver does to these paths is tested in tests/integration; here
the answers are chosen to pin down each mapping rule exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest

from olmstead import (
    ConnectionFailed,
    KeysQueryRequest,
    KeyStateError,
    KeysUploadRequest,
    LocalProtocolError,
    MatrixHttpError,
    OneTimeKeyConflict,
    RateLimited,
    RemoteProtocolError,
)
from olmstead.http import MatrixHttp, RetryPolicy

FAST = RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.02)
UPLOAD = KeysUploadRequest("up-1", None, {"signed_curve25519:AAAA": {"key": "k"}}, {})
QUERY = KeysQueryRequest("q-1", {"@a:x": []})


def http_with(
    answers: list[Callable[[httpx.Request], httpx.Response]],
) -> tuple[MatrixHttp, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[min(len(seen), len(answers)) - 1](request)

    http = MatrixHttp("http://hs.test", "TOKEN", transport=httpx.MockTransport(handler), retry=FAST)
    return http, seen


def status(
    code: int, body: object, headers: dict[str, str] | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _request: httpx.Response(code, json=body, headers=headers)


def drop(request: httpx.Request) -> httpx.Response:
    raise httpx.RemoteProtocolError(
        "Server disconnected without sending a response.", request=request
    )


async def test_requests_carry_route_body_and_token() -> None:
    http, seen = http_with([status(200, {"device_keys": {}})])
    assert await http.send(QUERY) == {"device_keys": {}}
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/_matrix/client/v3/keys/query")
    assert json.loads(request.content) == {"device_keys": {"@a:x": []}}
    assert request.headers["Authorization"] == "Bearer TOKEN"


async def test_client_errors_are_typed_and_not_retried() -> None:
    body = {"errcode": "M_UNKNOWN", "error": "One time key signed_curve25519:AAAA already exists"}
    http, seen = http_with([status(400, body)])
    with pytest.raises(MatrixHttpError) as caught:
        await http.send(QUERY)
    assert (caught.value.status, caught.value.errcode) == (400, "M_UNKNOWN")
    assert "already exists" in caught.value.error
    assert not isinstance(caught.value, RateLimited)
    assert len(seen) == 1


async def test_server_errors_and_drops_are_retried_with_backoff() -> None:
    http, seen = http_with(
        [status(500, {}), drop, status(502, "bad gateway"), status(200, {"ok": 1})]
    )
    assert await http.send(QUERY) == {"ok": 1}
    assert len(seen) == 4


async def test_retries_are_bounded() -> None:
    http, seen = http_with([drop])
    with pytest.raises(ConnectionFailed, match="no answer"):
        await http.send(QUERY)
    assert len(seen) == FAST.attempts


async def test_key_uploads_go_out_exactly_once_per_call() -> None:
    http, seen = http_with([status(500, {"errcode": "M_UNKNOWN", "error": "boom"})])
    with pytest.raises(MatrixHttpError):
        await http.send(UPLOAD)
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"Retry-After": "0.3"}, {"errcode": "M_LIMIT_EXCEEDED", "error": "slow"}, 0.3),
        ({}, {"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 250}, 0.25),
    ],
)
async def test_rate_limits_carry_and_honour_retry_after(
    headers: dict[str, str], body: dict[str, object], expected: float
) -> None:
    http, seen = http_with([status(429, body, headers)])
    with pytest.raises(RateLimited) as caught:
        await http.send(UPLOAD)
    assert caught.value.retry_after == pytest.approx(expected)
    assert len(seen) == 1

    http, _seen = http_with([status(429, body, headers), status(200, {"ok": 1})])
    started = time.monotonic()
    assert await http.send(QUERY) == {"ok": 1}
    assert time.monotonic() - started >= expected * 0.9  # waited as long as it was told


async def test_a_pause_longer_than_allowed_is_an_error_at_once() -> None:
    http, seen = http_with([status(429, {"errcode": "M_LIMIT_EXCEEDED"}, {"Retry-After": "3600"})])
    with pytest.raises(RateLimited):
        await http.send(QUERY)
    assert len(seen) == 1


async def test_a_success_that_is_not_json_is_a_remote_error() -> None:
    http, _seen = http_with([lambda _r: httpx.Response(200, text="<html>proxy</html>")])
    with pytest.raises(RemoteProtocolError, match="not a JSON object"):
        await http.send(QUERY)


async def test_duplicate_one_time_keys_are_typed_with_the_quoted_key() -> None:
    old = {"key": "b64key", "signatures": {"@a:x": {"ed25519:DEV": "sig"}}}
    message = (
        "One time key signed_curve25519:AAAAAAAAAA0 already exists. "
        f"Old key: {json.dumps(old)}; new key: {{'key': 'other', 'signatures': {{}}}}"
    )
    http, seen = http_with([status(400, {"errcode": "M_UNKNOWN", "error": message})])
    with pytest.raises(OneTimeKeyConflict) as caught:
        await http.send(UPLOAD)
    assert caught.value.key_id == "signed_curve25519:AAAAAAAAAA0"
    assert caught.value.old_key == old
    assert isinstance(caught.value, KeyStateError)
    assert isinstance(caught.value, MatrixHttpError)
    assert caught.value.status == 400
    assert len(seen) == 1


async def test_a_duplicate_key_message_without_the_old_key_is_still_typed() -> None:
    message = "One time key signed_curve25519:AAAAAAAAAAE already exists"
    http, _seen = http_with([status(400, {"errcode": "M_UNKNOWN", "error": message})])
    with pytest.raises(OneTimeKeyConflict) as caught:
        await http.send(UPLOAD)
    assert caught.value.key_id == "signed_curve25519:AAAAAAAAAAE"
    assert caught.value.old_key is None


@pytest.mark.parametrize("code", [200, 500])
async def test_json_nested_too_deep_to_parse_is_a_remote_error(code: int) -> None:
    deep = ("[" * 200_000 + "]" * 200_000).encode()  # parsing it overflows Python's stack
    http, _ = http_with([lambda _request: httpx.Response(code, content=deep)])
    with pytest.raises(RemoteProtocolError if code == 200 else MatrixHttpError):
        await http.request("GET", "/_matrix/client/v3/sync")


async def test_a_request_after_close_is_a_local_error() -> None:
    http, seen = http_with([status(200, {})])
    await http.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        await http.request("GET", "/_matrix/client/v3/sync")
    assert seen == []
