"""What a foreign store holds once read, and how it becomes an olmstead device.

Readers (``mautrix.py``) turn another library's store into a ``ForeignStore``:
vodozemac objects unpickled from libolm pickles, with the pickle key that opened
them. ``import_into`` commits it to an empty olmstead store in one transaction.

libolm accounts need one repair on the way in (``libolm_pickle.bump_key_counter``):
vodozemac 0.10 would otherwise issue its first new one-time key under the ID of the
newest key the account already holds, replacing it.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import vodozemac

from olmstead.errors import StoreCorrupt, StoreError, StoreMismatch
from olmstead.imports.libolm_pickle import bump_key_counter
from olmstead.store.base import (
    AccountRecord,
    Changes,
    CryptoStore,
    InboundGroupSessionRecord,
    OlmSessionRecord,
)
from olmstead.store.files import read_only_uri

__all__ = [
    "KNOWN_DEFAULT_KEYS",
    "ForeignStore",
    "GivenKey",
    "UnknownForeignKey",
    "first_key_that_opens",
    "import_into",
    "open_libolm_account",
    "open_read_only",
    "pickle_text",
    "seconds",
    "unpickle_libolm_account",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: pickle keys that bridges and bots shipped as defaults (see docs/keys-and-stores.md)
KNOWN_DEFAULT_KEYS = (
    "mautrix.bridge.e2ee",
    "maunium.net/go/mautrix-whatsapp",
    "go.mau.fi/mautrix-gmessages",
    "maunium.net/go/mautrix-signal",
    "go.mau.fi/meowlnir",
    "DEFAULT_KEY",
)


class GivenKey(str):
    """The pickle key the operator gave the normal way ($OLMSTEAD_PICKLE_KEY, --key-file,
    the prompt), as a candidate: tried first, and named "the key given"."""

    __slots__ = ()


class UnknownForeignKey(StoreError):
    """None of the candidate pickle keys opens a foreign store's account."""

    def __init__(
        self, store: str, tried: int, defaults: Iterable[str], given: bool = False
    ) -> None:
        self.store = store
        self.tried = tried
        self.given = given
        what = f"the key given and {tried - 1} candidates" if given else f"{tried} keys you gave"
        super().__init__(
            f"no candidate opens the account in {store}: tried {what} and the known defaults "
            f"({', '.join(defaults)}). Find the pickle key the bridge or bot was configured "
            "with (its config file, an old backup of it, its environment) and give it "
            "($OLMSTEAD_PICKLE_KEY, --key-file, or the prompt). Nothing was imported."
        )


@dataclass
class ForeignStore:
    """A foreign store's device, read and unpickled."""

    kind: str
    source: str
    user_id: str
    device_id: str
    shared: bool
    account: vodozemac.Account
    #: which candidate opened it, as the operator may see it: "the known default '<key>'",
    #: or "candidate #n" (never the operator's own key)
    key_used: str
    olm_sessions: list[OlmSessionRecord] = field(default_factory=list)
    inbound: list[InboundGroupSessionRecord] = field(default_factory=list)
    skipped: int = 0
    #: the key that opened it (to open it again; never printed)
    key: str = field(default="", repr=False)


def first_key_that_opens(
    candidates: Iterable[str], source: str, attempt: Callable[[str], T]
) -> tuple[T, str, str]:
    """``attempt(key)`` for the key given (a ``GivenKey``, first), the operator's other
    candidates, then the known defaults, until one does not raise ``ValueError``: its
    result, the key, and how to name the key."""
    given = list(candidates)
    named = [k for k in given if isinstance(k, GivenKey)]
    others = [k for k in given if not isinstance(k, GivenKey)]
    for n, key in enumerate([*named, *others, *KNOWN_DEFAULT_KEYS]):
        try:
            result = attempt(key)
        except ValueError:
            continue
        if isinstance(key, GivenKey):
            label = "the key given"
        elif n < len(given):
            label = f"candidate #{n - len(named) + 1}"
        else:
            label = f"the known default {key!r}"
        return result, str(key), label
    raise UnknownForeignKey(source, len(given), KNOWN_DEFAULT_KEYS, given=bool(named))


def unpickle_libolm_account(
    pickle: str, candidates: Iterable[str], source: str
) -> tuple[vodozemac.Account, str, str]:
    """The account, the key that opened it, and how to name that key to the operator."""
    return first_key_that_opens(candidates, source, lambda key: open_libolm_account(pickle, key))


def open_libolm_account(pickle: str, key: str) -> vodozemac.Account:
    """A libolm account pickle as a vodozemac account, its key counter repaired first."""
    return vodozemac.Account.from_libolm_pickle(
        bump_key_counter(pickle, key.encode()), key.encode()
    )


def open_read_only(path: str, source: str) -> sqlite3.Connection:
    """A foreign SQLite store, opened so that nothing in it can change."""
    try:
        return sqlite3.connect(read_only_uri(path), uri=True)
    except sqlite3.Error as exc:
        raise StoreCorrupt(source, str(exc)) from exc


def pickle_text(pickle: Any) -> str:
    """A pickle as stored (text, bytes or a database buffer) as text."""
    if isinstance(pickle, bytes | bytearray | memoryview):
        return bytes(pickle).decode()
    return str(pickle)


def seconds(value: Any) -> float:
    """A stored timestamp (datetime, ISO text or a number) as seconds since the epoch."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return 0.0
    return float(value or 0)


async def import_into(foreign: ForeignStore, store: CryptoStore) -> None:
    """Commit a foreign device into an olmstead store that holds no device yet (or this one)."""
    existing = await store.load_account()
    if existing is not None:
        if (existing.user_id, existing.device_id) != (foreign.user_id, foreign.device_id):
            raise StoreMismatch(
                store.name,
                (existing.user_id, existing.device_id),
                (foreign.user_id, foreign.device_id),
            )
        if existing.account.ed25519_key != foreign.account.ed25519_key:
            raise StoreError(
                f"{store.name} already holds device {foreign.device_id} with other identity "
                "keys than the store being imported; import into an empty store."
            )
    record = AccountRecord(foreign.user_id, foreign.device_id, foreign.account, foreign.shared)
    await store.save_changes(
        Changes(
            account=record,
            olm_sessions=foreign.olm_sessions,
            inbound_group_sessions=foreign.inbound,
        )
    )
    log.info(
        "imported %s device %s of %s: %d Olm sessions, %d room keys (%d skipped)",
        foreign.kind,
        foreign.device_id,
        foreign.user_id,
        len(foreign.olm_sessions),
        len(foreign.inbound),
        foreign.skipped,
    )
