"""Encrypted files against the real Synapse, with matrix-nio on the other end, both ways."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nio import RoomEncryptedFile, RoomEncryptedImage
from nio.crypto.attachments import decrypt_attachment as nio_decrypt

from olmstead import AttachmentHashMismatch, AttachmentTruncated, Client
from olmstead.attachments import EncryptedFile, parse_mxc
from olmstead.client.rooms import RoomEvent
from olmstead.throwaway_homeserver import ThrowawayHomeserver
from tests.integration.harness import Wire, close_client
from tests.integration.nio_peer import NioPeer
from tests.integration.test_nio_interop import olmstead_client

PNG = bytes.fromhex("89504e470d0a1a0a") + os.urandom(300_000)  # a header, then noise


async def room_with_nio(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> tuple[Client, list[Any], NioPeer, str]:
    url = homeserver.base_url
    o_user, n_user = new_user(), new_user()
    bot, seen = await olmstead_client(url, tmp_path / "bot.db", o_user)
    nio = await NioPeer.login(url, n_user, tmp_path / "nio", "nio")
    room = await bot.create_room(invite=[n_user["user_id"]])
    await nio.sync()
    await nio.client.join(room)
    await nio.sync()
    await bot.sync_once()
    return bot, seen, nio, room


async def test_an_image_from_nio_decrypts_to_the_same_bytes(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    bot, seen, nio, room = await room_with_nio(homeserver, new_user, tmp_path)
    uploaded, keys = await nio.client.upload(
        io.BytesIO(PNG),
        content_type="image/png",
        filename="noise.png",
        encrypt=True,
        filesize=len(PNG),
    )
    assert keys is not None, uploaded
    file_info = {**keys, "url": uploaded.content_uri}
    content = {
        "msgtype": "m.image",
        "body": "noise.png",
        "file": file_info,
        "info": {"mimetype": "image/png", "size": len(PNG)},
    }
    answer = await nio.client.room_send(
        room, "m.room.message", content, ignore_unverified_devices=True
    )
    assert hasattr(answer, "event_id"), answer
    await bot.sync_once()

    (image,) = [
        e for e in seen if isinstance(e, RoomEvent) and e.content.get("msgtype") == "m.image"
    ]
    assert image.encrypted
    saved = await bot.download_decrypted(image.content["file"], tmp_path / "got.png")
    assert saved.read_bytes() == PNG
    streamed = b"".join([chunk async for chunk in bot.stream_decrypted(image.content["file"])])
    assert streamed == PNG
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    await nio.close()
    await close_client(bot)


async def test_a_file_and_image_from_olmstead_decrypt_in_nio(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    bot, _seen, nio, room = await room_with_nio(homeserver, new_user, tmp_path)
    document = tmp_path / "report.pdf"
    document.write_bytes(os.urandom(1_500_000))  # more than one chunk
    thumbnail = os.urandom(2000)
    await bot.send_file(room, document, mimetype="application/pdf")
    await bot.send_image(
        room,
        io.BytesIO(PNG),
        body="noise.png",
        mimetype="image/png",
        width=64,
        height=48,
        thumbnail=thumbnail,
        thumbnail_info={"mimetype": "image/png", "w": 8, "h": 6},
    )

    got: list[Any] = []
    nio.client.add_event_callback(
        lambda _room, event: got.append(event), (RoomEncryptedFile, RoomEncryptedImage)
    )
    await nio.sync()
    assert nio.undecryptable == []
    files = [e for e in got if isinstance(e, RoomEncryptedFile)]
    images = [e for e in got if isinstance(e, RoomEncryptedImage)]
    assert len(files) == 1, got
    assert len(images) == 1, got

    async def nio_reads(mxc: str, key: dict[str, Any], hashes: dict[str, str], iv: str) -> bytes:
        downloaded = await nio.client.download(mxc=mxc)
        assert hasattr(downloaded, "body"), downloaded
        return bytes(nio_decrypt(downloaded.body, key["k"], hashes["sha256"], iv))

    (pdf,) = files
    assert pdf.body == "report.pdf"
    assert await nio_reads(pdf.url, pdf.key, pdf.hashes, pdf.iv) == document.read_bytes()
    (image,) = images
    assert image.source["content"]["info"]["w"] == 64
    assert await nio_reads(image.url, image.key, image.hashes, image.iv) == PNG
    assert (
        await nio_reads(
            image.thumbnail_url, image.thumbnail_key, image.thumbnail_hashes, image.thumbnail_iv
        )
        == thumbnail
    )
    # the server saw ciphertext only
    assert "url" not in image.source["content"]
    await nio.close()
    await close_client(bot)


def stored_media(homeserver: ThrowawayHomeserver, url: str) -> Path:
    """Where Synapse keeps a local upload on disk (media_store/local_content/ab/cd/rest)."""
    _server, media_id = parse_mxc(url)
    (path,) = homeserver.directory.glob(
        f"**/local_content/{media_id[:2]}/{media_id[2:4]}/{media_id[4:]}"
    )
    return path


async def test_a_tampered_download_is_refused_and_leaves_nothing(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    bot, _seen = await olmstead_client(homeserver.base_url, tmp_path / "bot.db", new_user())
    plaintext = os.urandom(3 * 1024 * 1024 + 5)
    info = await bot.upload_encrypted(plaintext)
    stored = stored_media(homeserver, info.url)
    ciphertext = bytearray(stored.read_bytes())
    assert len(ciphertext) == len(plaintext)
    assert bytes(ciphertext) != plaintext
    ciphertext[-1] ^= 0x01  # one bit, in the chunk held back
    stored.write_bytes(bytes(ciphertext))

    target = tmp_path / "out.bin"
    with pytest.raises(AttachmentHashMismatch):
        await bot.download_decrypted(info.to_content(), target)
    assert list(tmp_path.glob("*out.bin*")) == []
    chunks: list[bytes] = []

    async def read_all() -> None:
        async for chunk in bot.stream_decrypted(info):
            chunks.append(chunk)

    with pytest.raises(AttachmentHashMismatch):
        await read_all()
    assert sum(map(len, chunks)) < len(plaintext)  # the whole was never handed over
    await close_client(bot)


class Truncating(Wire):
    """The real server, but every media download's body is cut after ``keep`` bytes."""

    keep = 100_000

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if "/media/download/" not in request.url.path:
            return response
        keep = self.keep

        async def cut() -> AsyncIterator[bytes]:
            sent = 0
            async for chunk in response.aiter_raw():
                yield chunk[: max(0, keep - sent)]
                sent += len(chunk)
                if sent >= keep:
                    raise httpx.RemoteProtocolError("peer closed connection", request=request)

        return httpx.Response(response.status_code, headers=response.headers, content=cut())


