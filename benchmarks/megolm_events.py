"""Megolm room events through the machine, beside bare vodozemac on the same payloads.

olmstead's side is the whole path a bridge pays for: build the payload, step the
outbound ratchet and commit it before the ciphertext is handed out; on receipt
parse the event, look the session up, decrypt, check the payload and the replay
record, and commit the message indices. Both devices keep SQLite stores (the
default backend). The baseline encrypts the same payload bytes with a bare
``GroupSession`` and decrypts them with a bare ``InboundGroupSession``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import vodozemac

from benchmarks.peers import BenchDevice, new_device
from benchmarks.table import Row, rate_row
from benchmarks.timing import Stopwatch
from olmstead import KeysQueryRequest, RoomSettings
from olmstead.sessions.group_sessions import payload_bytes

__all__ = ["run"]

ROOM = "!bench:bench.example"
#: room events are decrypted and encrypted this many at a time (a sync's timeline, a
#: bridge's queue): one commit per batch
BATCH = 500


def _content(n: int) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": f"message {n}: the quick brown fox jumps over the dog"}


async def _pair(directory: Path, events: int) -> tuple[BenchDevice, BenchDevice]:
    """Alice shares a room key with Bob over Olm; the key lasts for ``events`` messages."""
    alice = await new_device(directory, "@alice:bench.example", "ALICE")
    bob = await new_device(directory, "@bob:bench.example", "BOB")
    for of, about in ((alice, bob), (bob, alice)):
        await of.machine.update_tracked_users([about.user_id])
        (query,) = [
            r for r in await of.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)
        ]
        await of.machine.mark_request_as_sent(query.request_id, about.query_answer())
    claim = await alice.machine.get_missing_sessions([bob.user_id])
    assert claim is not None
    await alice.machine.mark_request_as_sent(claim.request_id, bob.claim_answer())
    settings = RoomSettings(rotation_period_msgs=events + 1)
    (share,) = await alice.machine.share_room_key(ROOM, [bob.user_id], settings)
    await alice.machine.mark_request_as_sent(share.request_id, {})
    to_device = {
        "type": share.event_type,
        "sender": alice.user_id,
        "content": share.messages[bob.user_id][bob.device_id],
    }
    await bob.machine.receive_sync_changes(to_device_events=[to_device])
    return alice, bob


async def _olmstead_round(
    alice: BenchDevice, bob: BenchDevice, count: int, round_: int
) -> tuple[float, float, int]:
    """Encrypt and decrypt milliseconds for ``count`` new events, and how many decrypted."""
    contents = [_content(n) for n in range(count)]
    events: list[dict[str, Any]] = []
    with Stopwatch() as encrypt:
        for start in range(0, count, BATCH):
            batch = [("m.room.message", c) for c in contents[start : start + BATCH]]
            events.extend(await alice.machine.encrypt_room_events(ROOM, batch))
    timeline = [
        {
            "type": "m.room.encrypted",
            "sender": alice.user_id,
            "event_id": f"$r{round_}e{n}",
            "origin_server_ts": 1_700_000_000_000 + n,
            "room_id": ROOM,
            "content": content,
        }
        for n, content in enumerate(events)
    ]
    results = []
    with Stopwatch() as decrypt:
        for start in range(0, count, BATCH):
            results.extend(
                await bob.machine.decrypt_room_events(ROOM, timeline[start : start + BATCH])
            )
    decrypted = sum(1 for result in results if not isinstance(result, Exception))
    return encrypt.ms, decrypt.ms, decrypted


def _vodozemac_round(payloads: list[bytes]) -> tuple[float, float]:
    """The same payload bytes through a bare GroupSession and InboundGroupSession."""
    outbound = vodozemac.GroupSession()
    inbound = vodozemac.InboundGroupSession(outbound.session_key)
    with Stopwatch() as encrypt:
        ciphertexts = [outbound.encrypt(p).to_base64() for p in payloads]
    with Stopwatch() as decrypt:
        for c in ciphertexts:
            inbound.decrypt(vodozemac.MegolmMessage.from_base64(c))
    return encrypt.ms, decrypt.ms


async def run(count: int, repeat: int) -> list[Row]:
    payloads = [payload_bytes(ROOM, "m.room.message", _content(n)) for n in range(count)]
    bases, ours = [], []
    with tempfile.TemporaryDirectory(prefix="olmstead-bench-") as tmp:
        alice, bob = await _pair(Path(tmp), count * repeat)
        try:
            for round_ in range(repeat):  # taking turns, so that noise hits both alike
                bases.append(_vodozemac_round(payloads))
                encrypt_ms, decrypt_ms, decrypted = await _olmstead_round(alice, bob, count, round_)
                if decrypted != count:
                    raise AssertionError(f"only {decrypted} of {count} room events decrypted")
                ours.append((encrypt_ms, decrypt_ms))
        finally:
            await alice.close()
            await bob.close()
    base_encrypt, base_decrypt = (min(v) for v in zip(*bases, strict=True))
    encrypt_ms, decrypt_ms = (min(v) for v in zip(*ours, strict=True))
    per_second = count * 1000
    return [
        rate_row(
            f"encrypt {count:,} room events",
            per_second / encrypt_ms,
            per_second / base_encrypt,
            "bare vodozemac GroupSession",
            25_000,
        ),
        rate_row(
            f"decrypt {count:,} room events",
            per_second / decrypt_ms,
            per_second / base_decrypt,
            "bare vodozemac InboundGroupSession",
            10_000,
        ),
    ]
