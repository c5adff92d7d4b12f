"""Megolm room events through the machine, beside bare vodozemac on the same payloads.

olmstead's side is the whole path a bridge pays for: build the payload, step the
outbound ratchet and commit it before the ciphertext is handed out; on receipt
parse the event, look the session up, decrypt, check the payload and the replay
record, and commit the message indices. Both devices keep SQLite stores (the
default backend). The baseline encrypts the same payload bytes with a bare
``GroupSession`` and decrypts them with a bare ``InboundGroupSession``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import vodozemac

from benchmarks.peers import BenchDevice, new_device
from benchmarks.table import Row, rate_row
from benchmarks.timing import Stopwatch
from olmstead import KeysQueryRequest, RoomSettings

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


async def _olmstead(count: int, repeat: int) -> tuple[float, float, int]:
    """Best encrypt and decrypt milliseconds for ``count`` events, and how many decrypted."""
    with tempfile.TemporaryDirectory(prefix="olmstead-bench-") as tmp:
        alice, bob = await _pair(Path(tmp), count * repeat)
        encrypt_ms, decrypt_ms, decrypted = float("inf"), float("inf"), 0
        try:
            for r in range(repeat):
                contents = [_content(n) for n in range(count)]
                events: list[dict[str, Any]] = []
                with Stopwatch() as watch:
                    for start in range(0, count, BATCH):
                        events.extend(
                            await alice.machine.encrypt_room_events(
                                ROOM,
                                [("m.room.message", c) for c in contents[start : start + BATCH]],
                            )
                        )
                encrypt_ms = min(encrypt_ms, watch.ms)
                timeline = [
                    {
                        "type": "m.room.encrypted",
                        "sender": alice.user_id,
                        "event_id": f"$r{r}e{n}",
                        "origin_server_ts": 1_700_000_000_000 + n,
                        "room_id": ROOM,
                        "content": content,
                    }
                    for n, content in enumerate(events)
                ]
                results = []
                with Stopwatch() as watch:
                    for start in range(0, count, BATCH):
                        results.extend(
                            await bob.machine.decrypt_room_events(
                                ROOM, timeline[start : start + BATCH]
                            )
                        )
                decrypt_ms = min(decrypt_ms, watch.ms)
                decrypted = sum(1 for result in results if not isinstance(result, Exception))
        finally:
            await alice.close()
            await bob.close()
    return encrypt_ms, decrypt_ms, decrypted


def _vodozemac(count: int, repeat: int) -> tuple[float, float]:
    """The same payload bytes through a bare GroupSession and InboundGroupSession."""
    payloads = [
        json.dumps({"type": "m.room.message", "content": _content(n), "room_id": ROOM}).encode()
        for n in range(count)
    ]
    encrypt_ms, decrypt_ms = float("inf"), float("inf")
    for _ in range(repeat):
        outbound = vodozemac.GroupSession()
        inbound = vodozemac.InboundGroupSession(outbound.session_key)
        with Stopwatch() as watch:
            ciphertexts = [outbound.encrypt(p).to_base64() for p in payloads]
        encrypt_ms = min(encrypt_ms, watch.ms)
        with Stopwatch() as watch:
            for c in ciphertexts:
                inbound.decrypt(vodozemac.MegolmMessage.from_base64(c))
        decrypt_ms = min(decrypt_ms, watch.ms)
    return encrypt_ms, decrypt_ms


async def run(count: int, repeat: int) -> list[Row]:
    base_encrypt, base_decrypt = _vodozemac(count, repeat)
    encrypt_ms, decrypt_ms, decrypted = await _olmstead(count, repeat)
    if decrypted != count:
        raise AssertionError(f"only {decrypted} of {count} room events decrypted")
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
