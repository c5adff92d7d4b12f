"""Many devices at once: a ``/keys/query`` answer, a ``/keys/claim`` answer, a room key share.

Each of the ``count`` other devices is a real vodozemac account with really
signed device and one-time keys. olmstead's figures are the machine's whole
work on the answer, commit included (SQLite store); the baselines are bare
vodozemac doing the cryptography of the same work: one Ed25519 verification
per device for the query, a verification and an outbound session per device
for the claim, and one Olm encryption of the same room key payload per device
for the share.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import vodozemac

from benchmarks.peers import RemoteDevice, claim_answer, new_device, query_answer, remote_devices
from benchmarks.table import Row, time_row
from benchmarks.timing import Stopwatch
from olmstead import KeysQueryRequest
from olmstead.olm.signing import signable_bytes

__all__ = ["run"]

ROOM = "!share:bench.example"


async def _olmstead(devices: list[RemoteDevice], directory: Path) -> tuple[float, float, float]:
    """Milliseconds for the query answer, the claim answer and the share, on a new device."""
    users = [d.user_id for d in devices]
    me = await new_device(directory, "@me:bench.example", "ME")
    machine = me.machine
    try:
        await machine.update_tracked_users(users)
        (query,) = [r for r in await machine.outgoing_requests() if isinstance(r, KeysQueryRequest)]
        answer = query_answer(devices)
        with Stopwatch() as query_watch:
            await machine.mark_request_as_sent(query.request_id, answer)
        known = sum([len(await machine.get_user_devices(u)) for u in users])
        if known != len(devices):
            raise AssertionError(f"the query answer gave {known} devices of {len(devices)}")

        claim = await machine.get_missing_sessions(users)
        assert claim is not None
        answer = claim_answer(devices)
        with Stopwatch() as claim_watch:
            await machine.mark_request_as_sent(claim.request_id, answer)

        with Stopwatch() as share_watch:
            requests = await machine.share_room_key(ROOM, users)
        sent = sum(len(by_device) for r in requests for by_device in r.messages.values())
        if [r.event_type for r in requests] != ["m.room.encrypted"] or sent != len(devices):
            raise AssertionError(f"the room key went to {sent} devices of {len(devices)}")
    finally:
        await me.close()
    return query_watch.ms, claim_watch.ms, share_watch.ms


def _vodozemac(devices: list[RemoteDevice]) -> tuple[float, float, float]:
    """The cryptography alone: verifications, session creations, encryptions."""
    me = vodozemac.Account()
    checks = []
    for d in devices:
        keys = d.device_keys
        checks.append(
            (
                keys["keys"][f"ed25519:{d.device_id}"],
                signable_bytes(keys),
                keys["signatures"][d.user_id][f"ed25519:{d.device_id}"],
            )
        )
    with Stopwatch() as query_watch:
        for ed25519, signed, signature in checks:
            vodozemac.Ed25519PublicKey.from_base64(ed25519).verify_signature(
                signed, vodozemac.Ed25519Signature.from_base64(signature)
            )

    claims = []
    for d in devices:
        key = next(iter(sorted(d.one_time_keys.items())))[1]
        claims.append(
            (
                d.device_keys["keys"][f"ed25519:{d.device_id}"],
                d.device_keys["keys"][f"curve25519:{d.device_id}"],
                key["key"],
                signable_bytes(key),
                key["signatures"][d.user_id][f"ed25519:{d.device_id}"],
            )
        )
    sessions = []
    with Stopwatch() as claim_watch:
        for ed25519, curve25519, one_time_key, signed, signature in claims:
            vodozemac.Ed25519PublicKey.from_base64(ed25519).verify_signature(
                signed, vodozemac.Ed25519Signature.from_base64(signature)
            )
            sessions.append(
                me.create_outbound_session(
                    vodozemac.Curve25519PublicKey.from_base64(curve25519),
                    vodozemac.Curve25519PublicKey.from_base64(one_time_key),
                )
            )

    group = vodozemac.GroupSession()
    key = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": ROOM,
        "session_id": group.session_id,
        "session_key": group.session_key.to_base64(),
    }
    payload = json.dumps({"type": "m.room_key", "content": key, "sender": "@me:bench.example"})
    plaintext = payload.encode()
    with Stopwatch() as share_watch:
        for session in sessions:
            session.encrypt(plaintext)
    return query_watch.ms, claim_watch.ms, share_watch.ms


async def run(count: int, repeat: int) -> list[Row]:
    devices = remote_devices(count, one_time_keys=1)
    bases, ours = [], []
    for _ in range(repeat):  # taking turns, so that noise from other processes hits both
        bases.append(_vodozemac(devices))
        with tempfile.TemporaryDirectory(prefix="olmstead-bench-") as tmp:
            # each run a new device with a new store: the first answer, every time
            ours.append(await _olmstead(devices, Path(tmp)))
    base = [min(v) for v in zip(*bases, strict=True)]
    query_ms, claim_ms, share_ms = (min(v) for v in zip(*ours, strict=True))
    return [
        time_row(
            f"/keys/query answer, {count} devices",
            query_ms,
            base[0],
            f"{count} bare Ed25519 verifications",
            15,
        ),
        time_row(
            f"/keys/claim answer, {count} Olm sessions",
            claim_ms,
            base[1],
            f"{count} bare verifications + sessions",
            50,
        ),
        time_row(
            f"share a room key to {count} devices",
            share_ms,
            base[2],
            f"{count} bare Olm encryptions",
            25,
        ),
    ]
