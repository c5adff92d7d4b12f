"""Files to and from the homeserver's media repository, encrypted or not, a chunk at a time.

Uploads go to ``POST /_matrix/media/v3/upload`` (the spec has no other upload
endpoint) with the Content-Length Synapse requires; the body is read, encrypted and
sent ``CHUNK_SIZE`` bytes at a time, and made anew (with a new key) if the request
is retried. Downloads use the authenticated endpoint
``GET /_matrix/client/v1/media/download/{serverName}/{mediaId}`` (spec v1.11) and
fall back to ``/_matrix/media/v3/download`` only when the server does not know the
new one (``M_UNRECOGNIZED``, or a 404/405 that is not a Matrix error); the client
remembers that for its lifetime.

Downloads ask for the body as stored (``Accept-Encoding: identity``) and refuse a
compressed one. A download's plaintext is held back a chunk: the last chunk is handed over only
after the ciphertext's SHA-256 matched, and a download to a file goes to a
temporary file beside the target that is renamed into place only then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

from olmstead.attachments import (
    CHUNK_SIZE,
    AttachmentDecryptor,
    AttachmentEncryptor,
    EncryptedFile,
    parse_mxc,
)
from olmstead.errors import (
    AttachmentInfoInvalid,
    AttachmentTruncated,
    LocalProtocolError,
    MatrixHttpError,
    RemoteProtocolError,
)
from olmstead.http.transport import MatrixHttp

__all__ = ["FileSource", "Media"]

MEDIA_V3 = "/_matrix/media/v3"
CLIENT_V1_MEDIA = "/_matrix/client/v1/media"

#: what can be uploaded: a path, bytes, or a binary file object open for reading
FileSource = str | os.PathLike[str] | bytes | IO[bytes]


class Media:
    def __init__(self, http: MatrixHttp) -> None:
        self.http = http
        #: the server lacks the authenticated media endpoints (found on first download)
        self.legacy = False

    # --- up ------------------------------------------------------------------------------

    async def upload(
        self,
        source: FileSource,
        *,
        encrypt: bool,
        filename: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> tuple[str, AttachmentEncryptor | None, int]:
        """Upload ``source``: its ``mxc://`` URL, the encryptor that made the ciphertext
        (``None`` unencrypted) and the size in bytes."""
        spooled = AttachmentEncryptor() if encrypt else None
        with _opened(source, spooled) as (handle, start, length, was_spooled):
            encryptors: list[AttachmentEncryptor] = []

            def body() -> AsyncIterator[bytes]:
                if was_spooled:  # the spool holds the ciphertext already
                    if spooled is not None:
                        encryptors.append(spooled)
                    return _chunks(handle, start, length, None)
                encryptor = AttachmentEncryptor() if encrypt else None  # fresh per attempt
                if encryptor is not None:
                    encryptors.append(encryptor)
                return _chunks(handle, start, length, encryptor)

            params = {"filename": filename} if filename else None
            answer = await self.http.upload(
                f"{MEDIA_V3}/upload",
                body,
                length,
                content_type="application/octet-stream" if encrypt else content_type,
                params=params,
            )
        url = answer.get("content_uri")
        try:
            parse_mxc(url)
        except AttachmentInfoInvalid:
            raise RemoteProtocolError(
                f"the upload's answer holds no usable mxc:// content_uri: {str(url)[:100]!r}"
            ) from None
        assert isinstance(url, str)
        return url, (encryptors[-1] if encryptors else None), length

    # --- down ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open_download(self, url: str) -> AsyncIterator[httpx.Response]:
        """The unread response for ``mxc://`` ``url``, through the authenticated endpoint
        where the server has it."""
        server, media_id = parse_mxc(url)
        where = f"{quote(server, safe='')}/{quote(media_id, safe='')}"
        async with contextlib.AsyncExitStack() as stack:
            response = None
            if not self.legacy:
                try:
                    response = await stack.enter_async_context(
                        self.http.stream(f"{CLIENT_V1_MEDIA}/download/{where}")
                    )
                except MatrixHttpError as error:
                    if not _unrecognised(error):
                        raise
                    self.legacy = True
            if response is None:
                response = await stack.enter_async_context(
                    self.http.stream(f"{MEDIA_V3}/download/{where}")
                )
            yield response

    async def stream_decrypted(
        self, file: EncryptedFile | Mapping[str, Any]
    ) -> AsyncIterator[bytes]:
        """The plaintext, a chunk at a time; the last chunk only once the hash matched."""
        info = EncryptedFile.from_content(file)
        decryptor = AttachmentDecryptor(info)
        async with self.open_download(info.url) as response:
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("identity", ""):
                # asked for identity: a compressed body would expand in memory a network
                # read at a time (a 400 KB deflate stream is 400 MB), and ciphertext does
                # not compress anyway
                raise RemoteProtocolError(
                    f"{info.url}: the media server sent a {encoding[:40]!r} body, though "
                    "olmstead asked for the file as it is (Accept-Encoding: identity)"
                )
            announced = _content_length(response)
            held = b""
            try:
                async for chunk in response.aiter_bytes(CHUNK_SIZE):
                    if held:
                        yield held
                    held = decryptor.update(chunk)
            except httpx.HTTPError as exc:  # the connection closed mid-body
                raise AttachmentTruncated(info.url, f"{type(exc).__name__}: {exc}") from None
            if announced is not None and decryptor.size != announced:
                raise AttachmentTruncated(
                    info.url, f"{decryptor.size} of the {announced} bytes announced"
                )
            yield held + decryptor.verify()

    async def download_decrypted(
        self, file: EncryptedFile | Mapping[str, Any], destination: str | os.PathLike[str]
    ) -> Path:
        target = Path(destination)
        if await asyncio.to_thread(_is_directory, target):  # before a byte is fetched
            raise IsADirectoryError(errno.EISDIR, "the destination is a directory", str(target))
        # a short name: the target's own may already be as long as the file system allows
        partial = target.with_name(f".{target.name[:100]}.{uuid.uuid4().hex[:8]}.part")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in self.stream_decrypted(file):
                    await asyncio.to_thread(out.write, chunk)
                out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())  # seconds, on a slow disk
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        return target


def _is_directory(path: Path) -> bool:
    """A directory itself (a symlink to one is replaced like any file)."""
    return path.is_dir() and not path.is_symlink()


def _unrecognised(error: MatrixHttpError) -> bool:
    """The server does not have the endpoint (not: the media is missing)."""
    if error.errcode == "M_UNRECOGNIZED":
        return True
    return error.status in (404, 405) and error.errcode is None


def _content_length(response: httpx.Response) -> int | None:
    """The body's announced length (the body is not compressed: checked before)."""
    value = response.headers.get("Content-Length")
    if value is None or not value.isdigit():
        return None
    return int(value)


