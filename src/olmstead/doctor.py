"""``olmstead doctor``: every key problem of a device named, with its evidence and its fix.

Checks are read-only: a store is inspected without taking its lease (a process
holding it is neither waited for nor disturbed, a stale lease stays as found) and
without migrating it; foreign stores (mautrix, matrix-nio) are opened read-only;
the server is asked only questions that change nothing there (``whoami``,
``/keys/query``, our key-state marker in account data, and a ``/sync`` without a
``since`` token, filtered to nothing but key counts: Synapse deletes to-device
messages only up to a ``since`` token, so none is acknowledged). Like any request,
they do update the device's "last seen" time.

An answer doctor cannot read (an error status, a body that is not what the spec
says) is reported as ``server_error`` and concludes nothing about the device: a
proxy's 502 must never look like a deleted device, which repair would replace.

Each check gives a ``Finding``: a verdict (ok, warning, error), a stable cause name
for tools, what was seen, and what to do. ``olmstead repair`` acts on the causes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx
import vodozemac

from olmstead import key_state
from olmstead.backoff import Backoff
from olmstead.cross_signing import published_identity, secret_storage
from olmstead.cross_signing.machine import SECRET_NAMES, CrossSigningMachine
from olmstead.errors import (
    StoreCorrupt,
    StoreError,
    StoreMigrationError,
    TrustError,
    WrongPickleKey,
)
from olmstead.http.endpoints import CLIENT_V3, account_data_path
from olmstead.imports.foreign import (
    KNOWN_DEFAULT_KEYS,
    ForeignStore,
    GivenKey,
    UnknownForeignKey,
)
from olmstead.store.base import Inspection, LockRow
from olmstead.store.files import open_to_others, read_only_uri, sqlite_files
from olmstead.store.named import is_postgres
from olmstead.store.pickle_key import PickleKey
from olmstead.store.sqlite import SqliteStore

__all__ = [
    "Credentials",
    "DeviceState",
    "Finding",
    "Report",
    "diagnose",
    "store_kind",
]

Verdict = Literal["ok", "warning", "error"]
Kind = Literal["olmstead", "mautrix", "matrix-nio"]
_SEVERITY = {"ok": 0, "warning": 1, "error": 2}


def _counts_only_filter() -> str:
    """A /sync filter that leaves nothing but key counts: no rooms, presence or account data.

    Each one differs (a room that cannot exist is excluded): Synapse answers a sync
    identical to one of the last two minutes from its cache, and doctor must see the
    counts as they are now — right after a repair, say.
    """
    never = f"!doctor-{uuid.uuid4().hex}:invalid"
    return json.dumps(
        {
            "room": {"rooms": [], "not_rooms": [never]},
            "presence": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
        }
    )


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: Verdict
    #: a short name for the cause, stable for tools (``wrong_pickle_key``, ``lock_stale``…)
    cause: str
    evidence: str
    fix: str = ""


@dataclass(frozen=True)
class DeviceState:
    """What a store, whichever library wrote it, says about its device."""

    user_id: str
    device_id: str
    account: vodozemac.Account
    #: the store holds that the server confirmed its device keys
    shared: bool
    #: the key-state marker a drain already answered (olmstead stores)
    drained_marker: str | None = None


@dataclass
class Report:
    store: str
    kind: Kind
    findings: list[Finding] = field(default_factory=list)
    device: DeviceState | None = None
    #: the candidate or known default that opens a store the given key does not
    opener: str | None = field(default=None, repr=False)
    #: files holding keys that users other than their owner can read
    exposed: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return max((_SEVERITY[f.verdict] for f in self.findings), default=0)

    def causes(self) -> set[str]:
        return {f.cause for f in self.findings if f.verdict != "ok"}

    def to_json(self) -> str:
        return json.dumps(
            {
                "store": self.store,
                "kind": self.kind,
                "device": None
                if self.device is None
                else {"user_id": self.device.user_id, "device_id": self.device.device_id},
                "exit_code": self.exit_code,
                "findings": [asdict(f) for f in self.findings],
            },
            indent=2,
        )

    def to_text(self) -> str:
        marks = {"ok": "ok  ", "warning": "WARN", "error": "FAIL"}
        lines = [f"{self.store} ({self.kind} store)"]
        for f in self.findings:
            lines.append(f"[{marks[f.verdict]}] {f.check}: {f.evidence}")
            if f.fix:
                lines.append(f"       fix: {f.fix}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Credentials:
    homeserver: str
    access_token: str


def store_kind(store: str) -> Kind:
    """Which library wrote the store: by its tables (SQLite); a DSN is olmstead's."""
    if is_postgres(store):
        return "olmstead"
    try:
        with closing(sqlite3.connect(read_only_uri(store), uri=True)) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error:
        return "olmstead"  # the store check says what is wrong with it
    if "crypto_account" in tables:
        return "mautrix"
    if {"accounts", "olmsessions"} <= tables:
        return "matrix-nio"
    return "olmstead"


