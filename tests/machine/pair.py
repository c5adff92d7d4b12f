"""Two machines wired together with no network: what one hands out, the other receives."""

from __future__ import annotations

from typing import Any

from olmstead import KeysUploadRequest, MemoryDatabase, MemoryStore, OlmMachine
from olmstead.requests import KeysQueryRequest, ToDeviceRequest
from tests.conftest import FAST_LEASE, KEY
from tests.machine.test_keys_upload import Clock, ok, pass_device_check


class Peer:
    """A machine with the keys it published, as a homeserver would hold them."""

    def __init__(
        self, machine: OlmMachine, db: MemoryDatabase, published: KeysUploadRequest, clock: Clock
    ):
        self.machine, self.db, self.published, self.clock = machine, db, published, clock
        self.claimed: set[str] = set()

    @property
    def user_id(self) -> str:
        return self.machine.user_id

    @property
    def device_id(self) -> str:
        return self.machine.device_id

    def claim_answer(self) -> dict[str, Any]:
        """What /keys/claim returns for this device: one unclaimed one-time key."""
        key_id = next(k for k in sorted(self.published.one_time_keys) if k not in self.claimed)
        self.claimed.add(key_id)
        key = self.published.one_time_keys[key_id]
        return {"one_time_keys": {self.user_id: {self.device_id: {key_id: key}}}}

    def query_answer(self) -> dict[str, Any]:
        keys = self.machine.device_keys()
        return {"device_keys": {self.user_id: {self.device_id: keys}}, "failures": {}}


async def new_peer(user_id: str, device_id: str, clock: Clock | None = None) -> Peer:
    db, clock = MemoryDatabase(), clock or Clock()
    store = await MemoryStore.open(KEY, db, lease=FAST_LEASE)
    machine = await OlmMachine.open(store, user_id, device_id, clock=clock)
    await pass_device_check(machine, user_id, device_id)
    (upload,) = await machine.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    await machine.mark_request_as_sent(upload.request_id, ok(50))
    return Peer(machine, db, upload, clock)


async def reopen(peer: Peer) -> Peer:
    await peer.machine.store.close()
    store = await MemoryStore.open(KEY, peer.db, lease=FAST_LEASE)
    machine = await OlmMachine.open(store, peer.user_id, peer.device_id, clock=peer.clock)
    return Peer(machine, peer.db, peer.published, peer.clock)


async def learn_devices(of: Peer, about: Peer) -> None:
    """``of`` tracks ``about`` and receives its device keys."""
    await of.machine.update_tracked_users([about.user_id])
    (query,) = [r for r in await of.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)]
    await of.machine.mark_request_as_sent(query.request_id, about.query_answer())


async def open_session(sender: Peer, recipient: Peer) -> None:
    await learn_devices(sender, recipient)
    claim = await sender.machine.get_missing_sessions([recipient.user_id])
    assert claim is not None
    await sender.machine.mark_request_as_sent(claim.request_id, recipient.claim_answer())


def deliveries(request: ToDeviceRequest, sender: Peer, to: Peer) -> dict[str, Any]:
    """The to-device event ``to`` receives from ``request``."""
    content = request.messages[to.user_id][to.device_id]
    return {"type": request.event_type, "sender": sender.user_id, "content": content}


async def send(sender: Peer, to: Peer, event_type: str, content: dict[str, Any]) -> dict[str, Any]:
    devices = (await sender.machine.get_user_devices(to.user_id)).values()
    request, without = await sender.machine.encrypt_to_devices(devices, event_type, content)
    assert request is not None
    assert without == []
    await sender.machine.mark_request_as_sent(request.request_id, {})
    return deliveries(request, sender, to)
