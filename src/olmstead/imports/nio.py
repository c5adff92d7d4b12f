"""Read a matrix-nio crypto store: the SQLite file ``{user_id}_{device_id}.db``.

nio pickles with vodozemac under ``sha256(pickle key)``, and stores written before
it moved to vodozemac hold libolm pickles under the key itself; both are read.
Its pickle key defaults to ``DEFAULT_KEY``. The store is only read.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterable
from contextlib import closing
from typing import Any

import vodozemac

from olmstead.errors import StoreCorrupt
from olmstead.imports.foreign import (
    ForeignStore,
    first_key_that_opens,
    open_libolm_account,
    open_read_only,
    pickle_text,
    seconds,
)
from olmstead.store.base import InboundGroupSessionRecord, OlmSessionRecord

__all__ = ["read_nio_sqlite"]


def read_nio_sqlite(
    path: str, candidates: Iterable[str], user_id: str | None = None
) -> ForeignStore:
    source = f"matrix-nio store {path}"
    with closing(open_read_only(path, source)) as conn:
        try:
            accounts = conn.execute(
                "SELECT id, account, user_id, device_id, shared FROM accounts"
            ).fetchall()
            if user_id is not None:
                accounts = [a for a in accounts if a[2] == user_id]
            if len(accounts) != 1:
                raise StoreCorrupt(source, f"expected one account, found {len(accounts)}")
            row_id, pickle, owner, device_id, shared = accounts[0]
            olm = conn.execute(
                "SELECT sender_key, session, creation_time, last_usage_date FROM olmsessions "
                "WHERE account_id = ?",
                (row_id,),
            ).fetchall()
            megolm = conn.execute(
                "SELECT room_id, sender_key, fp_key, session FROM megolminboundsessions "
                "WHERE account_id = ?",
                (row_id,),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreCorrupt(source, f"not a matrix-nio store: {exc}") from exc

    (account, _libolm), key, label = first_key_that_opens(
        candidates, source, lambda key: _account(pickle_text(pickle), key)
    )
    foreign = ForeignStore(
        "matrix-nio", source, owner, device_id, bool(shared), account, label, key=key
    )
    for sender_key, session, created, used in olm:
        try:
            restored, _ = _either(vodozemac.Session, pickle_text(session), key)
        except ValueError:
            foreign.skipped += 1
            continue
        foreign.olm_sessions.append(
            OlmSessionRecord(sender_key, restored, seconds(created), seconds(used))
        )
    for room_id, sender_key, signing_key, session in megolm:
        try:
            inbound, _ = _either(vodozemac.InboundGroupSession, pickle_text(session), key)
        except ValueError:
            foreign.skipped += 1
            continue
        foreign.inbound.append(InboundGroupSessionRecord(room_id, sender_key, signing_key, inbound))
    return foreign


def _account(pickle: str, key: str) -> tuple[vodozemac.Account, bool]:
    """nio's account: a vodozemac pickle, or a libolm one (its key counter repaired)."""
    try:
        return vodozemac.Account.from_pickle(pickle, hashlib.sha256(key.encode()).digest()), False
    except ValueError:
        return open_libolm_account(pickle, key), True


def _either(kind: Any, pickle: str, key: str) -> tuple[Any, bool]:
    """Unpickle as nio does: vodozemac under sha256(key), else libolm under the key."""
    try:
        return kind.from_pickle(pickle, hashlib.sha256(key.encode()).digest()), False
    except ValueError:
        load: Callable[[str, bytes], Any] = kind.from_libolm_pickle
        return load(pickle, key.encode()), True
