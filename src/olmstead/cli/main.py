"""The ``olmstead`` command: the demo, and the store tools an operator needs."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from olmstead.cli.stores import (
    existing,
    foreign_key_text,
    key_from_text,
    open_device,
    pickle_key,
)
from olmstead.errors import OlmsteadError
from olmstead.store import PickleKey
from olmstead.store.files import write_private
from olmstead.store.named import is_postgres, open_store

__all__ = ["main"]

T = TypeVar("T")

STORE = click.option(
    "--store",
    required=True,
    callback=lambda _ctx, _param, value: existing(value),
    help="An existing SQLite store file, or a postgresql:// DSN.",
)
ACCOUNT = click.option(
    "--account", default="default", show_default=True, help="The device's account in PostgreSQL."
)
KEY_FILE = click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A pickle key file (32 raw bytes in base64, or a key string); otherwise "
    "$OLMSTEAD_PICKLE_KEY, otherwise a prompt.",
)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Show olmstead's log as well.")
def main(verbose: bool) -> None:
    """olmstead: Matrix end-to-end encryption whose keys never drift silently."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
    )


@main.command()
def demo() -> None:
    """Run a bot against a throwaway local Synapse, then break its keys three ways."""
    from olmstead.demo import run_demo

    run_demo(click.echo)


KIND = click.option(
    "--kind",
    type=click.Choice(["auto", "olmstead", "mautrix", "matrix-nio"]),
    default="auto",
    show_default=True,
    help="Which library wrote the store (auto: by its tables; a DSN is olmstead's).",
)
HOMESERVER = click.option(
    "--homeserver",
    help="Also check the device on this homeserver; the access token comes from "
    "$OLMSTEAD_ACCESS_TOKEN or a prompt.",
)


@dataclass
class _Inputs:
    kind: Any
    #: the key for an olmstead store (for a foreign one: the key given, if any)
    key: PickleKey | None
    credentials: Any
    candidates: list[str]
    #: a foreign store's key as given, as text (tried on it first)
    given: str | None = None


def _diagnosis_inputs(
    store: str, kind: str, key_file: Path | None, homeserver: str | None, confirm: bool = False
) -> _Inputs:
    """The store's kind, the key given, credentials and candidates. The key is asked for
    every kind of store: a foreign store's is tried first, before candidates and defaults."""
    import os

    from olmstead.doctor import Credentials, store_kind

    found = store_kind(store) if kind == "auto" else kind
    given: str | None = None
    if found == "olmstead":
        key: PickleKey | None = pickle_key("OLMSTEAD_PICKLE_KEY", key_file, "Pickle key", confirm)
    else:
        given, from_file = foreign_key_text("OLMSTEAD_PICKLE_KEY", key_file, "Pickle key", confirm)
        key = key_from_text(given, from_file) if given is not None else None
    credentials = None
    if homeserver is not None:
        token = os.environ.get("OLMSTEAD_ACCESS_TOKEN") or click.prompt(
            "Access token", hide_input=True
        )
        credentials = Credentials(homeserver, token)
    candidates = [k for k in os.environ.get("OLMSTEAD_CANDIDATE_KEYS", "").splitlines() if k]
    return _Inputs(found, key, credentials, candidates, given)


TRUST = click.option(
    "--trust",
    is_flag=True,
    help="Check cross-signing too: whether the account has an identity and the device is "
    "signed by it (needs --homeserver).",
)
CHECK_RECOVERY_KEY = click.option(
    "--check-recovery-key",
    is_flag=True,
    help="Check that secret storage opens with the recovery key ($OLMSTEAD_RECOVERY_KEY or a "
    "prompt); implies --trust.",
)