async def test_a_download_cut_short_is_truncated_not_corrupt(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    user = new_user()
    bot, _seen = await olmstead_client(homeserver.base_url, tmp_path / "bot.db", user)
    info = await bot.upload_encrypted(os.urandom(1_000_000))
    cutting = Client(homeserver.base_url, transport=Truncating())
    cutting.restore(bot._session())
    with pytest.raises(AttachmentTruncated):
        await cutting.download_decrypted(info, tmp_path / "cut.bin")
    assert list(tmp_path.glob("*cut.bin*")) == []
    await cutting.close()
    await close_client(bot)


async def test_uploads_from_a_pipe_and_a_path_round_trip(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    bot, _seen = await olmstead_client(homeserver.base_url, tmp_path / "bot.db", new_user())
    data = os.urandom(2_500_000)
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as writer:
        writer.write(data[:60_000])  # a pipe holds 64 KiB: the rest goes through a path
    with os.fdopen(read_end, "rb") as reader:
        piped = await bot.upload_encrypted(reader)
    (tmp_path / "data").write_bytes(data)
    from_path = await bot.upload_encrypted(tmp_path / "data")
    assert piped.key != from_path.key  # a fresh key for every file
    assert piped.iv[8:] == bytes(8)  # and a counter that starts at zero
    got = await bot.download_decrypted(piped, tmp_path / "piped")
    assert got.read_bytes() == data[:60_000]
    got = await bot.download_decrypted(from_path.to_content(), tmp_path / "path")
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert EncryptedFile.from_content(from_path.to_content()) == from_path
    await close_client(bot)


def test_a_200_mb_file_round_trips_in_under_100_mb_of_memory(
    homeserver: Any, new_user: Any, tmp_path: Path
) -> None:
    user = new_user()
    args = [homeserver.base_url, user["access_token"], user["user_id"], user["device_id"]]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.attachment_memory_process",
            *args,
            str(tmp_path),
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["size"] == 200 * 1024 * 1024
    assert result["got"] == result["sent"]
    print(
        f"200 MB round trip: peak resident memory {result['peak_mb']} MB "
        f"({result['baseline_mb']} MB after imports)"
    )
    assert result["peak_mb"] < 100, result
