"""Key export files between olmstead and matrix-nio, through nio's own import and export."""

from __future__ import annotations

import json
from pathlib import Path

import vodozemac
from nio.crypto import InboundGroupSession as NioInboundGroupSession
from nio.crypto import Olm

from olmstead.sessions.group_sessions import MEGOLM_ALGORITHM
from tests.machine.pair import new_peer
from tests.machine.test_megolm import ALICE, BOB, ROOM, Timeline, room_with


async def test_olmstead_exports_nio_imports_and_decrypts(tmp_path: Path) -> None:
    alice, (bob,) = await room_with(BOB)
    content = await alice.machine.encrypt_room_event(ROOM, "m.room.message", {"body": "hi nio"})
    path = tmp_path / "olmstead-keys.txt"
    path.write_text(await bob.machine.export_room_keys("shared secret", rounds=10_000))

    sessions = Olm.import_keys_static(str(path), "shared secret")
    (session,) = [s for s in sessions if s.id == content["session_id"]]
    assert session.room_id == ROOM
    assert session.ed25519 == alice.machine.identity_keys["ed25519"]
    plaintext, index = session.decrypt(content["ciphertext"])
    assert json.loads(plaintext)["content"] == {"body": "hi nio"}
    assert index == 0


async def test_nio_exports_olmstead_imports_and_decrypts(tmp_path: Path) -> None:
    sender = vodozemac.Account()  # the device that made the session, for nio's file
    outbound = vodozemac.GroupSession()
    nio_session = NioInboundGroupSession(
        outbound.session_key.to_base64(),
        sender.ed25519_key.to_base64(),
        sender.curve25519_key.to_base64(),
        ROOM,
    )
    path = tmp_path / "nio-keys.txt"
    Olm.export_keys_static([nio_session], str(path), "from nio", 10_000)

    reader = await new_peer(BOB, "READER")
    assert await reader.machine.import_room_keys(path.read_text(), "from nio") == (1, 0)
    payload = {"type": "m.room.message", "content": {"body": "hi olmstead"}, "room_id": ROOM}
    content = {
        "algorithm": MEGOLM_ALGORITHM,
        "ciphertext": outbound.encrypt(json.dumps(payload).encode()).to_base64(),
        "sender_key": sender.curve25519_key.to_base64(),
        "session_id": outbound.session_id,
        "device_id": "NIODEVICE",
    }
    event = {**Timeline().event(reader, content), "sender": ALICE}
    got = await reader.machine.decrypt_room_event(ROOM, event)
    assert got.content == {"body": "hi olmstead"}
    assert got.signing_key == sender.ed25519_key.to_base64()
