"""Key export files: round trips between machines, the file's layout, and bad files."""

from __future__ import annotations

import base64
import struct

import pytest

from olmstead import KeyFileError
from olmstead.key_export import (
    FOOTER,
    HEADER,
    MAX_ROUNDS,
    decrypt_key_file,
    encrypt_key_file,
)
from tests.machine.pair import new_peer
from tests.machine.test_megolm import BOB, ROOM, Timeline, room_with

ROUNDS = 1000  # fast for tests; files carry their own round count


async def test_exported_keys_let_a_new_device_read_the_room() -> None:
    alice, (bob,) = await room_with(BOB)
    timeline = Timeline()
    event = timeline.event(alice, await alice.machine.encrypt_room_event(ROOM, "m.text", {"n": 1}))
    ticks: list[int] = []
    exported = await bob.machine.export_room_keys(
        "correct horse", rounds=ROUNDS, progress=ticks.append
    )
    assert sum(ticks) == 1

    newcomer = await new_peer(BOB, "NEWDEVICE")
    imported, skipped = await newcomer.machine.import_room_keys(exported, "correct horse")
    assert (imported, skipped) == (1, 0)
    got = await newcomer.machine.decrypt_room_event(ROOM, event)
    assert got.content == {"n": 1}
    assert got.signing_key == alice.machine.identity_keys["ed25519"]
    # importing again changes nothing: what we hold is as good
    assert await newcomer.machine.import_room_keys(exported, "correct horse") == (0, 0)


def test_the_file_layout_is_the_spec_s() -> None:
    armoured = encrypt_key_file(b"[]", "pass", rounds=1234)
    lines = armoured.strip().split("\n")
    assert (lines[0], lines[-1]) == (HEADER, FOOTER)
    assert all(len(line) <= 96 for line in lines[1:-1])
    body = base64.b64decode("".join(lines[1:-1]))
    assert body[0] == 1
    assert body[17 + 8] & 0x80 == 0  # bit 63 of the IV is clear
    assert struct.unpack(">I", body[33:37]) == (1234,)
    assert len(body) == 1 + 16 + 16 + 4 + 2 + 32
    assert decrypt_key_file(armoured, "pass") == b"[]"


@pytest.mark.parametrize("damage", ["passphrase", "flipped", "truncated", "not_armoured"])
def test_a_bad_file_or_passphrase_is_a_key_file_error(damage: str) -> None:
    armoured = encrypt_key_file(b'[{"x": 1}]', "pass", rounds=ROUNDS)
    passphrase = "pass"
    lines = armoured.strip().split("\n")
    if damage == "passphrase":
        passphrase = "wrong"
    elif damage == "flipped":
        body = bytearray(base64.b64decode("".join(lines[1:-1])))
        body[40] ^= 1
        armoured = "\n".join([HEADER, base64.b64encode(bytes(body)).decode(), FOOTER])
    elif damage == "truncated":
        armoured = "\n".join([HEADER, lines[1][:20], FOOTER])
    else:
        armoured = lines[1]
    with pytest.raises(KeyFileError):
        decrypt_key_file(armoured, passphrase)


def reformatted(armoured: str, how: str) -> str:
    """A key file as another client or an editor may have written it."""
    lines = armoured.strip().split("\n")
    if how == "crlf":
        return "\r\n".join(lines) + "\r\n"
    if how == "trailing-whitespace":
        return "\n".join(line + " \t " for line in lines) + "\n"
    if how == "no-final-newline":
        return "\n".join(lines)
    if how == "indented-armour":
        return "\n".join(["  " + lines[0] + "  ", *lines[1:-1], "\t" + lines[-1]]) + "\n"
    if how == "blank-lines":
        return "\n".join([lines[0], "", *lines[1:-1], "", lines[-1], "", ""])
    if how == "text-around":
        return "\n".join(["Exported from Element, 2026-11-30", "", *lines, "", "keep safe"])
    if how == "bom":
        return "\ufeff" + armoured
    if how == "rewrapped":
        body = "".join(lines[1:-1])
        wrapped = [body[i : i + 64] for i in range(0, len(body), 64)]
        return "\n".join([lines[0], *wrapped, lines[-1]])
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "crlf",
        "trailing-whitespace",
        "no-final-newline",
        "indented-armour",
        "blank-lines",
        "text-around",
        "bom",
        "rewrapped",
    ],
)
def test_files_from_other_clients_and_editors_read_as_element_reads_them(how: str) -> None:
    armoured = encrypt_key_file(b'[{"x": 1}]', "pass", rounds=ROUNDS)
    assert decrypt_key_file(reformatted(armoured, how), "pass") == b'[{"x": 1}]'


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("no armour at all", "no line reads -----BEGIN"),
        (HEADER, "ends after its BEGIN line"),
        (f"{HEADER}\nAAAA\n", "no line reads -----END"),
        (f"{HEADER} AAAA {FOOTER}", "no line reads -----BEGIN"),  # Element wants own lines
    ],
)
def test_armour_element_would_refuse_is_refused(text: str, says: str) -> None:
    with pytest.raises(KeyFileError, match=says):
        decrypt_key_file(text, "pass")


@pytest.mark.parametrize("rounds", [0, 2**31, 2**32 - 1, MAX_ROUNDS + 1])
def test_a_round_count_out_of_range_is_refused_before_the_kdf_runs(rounds: int) -> None:
    # the count comes from the file and is used before the MAC can be checked: 0 made
    # the KDF raise ValueError, 2**31 and more made it panic, 2**31 - 1 ran half an hour
    armoured = encrypt_key_file(b"[]", "passphrase", rounds=1000)
    body = bytearray(base64.b64decode("".join(armoured.splitlines()[1:-1])))
    body[33:37] = struct.pack(">I", rounds)
    with pytest.raises(KeyFileError, match="PBKDF2 rounds"):
        decrypt_key_file(f"{HEADER}\n{base64.b64encode(bytes(body)).decode()}\n{FOOTER}", "x")
