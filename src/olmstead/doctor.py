"""``olmstead doctor``: every key problem of a device named, with its evidence and its fix.

Checks are read-only: the store is inspected without taking its lease (a process
holding it is neither waited for nor disturbed, a stale lease stays as found), and
the server is asked only questions that change nothing there (``whoami``,
``/keys/query``, a ``/keys/upload`` without keys to read the counts). Each check
gives a ``Finding``: a verdict (ok, warning, error), what was seen, what to do.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import httpx

from olmstead.errors import StoreCorrupt, StoreError, WrongPickleKey
from olmstead.imports.foreign import KNOWN_DEFAULT_KEYS
from olmstead.store.base import AccountRecord
from olmstead.store.pickle_key import PickleKey
from olmstead.store.sqlite import SqliteStore

__all__ = ["Credentials", "Finding", "Report", "diagnose_sqlite"]

Verdict = Literal["ok", "warning", "error"]
_SEVERITY = {"ok": 0, "warning": 1, "error": 2}


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: Verdict
    #: a short name for the cause, stable for tools (``wrong_pickle_key``, ``lock_stale``…)
    cause: str
    evidence: str
    fix: str = ""


@dataclass
class Report:
    findings: list[Finding]

    @property
    def exit_code(self) -> int:
        return max((_SEVERITY[f.verdict] for f in self.findings), default=0)

    def causes(self) -> set[str]:
        return {f.cause for f in self.findings if f.verdict != "ok"}

    def to_json(self) -> str:
        return json.dumps(
            {"exit_code": self.exit_code, "findings": [asdict(f) for f in self.findings]},
            indent=2,
        )

    def to_text(self) -> str:
        marks = {"ok": "ok  ", "warning": "WARN", "error": "FAIL"}
        lines = []
        for f in self.findings:
            lines.append(f"[{marks[f.verdict]}] {f.check}: {f.evidence}")
            if f.fix:
                lines.append(f"       fix: {f.fix}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Credentials:
    homeserver: str
    access_token: str


async def diagnose_sqlite(
    path: Path,
    key: PickleKey,
    *,
    candidates: Iterable[str] = (),
    server: Credentials | None = None,
) -> Report:
    """Diagnose the SQLite store at ``path`` and, given credentials, its device on the server."""
    findings = [_lock_finding(path)]
    if findings[0].cause == "lock_held":
        return Report(findings)
    record, store_findings = await _open_and_read(path, key, candidates)
    findings.extend(store_findings)
    if record is not None and server is not None:
        findings.extend(await _server_findings(record, server))
    return Report(findings)


# --- the lock ------------------------------------------------------------------------------


def _lock_finding(path: Path) -> Finding:
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            row = conn.execute(
                "SELECT holder, acquired_at, expires_at FROM lease_lock WHERE name = 'device'"
            ).fetchone()
    except sqlite3.Error:
        return Finding("lock", "ok", "lock_unknown", "no lease could be read (see the store check)")
    now = time.time()
    if row is None or row[2] == 0:
        return Finding("lock", "ok", "lock_free", "no process holds the store")
    holder, since, expires = row
    if expires > now:
        return Finding(
            "lock",
            "error",
            "lock_held",
            f"held by {holder} since {_when(since)}, renewed until {_when(expires)}",
            "another process drives this device: stop it before diagnosing or repairing",
        )
    return Finding(
        "lock",
        "warning",
        "lock_stale",
        f"last held by {holder}, lease ran out at {_when(expires)}: that process died "
        "without releasing it",
        "nothing to do: the next process to open the store takes the lease over "
        "(`olmstead repair` releases it at once)",
    )


# --- the store and its key -------------------------------------------------------------------


async def _open_and_read(
    path: Path, key: PickleKey, candidates: Iterable[str]
) -> tuple[AccountRecord | None, list[Finding]]:
    findings: list[Finding] = []
    try:
        derived, record = SqliteStore.inspect(path, key)
    except WrongPickleKey as wrong:
        opener = _which_key_opens(path, candidates)
        fix = (
            f"open it with {opener}"
            if opener
            else "find the key with fingerprint "
            f"{wrong.expected}: the bridge or bot config, its backups, its environment"
        )
        findings.append(
            Finding(
                "pickle key",
                "error",
                "wrong_pickle_key",
                f"the store was written with key {wrong.expected}; the key given is "
                f"{wrong.given}" + (f"; {opener} opens it" if opener else ""),
                fix + "; then `olmstead store rekey` can move it to the key you want",
            )
        )
        return None, findings
    except StoreCorrupt as corrupt:
        findings.append(
            Finding("store", "error", "store_corrupt", corrupt.detail, "restore it from a backup")
        )
        return None, findings
    except StoreError as other:
        findings.append(Finding("store", "error", "store_error", str(other)))
        return None, findings
    findings.append(Finding("pickle key", "ok", "key_ok", f"opens with key {derived.fingerprint}"))
    findings.append(Finding("store", "ok", "store_ok", "readable, an olmstead store"))
    if record is None:
        findings.append(Finding("account", "warning", "no_account", "the store holds no device"))
        return None, findings
    pending = len(record.account.one_time_keys)
    if not record.shared:
        findings.append(
            Finding(
                "account",
                "warning",
                "keys_never_uploaded",
                f"device {record.device_id}: its device keys were never confirmed uploaded",
                "start the client: it checks the device ID first, then uploads",
            )
        )
    elif pending:
        findings.append(
            Finding(
                "account",
                "warning",
                "upload_pending",
                f"device {record.device_id}: {pending} one-time keys wait to be uploaded",
                "start the client: the very same keys go up",
            )
        )
    else:
        findings.append(
            Finding(
                "account",
                "ok",
                "account_ok",
                f"device {record.device_id} of {record.user_id}, keys uploaded",
            )
        )
    return record, findings


def _which_key_opens(path: Path, candidates: Iterable[str]) -> str | None:
    given = list(candidates)
    for n, text in enumerate([*given, *KNOWN_DEFAULT_KEYS]):
        try:
            SqliteStore.inspect(path, PickleKey(text))
        except WrongPickleKey:
            continue
        except StoreError:
            return None
        return f"candidate #{n + 1}" if n < len(given) else f"the known default {text!r}"
    return None


# --- the device on the server ------------------------------------------------------------------


async def _server_findings(record: AccountRecord, server: Credentials) -> list[Finding]:
    headers = {"Authorization": f"Bearer {server.access_token}"}
    ours = record.account.ed25519_key.to_base64()
    findings = []
    async with httpx.AsyncClient(base_url=server.homeserver, headers=headers, timeout=30) as http:
        whoami = await http.get("/_matrix/client/v3/account/whoami")
        if whoami.status_code != 200:
            return [
                Finding(
                    "server",
                    "error",
                    "token_invalid",
                    f"the access token is not accepted ({whoami.status_code})",
                    "log in again; the device's keys are in the store",
                )
            ]
        me = whoami.json()
        if (me.get("user_id"), me.get("device_id")) != (record.user_id, record.device_id):
            findings.append(
                Finding(
                    "server",
                    "error",
                    "token_for_other_device",
                    f"the token belongs to {me.get('user_id')} {me.get('device_id')}, the "
                    f"store to {record.user_id} {record.device_id}",
                    "use the access token of the device this store holds",
                )
            )
            return findings
        query = await http.post(
            "/_matrix/client/v3/keys/query",
            json={"device_keys": {record.user_id: [record.device_id]}},
        )
        entry = query.json().get("device_keys", {}).get(record.user_id, {}).get(record.device_id)
        keys = entry.get("keys", {}) if isinstance(entry, dict) else {}
        server_key = keys.get(f"ed25519:{record.device_id}")
        if server_key is None:
            verdict: Verdict = "error" if record.shared else "ok"
            findings.append(
                Finding(
                    "device",
                    verdict,
                    "device_keys_missing" if record.shared else "device_new",
                    "the server holds no identity keys for the device"
                    + (
                        " although they were uploaded once: deleted, or logged out"
                        if record.shared
                        else ""
                    ),
                    "log in as a new device" if record.shared else "",
                )
            )
            return findings
        if server_key != ours:
            findings.append(
                Finding(
                    "device",
                    "error",
                    "device_id_in_use",
                    f"the server's identity key for {record.device_id} is {server_key}, the "
                    f"store's is {ours}: another client uploaded over this device ID, or the "
                    "store was lost and replaced",
                    "log in as a new device (`olmstead repair` can move there and carry the "
                    "room keys over)",
                )
            )
            return findings
        findings.append(Finding("device", "ok", "device_ok", "the server holds our identity keys"))
        counts = await http.post("/_matrix/client/v3/keys/upload", json={})
        count = counts.json().get("one_time_key_counts", {}).get("signed_curve25519", 0)
        if count == 0:
            findings.append(
                Finding(
                    "one-time keys",
                    "warning",
                    "no_one_time_keys",
                    "the server holds no one-time keys for the device",
                    "start the client: it uploads a fresh set",
                )
            )
        else:
            findings.append(
                Finding("one-time keys", "ok", "one_time_keys_ok", f"the server holds {count}")
            )
    return findings


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