def _diagnosis_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options doctor and repair share: which store, which key, which server."""
    for option in reversed((STORE, ACCOUNT, KIND, KEY_FILE, HOMESERVER, TRUST, CHECK_RECOVERY_KEY)):
        command = option(command)
    return command


def _recovery_key() -> str:
    import os

    value = os.environ.get("OLMSTEAD_RECOVERY_KEY")
    return value if value is not None else click.prompt("Recovery key", hide_input=True)


@main.command()
@_diagnosis_options
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(
    store: str,
    account: str,
    kind: str,
    key_file: Path | None,
    homeserver: str | None,
    trust: bool,
    check_recovery_key: bool,
    as_json: bool,
) -> None:
    """Say what is wrong with a device's keys, how we know, and what to do.

    Reads only: the store (olmstead's, mautrix's or matrix-nio's) and, with
    --homeserver, the device on the server. Exit code 0: all well; 1: warnings;
    2: errors. Candidate pickle keys to try when the given one is wrong come from
    $OLMSTEAD_CANDIDATE_KEYS, one per line.
    """
    from olmstead.doctor import diagnose

    given = _diagnosis_inputs(store, kind, key_file, homeserver)
    recovery_key = _recovery_key() if check_recovery_key else None
    report = _run(
        lambda: diagnose(
            store,
            given.key,
            account=account,
            kind=given.kind,
            candidates=given.candidates,
            server=given.credentials,
            given=given.given,
            key_file=key_file,
            trust=trust,
            recovery_key=recovery_key,
        )
    )
    click.echo(report.to_json() if as_json else report.to_text())
    raise SystemExit(report.exit_code)


@main.command()
@_diagnosis_options
@click.option("--yes", is_flag=True, help="Do every repair without asking.")
@click.option(
    "--into",
    help="Where a moved device goes: a new SQLite path (default: in place, the old store "
    "kept beside it), or the new device's account in a PostgreSQL store.",
)
@click.option(
    "--keep-old-device",
    is_flag=True,
    help="After a move, leave the old device on the server instead of deleting it.",
)
@click.option(
    "--session-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where a new login's session is written (mode 0600); default: beside the store.",
)
def repair(
    store: str,
    account: str,
    kind: str,
    key_file: Path | None,
    homeserver: str | None,
    trust: bool,
    check_recovery_key: bool,
    yes: bool,
    into: str | None,
    keep_old_device: bool,
    session_file: Path | None,
) -> None:
    """Diagnose, then do the safe fixes, each confirmed unless --yes.

    Releases a dead process's lease; re-encrypts a store that opens with a
    candidate or known default key under the key you give; drains stale one-time
    keys and uploads what is missing; moves a device whose ID another identity took
    to a new device (the password from $OLMSTEAD_PASSWORD or a prompt), carrying
    the room keys over; moves a mautrix or matrix-nio device into a new olmstead
    store (--into); with --trust, sets up cross-signing for an account that has
    none (printing the recovery key) or recovers it for an unsigned device (the
    recovery key from $OLMSTEAD_RECOVERY_KEY or a prompt). Ends with a second
    diagnosis; its exit code is the command's.
    """
    import os

    from olmstead.doctor import diagnose
    from olmstead.repair import RepairOptions, plan_repairs

    # the key may become the store's new one (a rekey, a move): typed twice at a prompt
    given = _diagnosis_inputs(store, kind, key_file, homeserver, confirm=True)
    found, key, credentials, candidates = given.kind, given.key, given.credentials, given.candidates
    if found != "olmstead" and into is not None and key is None:
        key = pickle_key("OLMSTEAD_PICKLE_KEY", key_file, "Pickle key for the new store", True)

    def password() -> str:
        value = os.environ.get("OLMSTEAD_PASSWORD")
        return value if value is not None else click.prompt("Account password", hide_input=True)

    recovery_key = _recovery_key() if check_recovery_key else None
    trust = trust or check_recovery_key
    report = _run(
        lambda: diagnose(
            store,
            key,
            account=account,
            kind=found,
            candidates=candidates,
            server=credentials,
            given=given.given,
            key_file=key_file,
            trust=trust,
            recovery_key=recovery_key,
        )
    )
    click.echo(report.to_text())
    options = RepairOptions(
        store,
        key,
        account,
        credentials,
        password,
        into,
        not keep_old_device,
        session_file,
        _recovery_key if trust else None,
    )
    repairs = plan_repairs(report, options)
    if not repairs:
        click.echo(
            "\nNothing olmstead can repair by itself"
            + (": all is well." if report.exit_code == 0 else "; follow the fixes above.")
        )
        raise SystemExit(report.exit_code)
    where, server, moved_account = store, credentials, account
    for planned in repairs:
        click.echo(f"\nrepair ({planned.cause}): {planned.title}")
        if not yes and not click.confirm("Do it?", default=True):
            click.echo("  skipped")
            continue
        outcome = _run(planned.run)
        click.echo(f"  done: {outcome.text}")
        where, server = outcome.store or where, outcome.server or server
        moved_account = outcome.account or moved_account
    click.echo("\nAfter repair:")
    after = _run(
        lambda: diagnose(
            where,
            key,
            account=moved_account,
            candidates=candidates,
            server=server,
            given=given.given,
            trust=trust,
            recovery_key=recovery_key,
        )
    )
    click.echo(after.to_text())
    raise SystemExit(after.exit_code)


@main.group()
def store() -> None:
    """Work on a crypto store."""


@store.command()
@STORE
@ACCOUNT
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def stats(store: str, account: str, as_json: bool) -> None:
    """Rows and bytes per table of a store (read-only; no pickle key needed)."""
    from olmstead.store.stats import postgres_table_stats, sqlite_table_stats

    if is_postgres(store):
        found = _run(lambda: postgres_table_stats(store, account))
    else:
        found = sqlite_table_stats(store)
    if as_json:
        click.echo(json.dumps([asdict(t) for t in found], indent=2))
        return
    width = max([len(t.table) for t in found] + [5])
    click.echo(f"{'table':<{width}}  {'rows':>12}  {'bytes':>14}")
    for t in found:
        click.echo(f"{t.table:<{width}}  {t.rows:>12,}  {t.bytes:>14,}")
    click.echo(
        f"{'total':<{width}}  {sum(t.rows for t in found):>12,}  {sum(t.bytes for t in found):>14,}"
    )


@store.command()
@STORE
@ACCOUNT
@KEY_FILE
@click.option(
    "--new-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The new raw key file; otherwise $OLMSTEAD_NEW_PICKLE_KEY, otherwise a prompt.",
)
def rekey(store: str, account: str, key_file: Path | None, new_key_file: Path | None) -> None:
    """Re-encrypt every secret of a store under a new pickle key, in one transaction."""
    old = pickle_key("OLMSTEAD_PICKLE_KEY", key_file, "Current pickle key")
    new = pickle_key("OLMSTEAD_NEW_PICKLE_KEY", new_key_file, "New pickle key")

    async def run() -> None:
        opened = await open_store(store, account, old)
        try:
            total = sum((await opened.count_secrets()).values())
            click.echo(f"{opened.name}: {total} secrets under key {opened.fingerprint}")
            with click.progressbar(length=total, label="Re-encrypting") as bar:
                fingerprint = await opened.rekey(new, progress=bar.update)
            click.echo(f"Done: the store now opens with key {fingerprint} only.")
        finally:
            await opened.close()

    _run(run)


@main.group()
def keys() -> None:
    """Room keys in and out of a store, in the key export file format Element uses."""


@keys.command("export")
@STORE
@ACCOUNT
@KEY_FILE
@click.argument("out", type=click.Path(dir_okay=False, writable=True, path_type=Path))
def export_keys(store: str, account: str, key_file: Path | None, out: Path) -> None:
    """Write every room key of the store to OUT, encrypted with a passphrase."""
    key = pickle_key("OLMSTEAD_PICKLE_KEY", key_file, "Pickle key")
    passphrase = _passphrase(confirm=True)

    async def run() -> tuple[str, int]:
        async with open_device(store, account, key) as (opened, machine):
            total = (await opened.count_secrets())["inbound"]
            with click.progressbar(length=total, label="Exporting room keys") as bar:
                return await machine.export_room_keys(passphrase, progress=bar.update), total

    armoured, total = _run(run)
    write_private(out, armoured.encode())  # 0600 from the start, whole or not at all
    click.echo(f"Exported {total} room keys to {out}.")


@keys.command("import")
@STORE
@ACCOUNT
@KEY_FILE
@click.argument("infile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def import_keys(store: str, account: str, key_file: Path | None, infile: Path) -> None:
    """Add the room keys in INFILE to the store (better copies of known ones only)."""
    from olmstead.key_export import read_key_file

    key = pickle_key("OLMSTEAD_PICKLE_KEY", key_file, "Pickle key")
    # bytes, not read_text(): no locale decoding, and a stray non-UTF-8 byte in a note
    # outside the armour does not stop the import (Element's TextDecoder replaces it too)
    armoured = infile.read_bytes().decode("utf-8", errors="replace")
    try:
        records, skipped = read_key_file(armoured, _passphrase(confirm=False))
    except OlmsteadError as error:
        raise click.ClickException(f"{type(error).__name__}: {error}") from error

    async def run() -> int:
        async with open_device(store, account, key) as (_opened, machine):
            with click.progressbar(length=len(records), label="Importing room keys") as bar:
                return await machine.add_room_keys(records, progress=bar.update)

    added = _run(run)
    click.echo(f"Imported {added} room keys; skipped {skipped} unusable entries.")


@main.command("import")
@click.argument("kind", type=click.Choice(["mautrix", "matrix-nio"]))
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--into",
    "target",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The olmstead SQLite store to create (it must not exist yet).",
)
@click.option("--user-id", help="Whose device, when the source holds several.")
@KEY_FILE
def import_store(
    kind: str, source: str, target: Path, user_id: str | None, key_file: Path | None
) -> None:
    """Move the device in another library's SQLite store to a new olmstead store.

    The pickle key given (--key-file, $OLMSTEAD_PICKLE_KEY or a prompt) is tried on
    SOURCE first and becomes the new store's key; then candidates from
    $OLMSTEAD_CANDIDATE_KEYS, one per line, and the known defaults (mautrix's, nio's)
    are tried. Left empty at the prompt, the new store's key is asked for after.
    SOURCE is only read.
    """
    import os

    from olmstead.imports.foreign import import_into
    from olmstead.imports.mautrix import read_mautrix_sqlite
    from olmstead.imports.nio import read_nio_sqlite
    from olmstead.store import SqliteStore

    if target.exists():
        raise click.UsageError(f"{target} exists: import into a new store")
    from olmstead.imports.foreign import GivenKey

    given, from_file = foreign_key_text("OLMSTEAD_PICKLE_KEY", key_file, "Pickle key", True)
    candidates = [k for k in os.environ.get("OLMSTEAD_CANDIDATE_KEYS", "").splitlines() if k]
    if given is not None:
        candidates.insert(0, GivenKey(given))
    reader = read_mautrix_sqlite if kind == "mautrix" else read_nio_sqlite
    try:
        foreign = reader(source, candidates, user_id)
    except OlmsteadError as error:
        raise click.ClickException(f"{type(error).__name__}: {error}") from error
    click.echo(f"{foreign.source} opened with {foreign.key_used}.")
    key = (
        key_from_text(given, from_file)
        if given is not None
        else pickle_key("OLMSTEAD_PICKLE_KEY", key_file, "Pickle key for the new store", True)
    )

    async def run() -> str:
        store = await SqliteStore.open(target, key)
        try:
            await import_into(foreign, store)
            return store.fingerprint
        finally:
            await store.close()

    fingerprint = _run(run)
    click.echo(
        f"Imported device {foreign.device_id} of {foreign.user_id}: "
        f"{len(foreign.olm_sessions)} Olm sessions, {len(foreign.inbound)} room keys, "
        f"{foreign.skipped} unreadable entries skipped. New store key: {fingerprint}."
    )


def _passphrase(confirm: bool) -> str:
    import os

    value = os.environ.get("OLMSTEAD_EXPORT_PASSPHRASE")
    if value is None:
        value = click.prompt("Key file passphrase", hide_input=True, confirmation_prompt=confirm)
    return value


def _run(coroutine: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a command; olmstead's errors become a message and exit code 1, not a traceback."""
    try:
        return asyncio.run(coroutine())
    except OlmsteadError as error:
        raise click.ClickException(f"{type(error).__name__}: {error}") from error
    except (OSError, sqlite3.Error) as error:  # the disk or the database, not olmstead
        raise click.ClickException(f"{type(error).__name__}: {error}") from error


# --- trust: our cross-signing identity --------------------------------------------------------

TRUST_HOMESERVER = click.option(
    "--homeserver",
    required=True,
    help="The device's homeserver; the access token comes from $OLMSTEAD_ACCESS_TOKEN or a prompt.",
)


@main.group()
def trust() -> None:
    """Our cross-signing identity: status, bootstrap, recover (spec: "Cross-signing")."""


async def _trust_client(store: str, account: str, key: PickleKey, homeserver: str) -> Any:
    import os

    from olmstead.client.client import Client, CrossSigningSettings, Session

    opened = await open_store(store, account, key)
    record = await opened.load_account()
    if record is None:
        await opened.close()
        raise click.ClickException(f"{opened.name} holds no device account yet")
    token = os.environ.get("OLMSTEAD_ACCESS_TOKEN") or click.prompt("Access token", hide_input=True)
    settings = CrossSigningSettings(password=os.environ.get("OLMSTEAD_PASSWORD"))
    client = Client(homeserver, store=opened, cross_signing=settings)
    client.restore(Session(homeserver, record.user_id, record.device_id, token))
    await client.init_crypto()
    return client


async def _close_trust_client(client: Any) -> None:
    await client.close()
    await client.store.close()


@trust.command("status")
@STORE
@ACCOUNT
@KEY_FILE
@TRUST_HOMESERVER
def trust_status(store: str, account: str, key_file: Path | None, homeserver: str) -> None:
    """Whether the device is cross-signed, as the server publishes it and as the store holds."""
    from olmstead.cross_signing import published_identity

    key = pickle_key("OLMSTEAD_PICKLE_KEY", key_file, "Pickle key")

    async def run() -> tuple[Any, Any, str]:
        client = await _trust_client(store, account, key, homeserver)
        try:
            machine = client.machine
            published = published_identity(
                await client.own_keys(),
                machine.user_id,
                machine.device_id,
                machine.identity_keys["ed25519"],
            )
            return published, machine.cross_signing_status, machine.device_id
        finally:
            await _close_trust_client(client)

    published, status, device_id = _run(run)
    click.echo(f"master key on the server: {published.master_key or 'none'}")
    click.echo(f"self-signing key signed by it: {published.self_signing_valid}")
    click.echo(f"user-signing key signed by it: {published.user_signing_valid}")
    click.echo(f"device {device_id} signed by the self-signing key: {published.device_signed}")
    click.echo(f"private keys in this store: {status.has_keys} (published: {status.published})")
    if published.master_key is None:
        click.echo(
            "no cross-signing: clients that exclude insecure devices (MSC4153) will withhold "
            "their room keys from this device; run `olmstead trust bootstrap`"
        )
    elif not published.device_signed:
        click.echo("this device is not cross-signed: run `olmstead trust recover`")


@trust.command("bootstrap")
@STORE
@ACCOUNT
@KEY_FILE
@TRUST_HOMESERVER
@click.option(
    "--passphrase",
    "use_passphrase",
    is_flag=True,
    help="Key secret storage by a passphrase too ($OLMSTEAD_SECRET_STORAGE_PASSPHRASE or a "
    "prompt).",
)
def trust_bootstrap(
    store: str, account: str, key_file: Path | None, homeserver: str, use_passphrase: bool
) -> None:
    """Create cross-signing keys and secret storage; prints the recovery key once.

    A server that asks for user-interactive auth gets the password from
    $OLMSTEAD_PASSWORD.
    """
    import os

    key = pickle_key("OLMSTEAD_PICKLE_KEY", key_file, "Pickle key")
    passphrase = None
    if use_passphrase:
        passphrase = os.environ.get("OLMSTEAD_SECRET_STORAGE_PASSPHRASE") or click.prompt(
            "Secret storage passphrase", hide_input=True, confirmation_prompt=True
        )

    async def run() -> str:
        client = await _trust_client(store, account, key, homeserver)
        try:
            recovery_key: str = await client.bootstrap_cross_signing(passphrase=passphrase)
            return recovery_key
        finally:
            await _close_trust_client(client)

    recovery_key = _run(run)
    click.echo("cross-signing is set up; keep this recovery key somewhere safe:")
    click.echo(recovery_key)


@trust.command("recover")
@STORE
@ACCOUNT
@KEY_FILE
@TRUST_HOMESERVER
@click.option(
    "--recovery-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file holding the recovery key; otherwise $OLMSTEAD_RECOVERY_KEY, otherwise a prompt.",
)
@click.option(
    "--passphrase",
    "use_passphrase",
    is_flag=True,
    help="Use the secret storage passphrase ($OLMSTEAD_SECRET_STORAGE_PASSPHRASE or a prompt).",
)
def trust_recover(
    store: str,
    account: str,
    key_file: Path | None,
    homeserver: str,
    recovery_key_file: Path | None,
    use_passphrase: bool,
) -> None:
    """Take the cross-signing keys from secret storage and sign this device with them."""
    import os

    key = pickle_key("OLMSTEAD_PICKLE_KEY", key_file, "Pickle key")
    recovery_key = passphrase = None
    if use_passphrase:
        passphrase = os.environ.get("OLMSTEAD_SECRET_STORAGE_PASSPHRASE") or click.prompt(
            "Secret storage passphrase", hide_input=True
        )
    elif recovery_key_file is not None:
        recovery_key = recovery_key_file.read_text().strip()
    else:
        recovery_key = os.environ.get("OLMSTEAD_RECOVERY_KEY") or click.prompt(
            "Recovery key", hide_input=True
        )

    async def run() -> None:
        client = await _trust_client(store, account, key, homeserver)
        try:
            await client.recover(recovery_key=recovery_key, passphrase=passphrase)
        finally:
            await _close_trust_client(client)

    _run(run)
    click.echo("recovered: this device is now signed by the account's self-signing key")