async def diagnose(
    store: str,
    key: PickleKey | None,
    *,
    account: str = "default",
    kind: Kind | None = None,
    candidates: Iterable[str] = (),
    server: Credentials | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    given: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
    trust: bool = False,
    recovery_key: str | None = None,
) -> Report:
    """Diagnose a store (SQLite path or PostgreSQL DSN) and, given credentials, its device.

    ``key`` is the pickle key the operator believes is right. For foreign stores
    (mautrix, matrix-nio) it is optional and its text is tried first (``given``: the
    text of a key given the normal way), then ``candidates``, then the known defaults.
    ``account`` names the device in a PostgreSQL store. An olmstead SQLite store's files
    (with its -wal and -shm) and ``key_file`` are checked to be readable by their owner
    alone.
    ``trust`` (or a ``recovery_key``) adds the cross-signing checks: whether the account has an
    identity, whether the device is signed by it, and whether secret storage opens
    with the recovery key given.
    """
    kind = kind or store_kind(store)
    if kind == "olmstead":
        if key is None:
            raise ValueError("an olmstead store is diagnosed with the pickle key it should have")
        report = await _olmstead_store(store, key, account, list(candidates))
        if not is_postgres(store):
            report.findings.append(_file_modes(report, store, key_file))
    else:
        tries = [GivenKey(given)] if given else []
        report = await _foreign_store(store, kind, account, [*tries, *candidates])
    if report.device is not None and server is not None:
        report.findings.extend(
            await _server_findings(
                report.device, server, transport, trust or recovery_key is not None, recovery_key
            )
        )
    return report


# --- olmstead stores ---------------------------------------------------------------------------


