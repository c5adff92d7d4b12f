"""Machines and accounts to benchmark with: olmstead devices on SQLite stores, no server.

An olmstead device here goes through what a real one does before it can talk
(its own device check, its first upload); other devices are bare vodozemac
accounts with really signed device keys and one-time keys, as ``/keys/query``
and ``/keys/claim`` would return them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vodozemac

from olmstead import KeysQueryRequest, KeysUploadRequest, OlmMachine, PickleKey, SqliteStore
from olmstead.olm import account as own

__all__ = [
    "KEY",
    "BenchDevice",
    "RemoteDevice",
    "claim_answer",
    "new_device",
    "query_answer",
    "remote_devices",
]

#: raw 32 bytes: a passphrase would add a deliberate scrypt to every open
KEY = PickleKey(b"b" * 32)


@dataclass
class BenchDevice:
    """An olmstead device and the keys it published."""

    machine: OlmMachine
    published: KeysUploadRequest

    @property
    def user_id(self) -> str:
        return self.machine.user_id

    @property
    def device_id(self) -> str:
        return self.machine.device_id

    def query_answer(self) -> dict[str, Any]:
        keys = self.machine.device_keys()
        return {"device_keys": {self.user_id: {self.device_id: keys}}, "failures": {}}

    def claim_answer(self) -> dict[str, Any]:
        key_id, key = sorted(self.published.one_time_keys.items())[0]
        return {"one_time_keys": {self.user_id: {self.device_id: {key_id: key}}}}

    async def close(self) -> None:
        await self.machine.store.close()


async def new_device(directory: Path, user_id: str, device_id: str) -> BenchDevice:
    """An olmstead device on a new SQLite store in ``directory``, its keys published."""
    store = await SqliteStore.open(directory / f"{device_id}.db", KEY)
    machine = await OlmMachine.open(store, user_id, device_id)
    (check,) = await machine.outgoing_requests()  # a new device looks itself up first
    assert isinstance(check, KeysQueryRequest)
    await machine.mark_request_as_sent(check.request_id, {"device_keys": {user_id: {}}})
    (upload,) = await machine.outgoing_requests()
    assert isinstance(upload, KeysUploadRequest)
    answer = {"one_time_key_counts": {"signed_curve25519": len(upload.one_time_keys)}}
    await machine.mark_request_as_sent(upload.request_id, answer)
    return BenchDevice(machine, upload)


@dataclass
class RemoteDevice:
    """Another device, as a bare vodozemac account with signed keys."""

    user_id: str
    device_id: str
    account: vodozemac.Account
    device_keys: dict[str, Any]
    #: key ID -> signed one-time key, none claimed yet
    one_time_keys: dict[str, dict[str, Any]]


def remote_devices(count: int, one_time_keys: int = 2) -> list[RemoteDevice]:
    """``count`` devices of ``count`` users, each with signed device and one-time keys."""
    devices = []
    for n in range(count):
        user_id, device_id = f"@user{n}:bench.example", f"DEVICE{n}"
        account = vodozemac.Account()
        account.generate_one_time_keys(one_time_keys)
        signed = own.signed_one_time_keys(account, user_id, device_id)
        account.mark_keys_as_published()
        devices.append(
            RemoteDevice(
                user_id,
                device_id,
                account,
                own.device_keys(account, user_id, device_id),
                signed,
            )
        )
    return devices


def query_answer(devices: list[RemoteDevice]) -> dict[str, Any]:
    """The ``/keys/query`` answer listing ``devices``."""
    listed: dict[str, dict[str, Any]] = {}
    for d in devices:
        listed.setdefault(d.user_id, {})[d.device_id] = d.device_keys
    return {"device_keys": listed, "failures": {}}


def claim_answer(devices: list[RemoteDevice]) -> dict[str, Any]:
    """The ``/keys/claim`` answer giving one signed one-time key of each device."""
    claimed: dict[str, dict[str, Any]] = {}
    for d in devices:
        key_id, key = sorted(d.one_time_keys.items())[0]
        claimed.setdefault(d.user_id, {})[d.device_id] = {key_id: key}
    return {"one_time_keys": claimed, "failures": {}}
