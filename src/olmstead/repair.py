"""``olmstead repair``: the safe fixes for what ``olmstead doctor`` found.

Each ``Repair`` is planned from a doctor ``Report`` and run only when the operator
confirms it. None of them throws a key away:

- a stale lease is marked released (only if it is still the dead holder's);
- a store written with a candidate or known default key is rekeyed to the key the
  operator gave, in one transaction;
- stale one-time keys of a rolled-back store are drained and fresh keys uploaded,
  and whatever upload is missing (pending keys, no one-time keys, no fallback key)
  goes up — by running the client once;
- a device whose ID now belongs to another identity (or was deleted) moves to a
  new device: a fresh login, the inbound room keys carried over so history stays
  readable, the old store kept beside the new one, and the old device deleted
  when the operator allows it;
- a foreign store (mautrix, matrix-nio) moves into a new olmstead store;
- with ``doctor --trust`` findings: an account without cross-signing gets its keys
  and secret storage (the recovery key is shown once), and a device its owner has
  not signed recovers the keys with the recovery key and signs itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import Callable, Coroutine
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from olmstead.client import Client, Session
from olmstead.doctor import Credentials, Report
from olmstead.errors import LocalProtocolError, MatrixHttpError, TransportError
from olmstead.http.endpoints import CLIENT_V3
from olmstead.http.transport import MatrixHttp
from olmstead.store import CryptoStore, PickleKey, SqliteStore
from olmstead.store.files import PRIVATE_FILE, write_private
from olmstead.store.named import is_postgres, open_store
from olmstead.upload_guard import OneTimeKeysDrained

__all__ = ["Outcome", "Repair", "RepairOptions", "plan_repairs", "read_session_file"]

#: causes that running the client once mends: it drains, uploads, refills
_SYNC_MENDS = {
    "store_rolled_back",
    "upload_pending",
    "no_one_time_keys",
    "fallback_key_missing",
    "keys_never_uploaded",
}
#: causes that leave the device ID unusable for this store's identity
_DEVICE_LOST = {"device_id_in_use", "device_taken_over", "device_keys_missing", "token_invalid"}


@dataclass(frozen=True)
class Outcome:
    """What a repair did, and where the device lives now (for a second diagnosis)."""

    text: str
    store: str | None = None
    server: Credentials | None = None
    #: the device's account in a PostgreSQL store, when it moved to another
    account: str | None = None


@dataclass(frozen=True)
class Repair:
    cause: str
    #: what will be done, as the question put to the operator
    title: str
    run: Callable[[], Coroutine[Any, Any, Outcome]]


@dataclass(frozen=True)
class RepairOptions:
    """What repairs may need beyond the report: asked for lazily, only when used."""

    store: str
    key: PickleKey | None
    account: str = "default"
    server: Credentials | None = None
    #: the account's password, for a move to a new device (prompted for when needed)
    password: Callable[[], str] | None = None
    #: where a moved or imported device goes (a new SQLite path); default: in place
    into: str | None = None
    #: delete the old device after a move (it logs out whatever else still uses it)
    delete_old_device: bool = True
    #: where a new login's session (access token included) is written, mode 0600
    session_file: Path | None = None
    #: the account's recovery key, to recover cross-signing (prompted for when needed)
    recovery_key: Callable[[], str] | None = None


def plan_repairs(report: Report, options: RepairOptions) -> list[Repair]:
    """The repairs for what ``report`` found, in the order they should run."""
    causes = report.causes()
    repairs: list[Repair] = []
    if report.kind != "olmstead":
        if report.device is not None and options.into is not None and options.key is not None:
            repairs.append(
                Repair(
                    "legacy_default_key" if "legacy_default_key" in causes else "foreign_store",
                    f"move the {report.kind} device {report.device.device_id} into a new "
                    f"olmstead store at {options.into}, under the pickle key you gave",
                    lambda: _import_foreign(report, options),
                )
            )
        return repairs
    if "files_readable" in causes and report.exposed:
        exposed = list(report.exposed)
        repairs.append(
            Repair(
                "files_readable",
                f"make {', '.join(exposed)} readable by their owner alone (mode 0600)",
                lambda: _make_private(exposed),
            )
        )
    if "lock_stale" in causes:
        repairs.append(
            Repair("lock_stale", "release the dead process's lease", lambda: _release(options))
        )
    if "wrong_pickle_key" in causes and report.opener is not None and options.key is not None:
        repairs.append(
            Repair(
                "wrong_pickle_key",
                "re-encrypt the store under the key you gave (it opens with another one now)",
                lambda: _rekey(report, options),
            )
        )
        return repairs  # the rest is diagnosed again once the store opens
    if report.device is None or options.server is None:
        return repairs
    if causes & _DEVICE_LOST:
        cause = sorted(causes & _DEVICE_LOST)[0]
        what = f"log in as a new device and carry the room keys over from {report.device.device_id}"
        if options.delete_old_device:
            what += f", then delete device {report.device.device_id}"
        repairs.append(Repair(cause, what, lambda: _move_to_new_device(report, options)))
    elif "no_cross_signing" in causes:
        repairs.append(
            Repair(
                "no_cross_signing",
                "create cross-signing keys and secret storage, and sign this device (the "
                "recovery key is shown once: keep it)",
                lambda: _bootstrap(report, options),
            )
        )
    elif "device_not_cross_signed" in causes and options.recovery_key is not None:
        repairs.append(
            Repair(
                "device_not_cross_signed",
                "recover the account's cross-signing keys with its recovery key and sign "
                "this device",
                lambda: _bootstrap(report, options, recover=True),
            )
        )
    elif causes & _SYNC_MENDS:
        cause = (
            "store_rolled_back"
            if "store_rolled_back" in causes
            else sorted(causes & _SYNC_MENDS)[0]
        )
        repairs.append(
            Repair(
                cause,
                "run the client once: drain stale one-time keys, upload what is missing",
                lambda: _sync_keys(report, options),
            )
        )
    return repairs


# --- the repairs -------------------------------------------------------------------------------


async def _make_private(paths: list[str]) -> Outcome:
    for path in paths:
        os.chmod(path, PRIVATE_FILE)
    return Outcome(f"made {', '.join(paths)} mode 0600")


async def _release(options: RepairOptions) -> Outcome:
    if is_postgres(options.store):
        from olmstead.store.postgres import PostgresStore

        lock, _now = await PostgresStore.read_lease(options.store, options.account)
        released = lock is not None and await PostgresStore.release_stale_lease(
            options.store, options.account, lock.holder
        )
    else:
        lock = SqliteStore.read_lease(options.store)
        released = lock is not None and SqliteStore.release_stale_lease(options.store, lock.holder)
    if not released:
        return Outcome("the lease was renewed or taken meanwhile: left as it is", options.store)
    assert lock is not None
    return Outcome(f"released the lease {lock.holder} left behind", options.store, options.server)


async def _rekey(report: Report, options: RepairOptions) -> Outcome:
    assert report.opener is not None
    assert options.key is not None
    store = await _open(options.store, options.account, PickleKey(report.opener))
    kept = ""
    try:
        old = store.fingerprint
        if isinstance(store, SqliteStore):  # should the new key be lost, this one is not
            copy = _beside(options.store, f"before-rekey-{old}")
            await store.copy_to(copy)
            kept = (
                f"; a copy under the old key is at {copy}: delete it once the bot runs with "
                "the new key (restored later, it would roll the keys back)"
            )
        new = await store.rekey(options.key)
    finally:
        await store.close()
    return Outcome(
        f"re-encrypted every secret from key {old} to key {new}, in one transaction{kept}",
        options.store,
        options.server,
    )


async def _device_client(report: Report, options: RepairOptions) -> tuple[Client, Session]:
    """A client of the device diagnosed, on its store, with the session given."""
    assert report.device is not None
    assert options.server is not None
    assert options.key is not None
    session = Session(
        options.server.homeserver,
        report.device.user_id,
        report.device.device_id,
        options.server.access_token,
    )
    client = Client(
        session.homeserver, store=await _open(options.store, options.account, options.key)
    )
    return client, session


async def _sync_keys(report: Report, options: RepairOptions) -> Outcome:
    client, session = await _device_client(report, options)
    drained: list[OneTimeKeysDrained] = []
    client.on_keys_drained(drained.append)
    client.restore(session)
    try:
        machine = await client.init_crypto()
        await client.sync_once()
        await client.process_outgoing()
        count = machine.server_key_count
        problem = machine.key_problem
    finally:
        await _close(client)
    if problem is not None:
        raise problem
    text = f"the server now holds {count} one-time keys"
    if drained:
        claimed = sum(d.drained for d in drained)
        text = f"drained {claimed} one-time keys of ours, the stale ones among them; " + text
    return Outcome(text, options.store, options.server)


async def _bootstrap(report: Report, options: RepairOptions, recover: bool = False) -> Outcome:
    client, session = await _device_client(report, options)
    client.restore(session)
    try:
        await client.init_crypto()
        if recover:
            assert options.recovery_key is not None
            await client.recover(recovery_key=options.recovery_key())
            text = "recovered the cross-signing keys; this device is signed by its owner"
        else:
            key = await client.bootstrap_cross_signing()
            text = f"cross-signing set up; the recovery key (keep it safe): {key}"
    finally:
        await _close(client)
    return Outcome(text, options.store, options.server)


async def _move_to_new_device(report: Report, options: RepairOptions) -> Outcome:
    assert report.device is not None
    assert options.server is not None
    assert options.key is not None
    if options.password is None:
        raise LocalProtocolError("moving to a new device needs the account's password")
    if options.into is None and is_postgres(options.store):
        raise LocalProtocolError("give the PostgreSQL account for the new device (--into)")
    old_device, user_id = report.device.device_id, report.device.user_id
    password = options.password()
    target = options.into or _beside(options.store, "new")
    if not is_postgres(options.store) and _exists(target):
        raise LocalProtocolError(f"{target} exists: move it away, a new device needs a new store")

    old = await _open(options.store, options.account, options.key)
    try:
        room_keys = [record async for record in old.inbound_group_sessions()]
    finally:
        await old.close()

    client = Client(options.server.homeserver, store=await _open_new(target, options))
    try:
        session = await client.login(user_id, password, device_name=f"olmstead (was {old_device})")
        # the new token first: whatever happens next, the new device is never lost
        default_file = (
            f"{session.device_id}.session.json"
            if is_postgres(options.store)
            else f"{options.into or options.store}.session.json"
        )
        saved = _save_session(session, options.session_file or Path(default_file))
        machine = await client.init_crypto()
        carried = await machine.add_room_keys(room_keys)
        await client.sync_once()
    finally:
        await _close(client)

    where, placed = target, ""
    if options.into is None:  # in place: the new store takes the old one's path
        kept = _beside(options.store, f"replaced-{old_device}-{int(time.time())}")
        if _swap_in(options.store, target, kept):
            where, placed = options.store, f"; the old store is kept at {kept}"
        else:
            placed = (
                f"; the new store is at {target}: something still has {options.store} open "
                "(stop it, then move the new store into place)"
            )
    deleted = ""
    if options.delete_old_device:
        deleted = await _delete_device(session, old_device, password)
    moved_to_account = target if is_postgres(options.store) else None
    return Outcome(
        f"now device {session.device_id}: {carried} room keys carried over from "
        f"{old_device}{placed}{deleted}; its session (access token) is in {saved}",
        options.store if moved_to_account else where,
        Credentials(session.homeserver, session.access_token),
        moved_to_account,
    )


def _swap_in(store: str, new: str, kept: str) -> bool:
    """Put the SQLite store ``new`` at ``store``, the old one moved to ``kept``.

    Only when nothing holds the old store: its lease is free or dead, and its
    write-ahead log can be folded in completely (a WAL left behind holds commits a
    renamed file would lose). Whether the swap happened.
    """
    lock = SqliteStore.read_lease(store)
    if lock is not None and lock.expires_at > time.time():
        return False
    for path in (store, new):
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            busy, _log, _folded = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        log = f"{path}-wal"
        if busy or (os.path.exists(log) and os.path.getsize(log) > 0):
            return False
    for path in (store, new):  # empty now: nothing of value, rebuilt on next open
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)
    os.replace(store, kept)
    os.replace(new, store)  # a crash between the two: the new store waits at its name
    return True


async def _import_foreign(report: Report, options: RepairOptions) -> Outcome:
    from olmstead.imports.foreign import import_into
    from olmstead.imports.mautrix import read_mautrix_postgres, read_mautrix_sqlite
    from olmstead.imports.nio import read_nio_sqlite

    assert options.into is not None
    assert options.key is not None
    assert report.opener is not None
    if _exists(options.into):
        raise LocalProtocolError(f"{options.into} exists: a foreign device moves into a new store")
    user = None if options.account == "default" else options.account
    candidates = [report.opener]
    if report.kind == "mautrix" and is_postgres(options.store):
        foreign = await read_mautrix_postgres(options.store, candidates, user)
    elif report.kind == "mautrix":
        foreign = read_mautrix_sqlite(options.store, candidates, user)
    else:
        foreign = read_nio_sqlite(options.store, candidates, user)
    store = await SqliteStore.open(options.into, options.key)
    try:
        await import_into(foreign, store)
        fingerprint = store.fingerprint
    finally:
        await store.close()
    text = (
        f"moved device {foreign.device_id} ({len(foreign.inbound)} room keys, "
        f"{len(foreign.olm_sessions)} Olm sessions) into {options.into}, key {fingerprint}; "
        f"the {report.kind} store was only read: retire it, never run both"
    )
    if options.server is not None:  # what the other library never uploaded goes up now
        synced = await _sync_keys(report, replace(options, store=options.into, account="default"))
        text += f"; {synced.text}"
    return Outcome(text, options.into, options.server)


# --- helpers -----------------------------------------------------------------------------------


async def _open(store: str, account: str, key: PickleKey) -> CryptoStore:
    if not is_postgres(store) and not _exists(store):
        raise LocalProtocolError(f"no store at {store}")  # repairs never create a store
    return await open_store(store, account, key)


async def _open_new(target: str, options: RepairOptions) -> CryptoStore:
    assert options.key is not None
    if is_postgres(options.store):  # --into names another account in the same database
        from olmstead.store.postgres import PostgresStore

        return await PostgresStore.open(options.store, options.key, account=target)
    if _exists(target):
        raise LocalProtocolError(f"{target} exists: a new device goes into a new store")
    return await SqliteStore.open(target, options.key)


def _exists(path: str) -> bool:
    return Path(path).exists()


def _beside(store: str, label: str) -> str:
    path = Path(store)
    return str(path.with_name(f"{path.name}.{label}"))


async def _close(client: Client) -> None:
    await client.close()
    if client.store is not None:
        await client.store.close()


async def _delete_device(session: Session, device_id: str, password: str) -> str:
    """Delete ``device_id`` with the password (user-interactive auth); a note of the result."""
    http = MatrixHttp(session.homeserver, session.access_token)
    path = f"{CLIENT_V3}/devices/{quote(device_id, safe='')}"
    try:
        try:
            await http.request("DELETE", path, {})
            return f"; deleted device {device_id}"
        except MatrixHttpError as challenge:
            flows: Any = challenge.body if challenge.status == 401 else None
            if not isinstance(flows, dict) or "session" not in flows:
                raise
        auth = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": session.user_id},
            "password": password,
            "session": flows["session"],
        }
        await http.request("DELETE", path, {"auth": auth})
        return f"; deleted device {device_id}"
    except TransportError as error:
        return f"; device {device_id} was not deleted ({error}): delete it from another client"
    finally:
        await http.close()


def _save_session(session: Session, path: Path) -> Path:
    # it holds a token: 0600 even over a file already there with a looser mode
    write_private(path, json.dumps(dataclasses.asdict(session)).encode())
    return path


def read_session_file(path: str | Path) -> Session:
    """The session a move to a new device wrote (``Client.restore`` takes it)."""
    return Session(**json.loads(Path(path).read_text()))