async def _olmstead_store(
    store: str, key: PickleKey, account: str, candidates: list[str]
) -> Report:
    report = Report(store, "olmstead")
    lock, now = await _read_lease(store, account)
    report.findings.append(_lock_finding(lock, now))
    if report.findings[0].cause == "lock_held":
        return report
    try:
        seen = await _inspect(store, key, account)
    except WrongPickleKey as wrong:
        found = await _which_key_opens(store, account, candidates)
        report.opener = found[0] if found else None
        label = found[1] if found else None
        fix = (
            f"open it with {label}"
            if label
            else f"find the key with fingerprint {wrong.expected}: the bridge or bot config, "
            "its backups, its environment"
        )
        report.findings.append(
            Finding(
                "pickle key",
                "error",
                "wrong_pickle_key",
                f"the store was written with key {wrong.expected}; the key given is "
                f"{wrong.given}" + (f"; {label} opens it" if label else ""),
                fix
                + (
                    "; `olmstead repair` moves the store to the key you gave"
                    if label
                    else "; then `olmstead store rekey` can move it to the key you want"
                ),
            )
        )
        return report
    except StoreMigrationError as newer:
        report.findings.append(Finding("store", "error", "schema_newer", str(newer)))
        return report
    except StoreCorrupt as corrupt:
        report.findings.append(
            Finding("store", "error", "store_corrupt", corrupt.detail, "restore it from a backup")
        )
        return report
    except StoreError as other:
        report.findings.append(Finding("store", "error", "store_error", str(other)))
        return report
    report.findings.append(
        Finding("pickle key", "ok", "key_ok", f"opens with key {seen.fingerprint}")
    )
    default = None if key.is_raw else await _which_key_opens(store, account, [])
    if default is not None:  # the key given is itself one every copy ships
        report.findings.append(
            _legacy_key_finding(
                default[0], "`olmstead store rekey` re-encrypts it under a key of your own"
            )
        )
    schema = f"schema version {seen.schema_version}"
    if seen.schema_version < seen.latest_version:
        schema += f"; olmstead migrates it to {seen.latest_version} when it next opens it"
    report.findings.append(Finding("store", "ok", "store_ok", f"an olmstead store, {schema}"))
    record = seen.record
    if record is None:
        report.findings.append(
            Finding("account", "warning", "no_account", "the store holds no device")
        )
        return report
    report.device = DeviceState(
        record.user_id, record.device_id, record.account, record.shared, seen.drained_marker
    )
    pending = len(record.account.one_time_keys)
    if not record.shared:
        report.findings.append(
            Finding(
                "account",
                "warning",
                "keys_never_uploaded",
                f"device {record.device_id}: its device keys were never confirmed uploaded",
                "start the client: it checks the device ID first, then uploads",
            )
        )
    elif pending:
        report.findings.append(
            Finding(
                "account",
                "warning",
                "upload_pending",
                f"device {record.device_id}: {pending} one-time keys wait to be uploaded",
                "start the client: the very same keys go up",
            )
        )
    else:
        report.findings.append(
            Finding(
                "account",
                "ok",
                "account_ok",
                f"device {record.device_id} of {record.user_id}, keys uploaded",
            )
        )
    return report


def _file_modes(report: Report, store: str, key_file: str | os.PathLike[str] | None) -> Finding:
    """Whether users other than the owner can read the store's files or its key file."""
    paths = [str(p) for p in sqlite_files(store)] + ([os.fspath(key_file)] if key_file else [])
    modes = {}
    for path in paths:
        try:
            if open_to_others(path):
                modes[path] = oct(os.stat(path).st_mode & 0o777)[2:]
        except OSError:
            continue  # a -wal that vanished between the listing and the look
    if not modes:
        return Finding("files", "ok", "files_private", "only their owner can read the files")
    report.exposed = list(modes)
    listed = ", ".join(f"{path} ({mode})" for path, mode in modes.items())
    return Finding(
        "files",
        "warning",
        "files_readable",
        f"other users can read {listed}: a store holds room IDs, device lists and the sync "
        "token in the clear and its secrets under the pickle key; a key file is the key",
        f"`olmstead repair` makes them 0600 (or: chmod 600 {' '.join(modes)})",
    )


async def _read_lease(store: str, account: str) -> tuple[LockRow | None, float]:
    try:
        if is_postgres(store):
            from olmstead.store.postgres import PostgresStore

            return await PostgresStore.read_lease(store, account)
        return SqliteStore.read_lease(store), time.time()
    except StoreError:
        return None, 0.0  # the store check says what is wrong


async def _inspect(store: str, key: PickleKey, account: str) -> Inspection:
    if is_postgres(store):
        from olmstead.store.postgres import PostgresStore

        return await PostgresStore.inspect(store, key, account=account)
    return SqliteStore.inspect(store, key)


def _lock_finding(lock: LockRow | None, now: float) -> Finding:
    if lock is None or lock.expires_at == 0:
        return Finding("lock", "ok", "lock_free", "no process holds the store")
    if lock.expires_at > now:
        return Finding(
            "lock",
            "error",
            "lock_held",
            f"held by {lock.holder} since {_when(lock.acquired_at)}, renewed until "
            f"{_when(lock.expires_at)}",
            "another process drives this device: stop it before diagnosing or repairing",
        )
    return Finding(
        "lock",
        "warning",
        "lock_stale",
        f"last held by {lock.holder}, lease ran out at {_when(lock.expires_at)}: that process "
        "died without releasing it",
        "nothing is needed: the next process to open the store takes the lease over "
        "(`olmstead repair` releases it at once)",
    )


