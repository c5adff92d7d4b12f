"""How the operator commands find a store and its pickle key, without secrets on the command line.

A store is an SQLite path or a ``postgresql://`` DSN (with ``--account``). A pickle
key comes from an environment variable (a string, as bridge configs hold it), a
key file, or a hidden prompt — never from an argument, which other users could read
in ``ps``. A key file holds 32 raw bytes in base64 (as ``load_or_create_key_file``
writes them), or else a key string (as a bridge's config holds it). For mautrix and
matrix-nio stores the key's text is what is tried: the string, or the key file's text.
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

__all__ = ["existing", "foreign_key_text", "key_from_text", "open_device", "pickle_key"]


def pickle_key(env: str, key_file: Path | None, prompt: str, confirm: bool = False) -> PickleKey:
    """The pickle key from ``key_file``, else the environment variable ``env``, else a prompt
    (typed twice with ``confirm``: a store rekeyed to a typo would be lost)."""
    if key_file is not None:
        return key_from_file_text(_key_file_text(key_file))
    value = os.environ.get(env)
    if value is None:
        value = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    return PickleKey(value)


def key_from_file_text(text: str) -> PickleKey:
    """A key file's text as olmstead uses it: base64 of 32 bytes is a raw key, any other
    text a key string (stretched)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raw = b""
    if len(raw) == 32:
        return PickleKey(raw)
    if not text:
        raise click.UsageError("the key file is empty")
    return PickleKey(text)


def key_from_text(text: str, from_file: bool) -> PickleKey:
    """The olmstead key for the text ``foreign_key_text`` returned."""
    return key_from_file_text(text) if from_file else PickleKey(text)


def foreign_key_text(
    env: str, key_file: Path | None, prompt: str, confirm: bool = False
) -> tuple[str | None, bool]:
    """The key given for a mautrix or matrix-nio store, as text: the key file's text, else
    ``env``, else a prompt that may be left empty (then only candidates and the known
    defaults are tried, as with no terminal to ask). Also: whether it came from a file."""
    if key_file is not None:
        return _key_file_text(key_file), True
    value = os.environ.get(env)
    if value is None:
        try:
            value = click.prompt(
                prompt + " (Enter for none: try candidates and known defaults)",
                default="",
                show_default=False,
                hide_input=True,
                confirmation_prompt=confirm,  # it may become a new store's key
                err=True,  # stdout stays the report (--json) alone
            )
        except click.Abort:  # no input to read: nobody to ask
            value = ""
    return (value or None), False


def _key_file_text(key_file: Path) -> str:
    return key_file.read_bytes().decode("utf-8", errors="strict").strip()


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
