"""A store full of secrets of every kind, and a check that every one of them is intact."""

from __future__ import annotations

from dataclasses import dataclass

import vodozemac

from olmstead import Changes, CryptoStore
from olmstead.cross_signing.record import CrossSigningRecord
from olmstead.store import AccountRecord
from olmstead.store.base import (
    InboundGroupSessionRecord,
    OlmSessionRecord,
    OutboundGroupSessionRecord,
)


@dataclass
class Secrets:
    ed25519: str
    olm: dict[str, str]  # sender key -> session ID
    inbound: set[str]
    outbound: str
    cross_signing: dict[str, str]

    @property
    def rows(self) -> int:
        return 1 + len(self.olm) + len(self.inbound) + 1 + 1


async def fill(store: CryptoStore, count: int = 30) -> Secrets:
    account = vodozemac.Account()
    olm: dict[str, str] = {}
    records, inbound = [], []
    for n in range(count):
        peer = vodozemac.Account()
        peer.generate_one_time_keys(1)
        session = account.create_outbound_session(
            peer.curve25519_key, next(iter(peer.one_time_keys.values()))
        )
        sender = peer.curve25519_key.to_base64()
        olm[sender] = session.session_id
        records.append(OlmSessionRecord(sender, session, float(n), float(n)))
        group = vodozemac.GroupSession()
        inbound.append(
            InboundGroupSessionRecord(
                f"!room{n}:x", sender, "ed", vodozemac.InboundGroupSession(group.session_key)
            )
        )
    outbound = vodozemac.GroupSession()
    cross_signing = {"master": "bWFzdGVy", "self_signing": "c2VsZg", "user_signing": "dXNlcg"}
    await store.save_changes(
        Changes(
            account=AccountRecord("@bot:x", "BOT", account),
            olm_sessions=records,
            inbound_group_sessions=inbound,
            outbound_group_sessions=[OutboundGroupSessionRecord("!out:x", outbound, 1.0)],
            cross_signing=CrossSigningRecord(dict(cross_signing), {"published": True}),
        )
    )
    return Secrets(
        account.ed25519_key.to_base64(),
        olm,
        {r.session_id for r in inbound},
        outbound.session_id,
        cross_signing,
    )


async def assert_intact(store: CryptoStore, secrets: Secrets) -> None:
    record = await store.load_account()
    assert record is not None
    assert record.account.ed25519_key.to_base64() == secrets.ed25519
    for sender, session_id in secrets.olm.items():
        assert [r.session_id for r in await store.get_olm_sessions(sender)] == [session_id]
    assert {r.session_id async for r in store.inbound_group_sessions(page=7)} == secrets.inbound
    outbound = await store.get_outbound_group_session("!out:x")
    assert outbound is not None
    assert outbound.session.session_id == secrets.outbound
    identity = await store.load_cross_signing()
    assert identity is not None
    assert identity.secrets == secrets.cross_signing
    assert identity.state == {"published": True}