async def _which_key_opens(
    store: str, account: str, candidates: list[str]
) -> tuple[str, str] | None:
    """The candidate or known default that opens the store, and how to name it."""
    for n, text in enumerate([*candidates, *KNOWN_DEFAULT_KEYS]):
        try:
            await _inspect(store, PickleKey(text), account)
        except WrongPickleKey:
            continue
        except StoreError:
            return None
        label = f"candidate #{n + 1}" if n < len(candidates) else f"the known default {text!r}"
        return text, label
    return None


def _legacy_key_finding(default: str, fix: str) -> Finding:
    return Finding(
        "pickle key",
        "warning",
        "legacy_default_key",
        f"the store is encrypted with the known default key {default!r}, which every copy "
        "of the software ships: anyone with a copy of the file can read the device's keys",
        fix,
    )


# --- foreign stores ----------------------------------------------------------------------------


async def _foreign_store(store: str, kind: Kind, account: str, candidates: list[str]) -> Report:
    from olmstead.imports.mautrix import read_mautrix_postgres, read_mautrix_sqlite
    from olmstead.imports.nio import read_nio_sqlite

    report = Report(store, kind)
    user = None if account == "default" else account
    try:
        if kind == "mautrix" and is_postgres(store):
            foreign: ForeignStore = await read_mautrix_postgres(store, candidates, user)
        elif kind == "mautrix":
            foreign = read_mautrix_sqlite(store, candidates, user)
        else:
            foreign = read_nio_sqlite(store, candidates, user)
    except UnknownForeignKey as unknown:
        report.findings.append(
            Finding(
                "pickle key",
                "error",
                "wrong_pickle_key",
                (
                    f"neither the key given, nor {unknown.tried - 1} candidates, nor a known "
                    f"default opens the {kind} store's account"
                    if unknown.given
                    else f"no key given, and neither {unknown.tried} candidates nor a known "
                    f"default opens the {kind} store's account"
                ),
                "find the pickle key from the bridge or bot's config (or its backups) and "
                "give it ($OLMSTEAD_PICKLE_KEY, --key-file or the prompt; more to try in "
                "$OLMSTEAD_CANDIDATE_KEYS)",
            )
        )
        return report
    except StoreError as error:
        detail = error.detail if isinstance(error, StoreCorrupt) else str(error)
        report.findings.append(Finding("store", "error", "store_corrupt", detail))
        return report
    if foreign.key_used.startswith("the known default"):
        default = foreign.key_used.split("'")[1]
        report.findings.append(
            _legacy_key_finding(
                default,
                "`olmstead repair --into NEW.db` moves the device into an olmstead store under "
                "a key of your own",
            )
        )
    else:
        report.findings.append(
            Finding("pickle key", "ok", "key_ok", f"opens with {foreign.key_used}")
        )
    report.opener = foreign.key
    report.findings.append(
        Finding(
            "store",
            "ok",
            "store_ok",
            f"a {kind} store: {len(foreign.olm_sessions)} Olm sessions, "
            f"{len(foreign.inbound)} room keys, {foreign.skipped} unreadable entries",
        )
    )
    report.device = DeviceState(foreign.user_id, foreign.device_id, foreign.account, foreign.shared)
    report.findings.append(
        Finding(
            "account",
            "ok" if foreign.shared else "warning",
            "account_ok" if foreign.shared else "keys_never_uploaded",
            f"device {foreign.device_id} of {foreign.user_id}, keys "
            + ("uploaded" if foreign.shared else "never confirmed uploaded"),
        )
    )
    return report


# --- the device on the server ------------------------------------------------------------------


