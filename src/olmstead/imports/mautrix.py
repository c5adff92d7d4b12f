"""Read a mautrix crypto store (mautrix-python or mautrix-go; SQLite or PostgreSQL).

The tables (``crypto_account``, ``crypto_olm_session``,
``crypto_megolm_inbound_session``) hold libolm pickles made with the bridge's
pickle key. The store is only read: nothing in it is changed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from contextlib import closing
from typing import Any

import vodozemac

from olmstead.errors import StoreCorrupt
from olmstead.imports.foreign import (
    ForeignStore,
    open_read_only,
    pickle_text,
    seconds,
    unpickle_libolm_account,
)
from olmstead.store.base import InboundGroupSessionRecord, OlmSessionRecord

__all__ = ["read_mautrix_postgres", "read_mautrix_sqlite"]

_ACCOUNT = "SELECT account_id, device_id, shared, account FROM crypto_account"
_OLM = (
    "SELECT sender_key, session, created_at, last_decrypted FROM crypto_olm_session "
    "WHERE account_id = {p}"
)
_MEGOLM = (
    "SELECT room_id, sender_key, signing_key, session FROM crypto_megolm_inbound_session "
    "WHERE account_id = {p} AND session IS NOT NULL"
)


def read_mautrix_sqlite(
    path: str, candidates: Iterable[str], user_id: str | None = None
) -> ForeignStore:
    """Read the (only, or ``user_id``'s) device of a mautrix SQLite crypto store, read-only."""
    source = f"mautrix store {path}"
    with closing(open_read_only(path, source)) as conn:
        try:
            accounts = conn.execute(_ACCOUNT).fetchall()
            account_id, device_id, shared, pickle = _pick(accounts, user_id, source)
            olm = conn.execute(_OLM.format(p="?"), (account_id,)).fetchall()
            megolm = conn.execute(_MEGOLM.format(p="?"), (account_id,)).fetchall()
        except sqlite3.Error as exc:
            raise StoreCorrupt(source, f"not a mautrix crypto store: {exc}") from exc
    return _unpickle(
        "mautrix", source, account_id, device_id, shared, pickle, olm, megolm, candidates
    )


async def read_mautrix_postgres(
    dsn: str, candidates: Iterable[str], user_id: str | None = None
) -> ForeignStore:
    """The same for a mautrix store in PostgreSQL (needs the ``postgres`` extra)."""
    import asyncpg

    source = "mautrix store in PostgreSQL"
    conn = await asyncpg.connect(dsn)
    try:
        accounts = [tuple(r) for r in await conn.fetch(_ACCOUNT)]
        account_id, device_id, shared, pickle = _pick(accounts, user_id, source)
        olm = [tuple(r) for r in await conn.fetch(_OLM.format(p="$1"), account_id)]
        megolm = [tuple(r) for r in await conn.fetch(_MEGOLM.format(p="$1"), account_id)]
    except asyncpg.PostgresError as exc:
        raise StoreCorrupt(source, f"not a mautrix crypto store: {exc}") from exc
    finally:
        await conn.close()
    return _unpickle(
        "mautrix", source, account_id, device_id, shared, pickle, olm, megolm, candidates
    )


def _pick(rows: list[Any], user_id: str | None, source: str) -> tuple[str, str, bool, Any]:
    if user_id is not None:
        rows = [r for r in rows if r[0] == user_id]
    if len(rows) != 1:
        ids = ", ".join(str(r[0]) for r in rows) or "none"
        raise StoreCorrupt(
            source, f"expected one device account, found {len(rows)} ({ids}): name the user ID"
        )
    account_id, device_id, shared, pickle = rows[0]
    return str(account_id), str(device_id), bool(shared), pickle


def _unpickle(
    kind: str,
    source: str,
    account_id: str,
    device_id: str,
    shared: bool,
    pickle: Any,
    olm_rows: list[Any],
    megolm_rows: list[Any],
    candidates: Iterable[str],
) -> ForeignStore:
    account, key, label = unpickle_libolm_account(pickle_text(pickle), candidates, source)
    foreign = ForeignStore(kind, source, account_id, device_id, shared, account, label, key=key)
    secret = key.encode()
    for sender_key, session, created, used in olm_rows:
        try:
            restored = vodozemac.Session.from_libolm_pickle(pickle_text(session), secret)
        except ValueError:
            foreign.skipped += 1
            continue
        foreign.olm_sessions.append(
            OlmSessionRecord(str(sender_key), restored, seconds(created), seconds(used))
        )
    for room_id, sender_key, signing_key, session in megolm_rows:
        try:
            inbound = vodozemac.InboundGroupSession.from_libolm_pickle(pickle_text(session), secret)  # type: ignore[attr-defined]
        except ValueError:
            foreign.skipped += 1
            continue
        foreign.inbound.append(
            InboundGroupSessionRecord(
                str(room_id), str(sender_key), str(signing_key or ""), inbound
            )
        )
    return foreign
