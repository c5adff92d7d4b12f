"""How the operator commands find a store and its pickle key, without secrets on the command line.

A store is an SQLite path or a ``postgresql://`` DSN (with ``--account``). A pickle
key comes from an environment variable (a string, as bridge configs hold it), a
key file (32 raw bytes, base64, as ``load_or_create_key_file`` writes it), or a
hidden prompt — never from an argument, which other users could read in ``ps``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import click

from olmstead.machine import OlmMachine
from olmstead.store import CryptoStore, PickleKey
from olmstead.store.named import is_postgres, open_store

__all__ = ["existing", "open_device", "pickle_key"]


def pickle_key(env: str, key_file: Path | None, prompt: str, confirm: bool = False) -> PickleKey:
    """The pickle key from ``key_file``, else the environment variable ``env``, else a prompt
    (typed twice with ``confirm``: a store rekeyed to a typo would be lost)."""
    if key_file is not None:
        raw = base64.b64decode(key_file.read_bytes().strip(), validate=True)
        return PickleKey(raw)
    value = os.environ.get(env)
    if value is None:
        value = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    return PickleKey(value)


def existing(store: str) -> str:
    """``store``, if it names a DSN or an SQLite file that exists: the tools never create one."""
    if not is_postgres(store) and not Path(store).exists():
        raise click.UsageError(f"no store at {store}: give an existing SQLite file or a DSN")
    return store


@asynccontextmanager
async def open_device(
    store: str, account: str, key: PickleKey
) -> AsyncIterator[tuple[CryptoStore, OlmMachine]]:
    """The store and its device's machine; the store is closed (its lease released) after."""
    opened = await open_store(store, account, key)
    try:
        record = await opened.load_account()
        if record is None:
            raise click.ClickException(f"{opened.name} holds no device account yet")
        yield opened, await OlmMachine.open(opened, record.user_id, record.device_id)
    finally:
        await opened.close()