async def _server_findings(
    device: DeviceState,
    server: Credentials,
    transport: httpx.AsyncBaseTransport | None,
    trust: bool = False,
    recovery_key: str | None = None,
) -> list[Finding]:
    headers = {"Authorization": f"Bearer {server.access_token}"}
    async with httpx.AsyncClient(
        base_url=server.homeserver, headers=headers, timeout=30, transport=transport
    ) as http:
        try:
            findings = await _ask_server(http, device)
            if trust and any(f.cause == "device_ok" for f in findings):
                findings.extend(await _trust_findings(http, device, recovery_key))
            return findings
        except httpx.HTTPError as exc:
            return [
                Finding(
                    "server",
                    "error",
                    "server_unreachable",
                    f"{server.homeserver} gave no answer ({type(exc).__name__}: {exc})",
                    "check the homeserver URL and that it is up",
                )
            ]
        except _Unusable as answer:  # an odd answer says nothing about the device
            return [answer.finding]


class _Unusable(Exception):
    """The server answered something doctor cannot read: a finding, never a diagnosis."""

    def __init__(self, evidence: str) -> None:
        self.evidence = f"{evidence}: nothing can be concluded about the device"

    @property
    def finding(self) -> Finding:
        return Finding(
            "server",
            "error",
            "server_error",
            self.evidence,
            "try again later; if it persists, look at the homeserver's logs",
        )


def _object(response: httpx.Response, what: str) -> dict[str, Any]:
    """The JSON object of a success response, or ``_Unusable``."""
    try:
        body = response.json() if response.status_code == 200 else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _Unusable(f"{what} answered {response.status_code} {response.text[:200]!r}")
    return body


def _token_refused(response: httpx.Response) -> Finding | None:
    """A finding if the server refused the access token itself (401), else ``None``."""
    if response.status_code != 401:
        return None
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    if body.get("soft_logout") is True:
        return Finding(
            "server",
            "error",
            "token_expired",
            "the access token expired (a soft logout): the device and its keys are intact",
            "log in again with the same device ID (a password login naming the device "
            "keeps it); the store needs no repair",
        )
    return Finding(
        "server",
        "error",
        "token_invalid",
        f"the access token is not accepted ({body.get('errcode', 401)}): the device was "
        "logged out or deleted, or the token is not this device's",
        "log in as a new device; `olmstead repair` carries the room keys over",
    )


async def _ask_server(http: httpx.AsyncClient, device: DeviceState) -> list[Finding]:
    ours = device.account.ed25519_key.to_base64()
    whoami = await http.get(f"{CLIENT_V3}/account/whoami")
    refused = _token_refused(whoami)
    if refused is not None:
        return [refused]
    me = _object(whoami, "whoami")
    if (me.get("user_id"), me.get("device_id")) != (device.user_id, device.device_id):
        return [
            Finding(
                "server",
                "error",
                "token_for_other_device",
                f"the token belongs to {me.get('user_id')} {me.get('device_id')}, the "
                f"store to {device.user_id} {device.device_id}",
                "use the access token of the device this store holds",
            )
        ]
    query = _object(
        await http.post(
            f"{CLIENT_V3}/keys/query",
            json={"device_keys": {device.user_id: [device.device_id]}},
        ),
        "/keys/query",
    )
    if not isinstance(query.get("device_keys"), dict):
        raise _Unusable(f"/keys/query answered without a device_keys object: {str(query)[:200]}")
    server_key = _path(query, "device_keys", device.user_id, device.device_id, "keys")
    server_key = server_key.get(f"ed25519:{device.device_id}") if server_key else None
    findings: list[Finding] = []
    marker = await _marker(http, device, findings)
    if server_key is None:
        if not device.shared:
            return [Finding("device", "ok", "device_new", "the server holds no keys yet")]
        return [
            Finding(
                "device",
                "error",
                "device_keys_missing",
                "the server holds no identity keys for the device although it confirmed "
                "them once: they were deleted on the server",
                "log in as a new device (`olmstead repair` does, carrying the room keys over)",
            )
        ]
    if server_key != ours:
        return [_someone_else(device, str(server_key), ours, marker)]
    findings.insert(0, Finding("device", "ok", "device_ok", "the server holds our identity keys"))
    lost = key_state.keys_lost_to_rollback(marker, device.account, device.drained_marker)
    if lost and marker is not None:
        findings.append(
            Finding(
                "one-time keys",
                "error",
                "store_rolled_back",
                f"this identity published one-time keys up to #{marker.published_through} "
                f"(at {_when(marker.updated_at)}), but the store has issued only up to "
                f"#{marker.published_through - lost}: it was restored from an older copy. Up "
                f"to {lost} keys on the server have no private half here; a peer that claims "
                "one opens a session that cannot decrypt",
                "`olmstead repair` drains them and uploads fresh keys (the client also does "
                "when it starts)",
            )
        )
    findings.extend(await _key_counts(http))
    return findings