@contextlib.contextmanager
def _opened(source: FileSource, encryptor: AttachmentEncryptor | None) -> Any:
    """``(handle, start, length, spooled)`` for a source. A non-seekable stream is
    spooled first (encrypted by ``encryptor`` on the way, so no plaintext touches the
    disk), since the upload needs its length up front and a retry needs it again."""
    if isinstance(source, bytes):
        yield io.BytesIO(source), 0, len(source), False
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as handle:
            yield handle, 0, os.fstat(handle.fileno()).st_size, False
    elif _seekable(source):
        start = source.tell()
        length = source.seek(0, io.SEEK_END) - start
        yield source, start, length, False
    else:
        with tempfile.TemporaryFile() as spool:
            while chunk := source.read(CHUNK_SIZE):
                spool.write(encryptor.update(chunk) if encryptor is not None else chunk)
            if encryptor is not None:
                encryptor.finalize()
            yield spool, 0, spool.tell(), True


def _seekable(handle: IO[bytes]) -> bool:
    try:
        return handle.seekable()
    except (AttributeError, OSError, ValueError):
        return False


async def _chunks(
    handle: IO[bytes], start: int, length: int, encryptor: AttachmentEncryptor | None
) -> AsyncIterator[bytes]:
    read: Callable[[int], bytes] = handle.read
    handle.seek(start)
    left = length
    while left > 0:
        chunk = await asyncio.to_thread(read, min(CHUNK_SIZE, left))  # the loop stays free
        if not chunk:
            raise LocalProtocolError("the file became shorter while it was uploaded")
        left -= len(chunk)
        yield encryptor.update(chunk) if encryptor is not None else chunk
    if encryptor is not None:
        encryptor.finalize()
