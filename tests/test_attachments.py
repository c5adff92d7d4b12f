"""The spec's EncryptedFile: the format, chunked streaming, nio's files, and hostile file info."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import random
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from nio.crypto.attachments import decrypt_attachment as nio_decrypt
from nio.crypto.attachments import encrypt_attachment as nio_encrypt

from olmstead import (
    AttachmentError,
    AttachmentHashMismatch,
    AttachmentInfoInvalid,
    AttachmentKeyInvalid,
    AttachmentVersionUnknown,
    EncryptedFile,
    LocalProtocolError,
    MatrixHttpError,
    RemoteProtocolError,
    file_content,
)
from olmstead.attachments import (
    CHUNK_SIZE,
    AttachmentDecryptor,
    AttachmentEncryptor,
    decrypt_attachment,
    encrypt_attachment,
    parse_mxc,
)
from olmstead.client.media import Media
from olmstead.http.transport import MatrixHttp

URL = "mxc://example.org/AbCdEf_12-3"


def test_a_file_round_trips_whole_and_in_chunks() -> None:
    plaintext = os.urandom(100_000)
    ciphertext, encryptor = encrypt_attachment(plaintext)
    info = encryptor.file_info(URL)
    assert ciphertext != plaintext
    assert len(ciphertext) == len(plaintext)
    assert decrypt_attachment(ciphertext, info.to_content()) == plaintext
    decryptor = AttachmentDecryptor(info)
    pieces = [decryptor.update(ciphertext[i : i + 777]) for i in range(0, len(ciphertext), 777)]
    assert b"".join(pieces) + decryptor.verify() == plaintext


def test_the_json_is_the_spec_s() -> None:
    _ciphertext, encryptor = encrypt_attachment(b"hello")
    content = encryptor.file_info(URL).to_content()
    assert content["v"] == "v2"
    assert content["url"] == URL
    assert content["key"]["kty"] == "oct"
    assert content["key"]["alg"] == "A256CTR"
    assert content["key"]["ext"] is True
    assert set(content["key"]["key_ops"]) == {"encrypt", "decrypt"}
    for text in (content["key"]["k"], content["iv"], content["hashes"]["sha256"]):
        assert "=" not in text  # unpadded
    assert "+" not in content["key"]["k"]
    assert "/" not in content["key"]["k"]  # base64url
    assert EncryptedFile.from_content(json.loads(json.dumps(content))) == encryptor.file_info(URL)
    assert "k" not in repr(encryptor.file_info(URL))


def test_every_file_gets_its_own_key_and_a_counter_from_zero() -> None:
    infos = [encrypt_attachment(b"same")[1].file_info(URL) for _ in range(20)]
    assert len({info.key for info in infos}) == 20
    assert len({info.iv for info in infos}) == 20
    assert all(info.iv[8:] == bytes(8) for info in infos)


def test_files_of_nio_and_olmstead_read_each_other() -> None:
    plaintext = os.urandom(50_000)
    ciphertext, keys = nio_encrypt(plaintext)
    assert decrypt_attachment(ciphertext, {**keys, "url": URL}) == plaintext
    ours, encryptor = encrypt_attachment(plaintext)
    info = encryptor.file_info(URL).to_content()
    theirs = nio_decrypt(ours, info["key"]["k"], info["hashes"]["sha256"], info["iv"])
    assert theirs == plaintext


def test_a_changed_ciphertext_is_refused() -> None:
    ciphertext, encryptor = encrypt_attachment(os.urandom(1000))
    changed = bytearray(ciphertext)
    changed[500] ^= 1
    with pytest.raises(AttachmentHashMismatch) as caught:
        decrypt_attachment(bytes(changed), encryptor.file_info(URL))
    assert caught.value.url == URL
    with pytest.raises(AttachmentHashMismatch):
        decrypt_attachment(ciphertext[:-1], encryptor.file_info(URL))


def valid() -> dict[str, Any]:
    return encrypt_attachment(b"x")[1].file_info(URL).to_content()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda c: c.pop("v"), AttachmentVersionUnknown),
        (lambda c: c.update(v="v1"), AttachmentVersionUnknown),
        (lambda c: c.update(v=2), AttachmentVersionUnknown),
        (lambda c: c.update(url="https://example.org/a"), AttachmentInfoInvalid),
        (lambda c: c.update(url="mxc://example.org/../../etc"), AttachmentInfoInvalid),
        (lambda c: c.update(url="mxc://example.org/a/b"), AttachmentInfoInvalid),
        (lambda c: c.pop("url"), AttachmentInfoInvalid),
        (lambda c: c.update(iv="AAAA"), AttachmentInfoInvalid),
        (lambda c: c.update(iv=["x"]), AttachmentInfoInvalid),
        (lambda c: c.update(iv="!!not base64!!"), AttachmentInfoInvalid),
        (lambda c: c.pop("hashes"), AttachmentInfoInvalid),
        (lambda c: c.update(hashes={"sha512": "x"}), AttachmentInfoInvalid),
        (lambda c: c["hashes"].update(sha256="AAAA"), AttachmentInfoInvalid),
        (lambda c: c.pop("key"), AttachmentKeyInvalid),
        (lambda c: c["key"].update(alg="A128CTR"), AttachmentKeyInvalid),
        (lambda c: c["key"].update(kty="RSA"), AttachmentKeyInvalid),
        (lambda c: c["key"].update(key_ops=["encrypt"]), AttachmentKeyInvalid),
        (lambda c: c["key"].update(k="AAAA"), AttachmentKeyInvalid),
        (lambda c: c["key"].update(k=None), AttachmentKeyInvalid),
    ],
)
def test_malformed_file_info_is_a_typed_error(change: Any, error: type[Exception]) -> None:
    content = valid()
    change(content)
    with pytest.raises(error):
        EncryptedFile.from_content(content)


def test_padded_and_standard_alphabet_keys_are_read_as_clients_send_them() -> None:
    content = valid()
    info = EncryptedFile.from_content(content)
    content["key"]["k"] = content["key"]["k"].replace("-", "+").replace("_", "/") + "="
    content["iv"] += "=="
    assert EncryptedFile.from_content(content) == info


def test_any_mangled_file_info_raises_only_attachment_errors() -> None:
    rng = random.Random(18)
    junk: list[Any] = [None, 0, -1, 2**70, 1.5, True, "", "x" * 5000, [], {}, ["v2"], {"k": 1}]
    for _ in range(3000):
        content: Any = copy.deepcopy(valid())
        for _step in range(rng.randint(1, 3)):
            target = content
            path = rng.choice([[], ["key"], ["hashes"]])
            for part in path:
                target = target.get(part) if isinstance(target, dict) else None
            if not isinstance(target, dict) or not target:
                content = rng.choice(junk)
                break
            field = rng.choice([*target, "extra"])
            target[field] = rng.choice(junk)
        with contextlib.suppress(AttachmentError):  # anything else fails the test
            EncryptedFile.from_content(content)


def test_mxc_uris() -> None:
    assert parse_mxc("mxc://example.org:8448/abc_DEF-1") == ("example.org:8448", "abc_DEF-1")
    assert parse_mxc("mxc://[::1]:8448/abc") == ("[::1]:8448", "abc")
    for bad in ["mxc://", "mxc:///abc", "mxc://a b/c", "mxc://x/a%2F", "mxc://x/", 5]:
        with pytest.raises(AttachmentInfoInvalid):
            parse_mxc(bad)


async def test_an_mxc_server_name_cannot_climb_out_of_the_download_path() -> None:
    # "." and ".." fit the server-name grammar, but in the URL they are dot segments
    for bad in ["mxc://../config", "mxc://./x", "mxc://.../x", "mxc://-x/y", "mxc://x/y?a=b"]:
        with pytest.raises(AttachmentInfoInvalid):
            parse_mxc(bad)
    seen: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"m.upload.size": 1})

    media = Media(MatrixHttp("https://hs.example", transport=httpx.MockTransport(server)))
    info = {**encrypt_attachment(b"x")[1].file_info(URL).to_content(), "url": "mxc://../config"}
    with pytest.raises(AttachmentInfoInvalid):
        await anext(media.stream_decrypted(info))
    assert seen == []


def test_file_content_carries_file_and_thumbnail_file() -> None:
    file = encrypt_attachment(b"image")[1].file_info(URL)
    thumb = encrypt_attachment(b"thumb")[1].file_info("mxc://example.org/thumb")
    content = file_content(
        file,
        body="cat.png",
        msgtype="m.image",
        mimetype="image/png",
        size=5,
        info={"w": 4, "h": 3},
        thumbnail=thumb,
        thumbnail_info={"mimetype": "image/png"},
    )
    assert content["msgtype"] == "m.image"
    assert "url" not in content
    assert content["file"] == file.to_content()
    assert content["info"]["thumbnail_file"] == thumb.to_content()
    assert content["info"] == {
        **content["info"],
        "w": 4,
        "h": 3,
        "size": 5,
        "mimetype": "image/png",
    }
    with pytest.raises(LocalProtocolError):
        file_content(file, body="x", msgtype="m.text")


def test_an_encryptor_is_used_once() -> None:
    encryptor = AttachmentEncryptor()
    with pytest.raises(LocalProtocolError):
        encryptor.file_info(URL)
    encryptor.update(b"abc")
    encryptor.finalize()
    with pytest.raises(LocalProtocolError):
        encryptor.update(b"more")


async def test_downloads_fall_back_to_the_old_endpoint_only_where_the_new_one_is_unknown() -> None:
    # Synapse 1.163 has both endpoints and serves new media only through the new one, so
    # a server without it is played by a transport: M_UNRECOGNIZED, as the spec says
    ciphertext, encryptor = encrypt_attachment(b"old server")
    seen: list[str] = []

    def old_server(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path.startswith("/_matrix/client/v1/media/"):
            return httpx.Response(404, json={"errcode": "M_UNRECOGNIZED", "error": "Unrecognized"})
        return httpx.Response(200, content=ciphertext)

    media = Media(MatrixHttp("https://old.example", transport=httpx.MockTransport(old_server)))
    info = encryptor.file_info(URL)
    assert b"".join([c async for c in media.stream_decrypted(info)]) == b"old server"
    assert b"".join([c async for c in media.stream_decrypted(info)]) == b"old server"
    assert seen == [
        "/_matrix/client/v1/media/download/example.org/AbCdEf_12-3",
        "/_matrix/media/v3/download/example.org/AbCdEf_12-3",
        "/_matrix/media/v3/download/example.org/AbCdEf_12-3",  # remembered
    ]

    def missing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "Not found"})

    media = Media(MatrixHttp("https://new.example", transport=httpx.MockTransport(missing)))
    with pytest.raises(MatrixHttpError) as caught:
        await anext(media.stream_decrypted(info))
    assert caught.value.errcode == "M_NOT_FOUND"
    assert media.legacy is False


async def test_an_endless_error_body_is_not_read_to_the_end() -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while pulled < 64 << 20:  # ends only so that a broken test does not hang
            pulled += 1 << 20
            yield b"x" * (1 << 20)

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, headers={"Retry-After": "3"}, content=endless())

    media = Media(MatrixHttp("https://hs.example", transport=httpx.MockTransport(server)))
    with pytest.raises(MatrixHttpError) as caught:
        await anext(media.stream_decrypted(encrypt_attachment(b"x")[1].file_info(URL)))
    assert caught.value.status == 403
    assert caught.value.errcode is None
    assert caught.value.error == "x" * 500  # the start of the body, as for any error
    assert pulled <= 2 << 20


async def test_a_download_to_a_directory_fails_before_it_fetches_anything(
    tmp_path: Path,
) -> None:
    ciphertext, encryptor = encrypt_attachment(b"content")
    fetched: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        fetched.append(request.url.path)
        return httpx.Response(200, content=ciphertext)

    media = Media(MatrixHttp("https://hs.example", transport=httpx.MockTransport(server)))
    info = encryptor.file_info(URL)
    with pytest.raises(IsADirectoryError):
        await media.download_decrypted(info, tmp_path)
    assert fetched == []
    # a symlink is replaced, not written through; a file is replaced
    (tmp_path / "real").write_bytes(b"kept")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "old").write_bytes(b"old")
    for name in ("link", "old"):
        assert (await media.download_decrypted(info, tmp_path / name)).read_bytes() == b"content"
    assert not (tmp_path / "link").is_symlink()
    assert (tmp_path / "real").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "old", "real"]


async def test_downloads_ask_for_the_body_as_stored_and_refuse_a_compressed_one() -> None:
    ciphertext, encryptor = encrypt_attachment(b"plain")
    asked: list[str | None] = []
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 KB that inflate to 64 MB
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        pulled += len(bomb)
        yield bomb

    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("Accept-Encoding"))
        if len(asked) == 1:
            return httpx.Response(200, content=ciphertext)
        return httpx.Response(200, headers={"Content-Encoding": "deflate"}, content=body())

    media = Media(MatrixHttp("https://hs.example", transport=httpx.MockTransport(server)))
    info = encryptor.file_info(URL)
    assert b"".join([c async for c in media.stream_decrypted(info)]) == b"plain"
    with pytest.raises(RemoteProtocolError):
        await anext(media.stream_decrypted(info))
    assert asked == ["identity", "identity"]
    assert pulled == 0  # refused before a byte of it was read


def test_a_counter_that_would_wrap_within_the_file_is_refused() -> None:
    # browsers count in the IV's low 64 bits and wrap; AES-CTR here carries into the
    # high half: past a wrap one ciphertext (and hash) shows two different plaintexts
    honest = encrypt_attachment(b"x" * 48)[1].file_info(URL)

    def with_counter(start: int, data: bytes) -> tuple[EncryptedFile, bytes]:
        iv = honest.iv[:8] + start.to_bytes(8, "big")
        cipher = Cipher(algorithms.AES(honest.key), modes.CTR(iv)).encryptor()
        sent = cipher.update(data) + cipher.finalize()
        return EncryptedFile(URL, honest.key, iv, hashlib.sha256(sent).digest()), sent

    top = (1 << 64) - 1
    info, sent = with_counter(top - 2, b"y" * 48)  # three blocks: the last counter is top
    assert decrypt_attachment(sent, info) == b"y" * 48
    info, sent = with_counter(top - 2, b"y" * 49)  # a fourth block would wrap
    with pytest.raises(AttachmentInfoInvalid):
        decrypt_attachment(sent, info)
    decryptor = AttachmentDecryptor(with_counter(top, b"z" * 32)[0])
    decryptor.update(b"z" * 16)
    with pytest.raises(AttachmentInfoInvalid):
        decryptor.update(b"z")


async def test_the_destination_appears_only_once_the_hash_matched(tmp_path: Path) -> None:
    # a process killed mid-download must not leave a partial file under the final name
    plaintext = os.urandom(3 * CHUNK_SIZE + 7)
    ciphertext, encryptor = encrypt_attachment(plaintext)
    target = tmp_path / "out.bin"
    seen_mid_body: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(ciphertext), CHUNK_SIZE):
            seen_mid_body.append(target.exists())
            yield ciphertext[start : start + CHUNK_SIZE]
            await asyncio.sleep(0.01)  # the writes in worker threads land
        seen_mid_body.append(target.exists())

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body())

    media = Media(MatrixHttp("https://hs.example", transport=httpx.MockTransport(server)))
    assert await media.download_decrypted(encryptor.file_info(URL), target) == target
    assert seen_mid_body == [False] * 5
    assert target.read_bytes() == plaintext


async def test_an_error_answer_nested_too_deep_to_parse_is_a_matrix_http_error() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, content=b"[" * 60_000)

    media = Media(MatrixHttp("https://hs.example", transport=httpx.MockTransport(server)))
    with pytest.raises(MatrixHttpError) as caught:
        await anext(media.stream_decrypted(encrypt_attachment(b"x")[1].file_info(URL)))
    assert caught.value.status == 403
    assert caught.value.errcode is None


async def test_a_destination_name_as_long_as_the_file_system_allows_is_written(
    tmp_path: Path,
) -> None:
    ciphertext, encryptor = encrypt_attachment(b"long")

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=ciphertext)

    media = Media(MatrixHttp("https://hs.example", transport=httpx.MockTransport(server)))
    target = tmp_path / ("n" * 250)  # NAME_MAX is 255 on common file systems
    written = await media.download_decrypted(encryptor.file_info(URL), target)
    assert written.read_bytes() == b"long"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