async def _trust_findings(
    http: httpx.AsyncClient, device: DeviceState, recovery_key: str | None
) -> list[Finding]:
    """Our cross-signing identity as the server publishes it (spec: "Cross-signing")."""
    ours = device.account.ed25519_key.to_base64()
    query = _object(
        await http.post(f"{CLIENT_V3}/keys/query", json={"device_keys": {device.user_id: []}}),
        "/keys/query",
    )
    identity = published_identity(query, device.user_id, device.device_id, ours)
    if identity.master_key is None:
        return [
            Finding(
                "cross-signing",
                "warning",
                "no_cross_signing",
                f"{device.user_id} has no cross-signing keys: clients that exclude insecure "
                "devices (MSC4153; Element's setting) withhold their room keys from this "
                "device (m.unverified) and refuse its messages",
                "`olmstead trust bootstrap` (or `olmstead repair --trust`), and keep the "
                "recovery key it prints",
            )
        ]
    findings = []
    if identity.device_signed:
        findings.append(
            Finding("cross-signing", "ok", "cross_signed", "the device is signed by its owner")
        )
    else:
        findings.append(
            Finding(
                "cross-signing",
                "warning",
                "device_not_cross_signed",
                f"the account has a master key ({identity.master_key}) but this device is not "
                "signed by its self-signing key: other users' clients treat it as insecure",
                "`olmstead trust recover` with the account's recovery key",
            )
        )
    if recovery_key is not None:
        findings.append(await _secret_storage_finding(http, device, query, recovery_key))
    return findings


async def _secret_storage_finding(
    http: httpx.AsyncClient, device: DeviceState, query: dict[str, Any], recovery_key: str
) -> Finding:
    """Whether secret storage opens with ``recovery_key`` and holds the published keys."""
    account_data: dict[str, Any] = {}

    async def read(event_type: str) -> None:
        answer = await http.get(account_data_path(device.user_id, event_type))
        if answer.status_code == 200:
            account_data[event_type] = _object(answer, event_type)

    await read(secret_storage.DEFAULT_KEY_TYPE)
    default = account_data.get(secret_storage.DEFAULT_KEY_TYPE, {})
    key_id = default.get("key") if isinstance(default, dict) else None
    if isinstance(key_id, str):
        await read(secret_storage.key_type(key_id))
        for name in SECRET_NAMES.values():
            await read(name)
    checker = CrossSigningMachine(device.user_id, device.device_id, None, Backoff(1, 1))
    try:  # the recovery a new device would do, with nothing stored or sent
        key = secret_storage.decode_recovery_key(recovery_key)
        checker.recover(query, account_data, key, None, {}, lambda obj: obj)
    except TrustError as problem:
        return Finding(
            "secret storage",
            "error",
            "secret_storage_unreadable",
            f"secret storage does not give this account's keys with the recovery key given: "
            f"{type(problem).__name__}: {problem}",
            "find the recovery key shown when cross-signing was set up; without it, reset "
            "cross-signing from a client that holds the keys",
        )
    return Finding(
        "secret storage", "ok", "secret_storage_ok", "the recovery key opens secret storage"
    )


