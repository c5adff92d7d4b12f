"""``MatrixHttp``: requests to a homeserver over httpx, with typed errors and backoff.

Failures become ``olmstead.errors`` types carrying the Matrix ``errcode``, the
HTTP status and ``Retry-After``. Transient failures (no answer, 5xx, 429) are
retried with exponential backoff and full jitter, honouring ``Retry-After``, a
bounded number of times. ``/keys/upload`` is the exception: it is sent exactly
once per call, because the machine's upload guard decides when to try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from olmstead.errors import (
    ConnectionFailed,
    LocalProtocolError,
    MatrixHttpError,
    OneTimeKeyConflict,
    RateLimited,
    RemoteProtocolError,
    TransportError,
)
from olmstead.http.endpoints import route
from olmstead.requests import KeysUploadRequest, OutgoingRequest

__all__ = ["MatrixHttp", "RetryPolicy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    #: tries in all, the first included
    attempts: int = 5
    first_delay: float = 0.5
    max_delay: float = 30.0
    #: a server asking for a longer pause than this gets an error instead
    max_retry_after: float = 120.0

    def delay(self, failures: int, error: TransportError) -> float:
        backoff = random.uniform(0, min(self.max_delay, self.first_delay * 2 ** (failures - 1)))
        if isinstance(error, RateLimited) and error.retry_after is not None:
            return max(backoff, error.retry_after)
        return backoff


def is_transient(error: TransportError) -> bool:
    if isinstance(error, ConnectionFailed | RateLimited):
        return True
    return isinstance(error, MatrixHttpError) and error.status >= 500


class MatrixHttp:
    """One homeserver, one access token (or none, for login and registration)."""

    def __init__(
        self,
        homeserver: str,
        access_token: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.homeserver = homeserver.rstrip("/")
        self.access_token = access_token
        self.retry = retry or RetryPolicy()
        self._client = httpx.AsyncClient(
            base_url=self.homeserver, transport=transport, timeout=timeout
        )

    async def send(self, request: OutgoingRequest) -> dict[str, Any]:
        """Send a machine request; raises a ``TransportError`` if it gets no success."""
        method, path = route(request)
        once = isinstance(request, KeysUploadRequest)
        return await self.request(method, path, request.body(), retry=not once)

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
        retry: bool = True,
        read_timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one request; ``read_timeout`` overrides the client's (for long-polls)."""
        answer = await self._with_retries(method, path, body, params, retry, read_timeout)
        if not isinstance(answer, dict):
            raise RemoteProtocolError(f"{method} {path}: the answer is not a JSON object")
        return answer

    async def request_list(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None
    ) -> list[Any]:
        """A request whose answer is a JSON array (``GET /rooms/{id}/state``)."""
        answer = await self._with_retries(method, path, None, params, True, None)
        if not isinstance(answer, list):
            raise RemoteProtocolError(f"{method} {path}: the answer is not a JSON array")
        return answer

    async def upload(
        self,
        path: str,
        content: Callable[[], AsyncIterator[bytes]],
        length: int,
        *,
        content_type: str = "application/octet-stream",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """POST a body streamed from ``content()`` (called anew for every attempt), of
        exactly ``length`` bytes; the JSON answer. Synapse needs the Content-Length."""
        headers = {"Content-Type": content_type, "Content-Length": str(length)}
        answer = await self._with_retries(
            "POST", path, None, params, True, None, raw=(content, headers)
        )
        if not isinstance(answer, dict):
            raise RemoteProtocolError(f"POST {path}: the answer is not a JSON object")
        return answer

    @contextlib.asynccontextmanager
    async def stream(self, path: str) -> AsyncIterator[httpx.Response]:
        """GET ``path`` (asking for an uncompressed body: ``Accept-Encoding: identity``)
        and hand over the response unread, for ``aiter_bytes``. An error
        answer raises its ``MatrixHttpError`` (retried like any request while no body
        was handed over); the caller reads the body and maps failures while reading."""
        failures = 0
        async with contextlib.AsyncExitStack() as stack:
            while True:
                try:
                    response = await stack.enter_async_context(self._stream_once(path))
                    break
                except TransportError as error:
                    failures += 1
                    if not is_transient(error) or failures >= self.retry.attempts:
                        raise
                    delay = self.retry.delay(failures, error)
                    if delay > self.retry.max_retry_after:
                        raise
                    await asyncio.sleep(delay)
            yield response  # outside the retries: a failure while reading is the caller's

    @contextlib.asynccontextmanager
    async def _stream_once(self, path: str) -> AsyncIterator[httpx.Response]:
        self._ensure_open("GET", path)
        try:
            # the body as stored: a compressed one expands unboundedly per network read
            headers = {**self._auth(), "Accept-Encoding": "identity"}
            async with self._client.stream("GET", path, headers=headers) as response:
                if not response.is_success:
                    raise await _streamed_error(path, response)
                yield response
        except httpx.TransportError as exc:
            raise ConnectionFailed("GET", path, f"{type(exc).__name__}: {exc}") from exc

    def _ensure_open(self, method: str, path: str) -> None:
        if self._client.is_closed:  # httpx would raise a RuntimeError
            raise LocalProtocolError(
                f"{method} {path}: the client was closed (close()); nothing was sent"
            )

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"} if self.access_token else {}

    async def _with_retries(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        params: Mapping[str, str] | None,
        retry: bool,
        read_timeout: float | None,
        raw: tuple[Callable[[], AsyncIterator[bytes]], dict[str, str]] | None = None,
    ) -> Any:
        failures = 0
        while True:
            try:
                return await self._once(method, path, body, params, read_timeout, raw)
            except TransportError as error:
                failures += 1
                if not retry or not is_transient(error) or failures >= self.retry.attempts:
                    raise
                delay = self.retry.delay(failures, error)
                if delay > self.retry.max_retry_after:
                    raise
                log.info("%s %s failed (%s); retrying in %.1f s", method, path, error, delay)
                await asyncio.sleep(delay)

    async def _once(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        params: Mapping[str, str] | None,
        read_timeout: float | None,
        raw: tuple[Callable[[], AsyncIterator[bytes]], dict[str, str]] | None = None,
    ) -> Any:
        self._ensure_open(method, path)
        headers = self._auth()
        extra: dict[str, Any] = {} if read_timeout is None else {"timeout": read_timeout}
        if raw is not None:  # a streamed body, made anew for every attempt
            extra["content"] = raw[0]()
            headers.update(raw[1])
        else:
            extra["json"] = body
        try:
            response = await self._client.request(
                method, path, params=params, headers=headers, **extra
            )
        except httpx.TransportError as exc:
            raise ConnectionFailed(method, path, f"{type(exc).__name__}: {exc}") from exc
        try:
            payload = response.json()
        except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
            payload = None
        if response.is_success:
            if not isinstance(payload, dict | list):
                raise RemoteProtocolError(
                    f"{method} {path}: {response.status_code} with a body that is not a JSON "
                    f"object: {response.text[:200]!r}"
                )
            return payload
        raise _error(method, path, response, payload)

    async def close(self) -> None:
        await self._client.aclose()


#: bytes of an error answer read from a streamed response; a longer one is not JSON to us
_ERROR_BODY_LIMIT = 65536


async def _streamed_error(path: str, response: httpx.Response) -> MatrixHttpError:
    """The error for a streamed GET's failed answer, reading at most ``_ERROR_BODY_LIMIT``
    bytes of it: a hostile server's endless error body must not fill the memory."""
    raw = b""
    async for chunk in response.aiter_bytes():
        raw += chunk
        if len(raw) > _ERROR_BODY_LIMIT:
            break
    try:
        payload = json.loads(raw) if len(raw) <= _ERROR_BODY_LIMIT else None
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        payload = None
    # the bytes read so far, already decoded, under the headers that matter for errors
    headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    read = httpx.Response(response.status_code, headers=headers, content=raw[:_ERROR_BODY_LIMIT])
    return _error("GET", path, read, payload)


def _error(method: str, path: str, response: httpx.Response, payload: Any) -> MatrixHttpError:
    body = payload if isinstance(payload, dict) else {}
    errcode = body.get("errcode")
    errcode = errcode if isinstance(errcode, str) else None
    error = body.get("error")
    error = error if isinstance(error, str) else response.text[:500]
    retry_after = _retry_after(response, body)
    status = response.status_code
    if status == 400 and "already exists" in error and path.endswith("/keys/upload"):
        key_id, old_key = _quoted_key(error)
        return OneTimeKeyConflict(method, path, status, errcode, error, key_id, old_key, payload)
    kind = RateLimited if status == 429 or errcode == "M_LIMIT_EXCEEDED" else MatrixHttpError
    return kind(method, path, status, errcode, error, retry_after, payload)


# Synapse: "One time key <id> already exists. Old key: <json>; new key: <python repr>"
_ALREADY_EXISTS = re.compile(r"One time key (?P<key_id>\S+) already exists")
_OLD_KEY = re.compile(r"Old key: (?P<old>\{.*?\}); new key:", re.DOTALL)


def _quoted_key(message: str) -> tuple[str | None, dict[str, Any] | None]:
    """The colliding key ID and the old key a duplicate-key message quotes, if it does."""
    named = _ALREADY_EXISTS.search(message)
    quoted = _OLD_KEY.search(message)
    old: Any = None
    if quoted is not None:
        try:
            old = json.loads(quoted["old"])
        except ValueError:
            old = None
    return (named["key_id"] if named else None), (old if isinstance(old, dict) else None)


def _retry_after(response: httpx.Response, body: Mapping[str, Any]) -> float | None:
    header = response.headers.get("Retry-After")
    if header is not None:
        try:
            return max(0.0, float(header))
        except ValueError:
            pass  # an HTTP date: fall back to the body, then to backoff
    millis = body.get("retry_after_ms")
    if isinstance(millis, int | float) and not isinstance(millis, bool):
        return max(0.0, millis / 1000)
    return None
