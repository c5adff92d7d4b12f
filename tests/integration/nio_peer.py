"""matrix-nio as a peer olmstead did not write: log in, sync, send, and what it decrypted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nio import AsyncClient, AsyncClientConfig, MegolmEvent, RoomMessageText, SyncResponse
from nio.events.room_events import Event


class NioPeer:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.texts: list[RoomMessageText] = []
        self.undecryptable: list[MegolmEvent] = []
        client.add_event_callback(self._on_text, RoomMessageText)
        client.add_event_callback(self._on_undecryptable, MegolmEvent)

    @classmethod
    async def login(cls, url: str, user: dict[str, Any], store: Path, name: str) -> NioPeer:
        store.mkdir(parents=True, exist_ok=True)
        config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
        client = AsyncClient(url, user["user_id"], store_path=str(store), config=config)
        answer = await client.login(user["password"], device_name=name)
        assert client.access_token, answer
        peer = cls(client)
        await peer.sync()
        return peer

    @property
    def device_id(self) -> str:
        return str(self.client.device_id)

    async def sync(self) -> None:
        """One sync, then whatever key traffic nio asks for, as its sync_forever would."""
        answer = await self.client.sync(timeout=0, full_state=True)
        assert isinstance(answer, SyncResponse), answer
        if self.client.should_upload_keys:
            await self.client.keys_upload()
        if self.client.should_query_keys:
            await self.client.keys_query()
        if self.client.should_claim_keys:
            await self.client.keys_claim(self.client.get_users_for_key_claiming())

    async def send_text(self, room_id: str, body: str) -> None:
        answer = await self.client.room_send(
            room_id,
            "m.room.message",
            {"msgtype": "m.text", "body": body},
            ignore_unverified_devices=True,
        )
        assert hasattr(answer, "event_id"), answer

    def bodies(self) -> list[str]:
        return [event.body for event in self.texts]

    async def close(self) -> None:
        await self.client.close()

    async def _on_text(self, _room: Any, event: Event) -> None:
        assert isinstance(event, RoomMessageText)
        self.texts.append(event)

    async def _on_undecryptable(self, _room: Any, event: Event) -> None:
        assert isinstance(event, MegolmEvent)
        self.undecryptable.append(event)