def _path(body: Any, *keys: str) -> dict[str, Any] | None:
    """``body[k1][k2]…`` if every step is an object, else ``None``."""
    for key in keys:
        body = body.get(key) if isinstance(body, dict) else None
    return body if isinstance(body, dict) else None


def _someone_else(
    device: DeviceState, server_key: str, ours: str, marker: key_state.KeyStateMarker | None
) -> Finding:
    by = ""
    if marker is not None and marker.ed25519 == server_key:
        by = f"; they were uploaded by an olmstead store, last at {_when(marker.updated_at)}"
    if device.shared:
        return Finding(
            "device",
            "error",
            "device_taken_over",
            f"the server confirmed this store's identity key {ours} for {device.device_id} "
            f"once, and now holds {server_key}{by}: another client uploaded its own keys "
            "over this device (two clients on one access token, or a login that reused the "
            "device ID). Peers now reject the device",
            "stop the other client; then log in as a new device (`olmstead repair` does, "
            "carrying the room keys over, and deletes the old device if you let it)",
        )
    return Finding(
        "device",
        "error",
        "device_id_in_use",
        f"the server's identity key for {device.device_id} is {server_key}, this new "
        f"store's is {ours}{by}: the device ID belongs to another identity — a lost store "
        "replaced by this one, a second client on the same access token, or a login that "
        "reused the device ID. olmstead uploaded nothing over it",
        "log in as a new device (`olmstead repair` does, carrying the room keys over)",
    )


async def _marker(
    http: httpx.AsyncClient, device: DeviceState, findings: list[Finding]
) -> key_state.KeyStateMarker | None:
    path = account_data_path(device.user_id, key_state.marker_type(device.device_id))
    answer = await http.get(path)
    if answer.status_code == 404:
        return None  # never written: keys from before markers, or from another library
    if answer.status_code == 200:
        try:
            return key_state.read_marker(answer.json())
        except ValueError:
            pass
    findings.append(
        Finding(
            "one-time keys",
            "warning",
            "marker_unreadable",
            f"the key-state marker could not be read ({answer.status_code}): whether the "
            "store was rolled back is not known",
            "run doctor again later",
        )
    )
    return None


async def _key_counts(http: httpx.AsyncClient) -> list[Finding]:
    answer = await http.get(
        f"{CLIENT_V3}/sync",
        params={"timeout": "0", "set_presence": "offline", "filter": _counts_only_filter()},
    )
    try:
        sync = _object(answer, "/sync")
    except _Unusable as unusable:
        return [Finding("one-time keys", "warning", "server_error", unusable.evidence)]
    counts = sync.get("device_one_time_keys_count")
    count = counts.get("signed_curve25519", 0) if isinstance(counts, dict) else 0
    findings = []
    if not isinstance(count, int) or count <= 0:
        findings.append(
            Finding(
                "one-time keys",
                "warning",
                "no_one_time_keys",
                "the server holds no one-time keys for the device: new sessions get the "
                "fallback key or nothing",
                "start the client: it uploads a fresh set",
            )
        )
    else:
        findings.append(
            Finding("one-time keys", "ok", "one_time_keys_ok", f"the server holds {count}")
        )
    fallback = sync.get(
        "device_unused_fallback_key_types",
        sync.get("org.matrix.msc2732.device_unused_fallback_key_types"),
    )
    if isinstance(fallback, list) and "signed_curve25519" not in fallback:
        findings.append(
            Finding(
                "fallback key",
                "warning",
                "fallback_key_missing",
                "the server holds no unused fallback key: once the one-time keys run out, "
                "peers cannot start sessions with the device",
                "start the client: it uploads a new fallback key",
            )
        )
    elif isinstance(fallback, list):
        findings.append(Finding("fallback key", "ok", "fallback_key_ok", "an unused one is there"))
    return findings


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
