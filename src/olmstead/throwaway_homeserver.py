"""A throwaway Synapse on a free loopback port: for the tests and ``olmstead demo`` only.

``ThrowawayHomeserver`` is a disposable room to try Matrix in: a real Synapse
(the ``homeserver`` extra, PyPI ``matrix-synapse``) that lives in a temp
directory (config, signing key, SQLite database, log) and is gone afterwards.
Its one HTTP listener binds 127.0.0.1 only, with no federation listener and an
empty federation whitelist. Registration is open and needs no verification,
and the rate limits are raised so that tests measure olmstead rather than
Synapse's limiter. Nothing here is fit for production.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

__all__ = ["ThrowawayHomeserver"]

_GENEROUS = {"per_second": 1000, "burst_count": 1000}

#: Settings merged over the config Synapse generates. Every ``rc_*`` key that
#: Synapse 1.163 reads as a ``per_second``/``burst_count`` pair is raised;
#: ``rc_federation`` has its own shape (there is no federation here anyway).
_OVERRIDES: dict[str, Any] = {
    "enable_registration": True,
    "enable_registration_without_verification": True,
    "report_stats": False,
    "trusted_key_servers": [],
    "suppress_key_server_warning": True,
    "federation_domain_whitelist": [],
    "presence": {"enabled": False},
    # the attachment tests round-trip a 200 MB file (Synapse's default cap is 50 MB)
    "max_upload_size": "256M",
    "experimental_features": {
        "msc3202_transaction_extensions": True,
        "msc2409_to_device_messages_enabled": True,
    },
    "rc_message": _GENEROUS,
    "rc_registration": _GENEROUS,
    "rc_registration_token_validity": _GENEROUS,
    "rc_login": {"address": _GENEROUS, "account": _GENEROUS, "failed_attempts": _GENEROUS},
    "rc_joins": {"local": _GENEROUS, "remote": _GENEROUS},
    "rc_joins_per_room": _GENEROUS,
    "rc_invites": {"per_room": _GENEROUS, "per_user": _GENEROUS, "per_issuer": _GENEROUS},
    "rc_third_party_invite": _GENEROUS,
    "rc_3pid_validation": _GENEROUS,
    "rc_admin_redaction": _GENEROUS,
    "rc_key_requests": _GENEROUS,
    "rc_media_create": _GENEROUS,
    "rc_room_creation": _GENEROUS,
    "rc_reports": _GENEROUS,
    "rc_presence": {"per_user": _GENEROUS},
    "rc_delayed_event_mgmt": _GENEROUS,
    "rc_user_directory": _GENEROUS,
    "rc_profile": _GENEROUS,
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 1000,
        "sleep_delay": 500,
        "reject_limit": 1000,
        "concurrent": 1000,
    },
}

_PORT_ATTEMPTS = 3  # the free port is free when picked; someone may take it before Synapse


class ThrowawayHomeserver:
    """``with ThrowawayHomeserver() as hs:`` starts Synapse; ``hs.base_url`` reaches it.

    ``keep=True`` leaves the temp directory (and its log, ``log_path``) behind
    after ``cleanup()``.
    """

    server_name = "localhost"

    def __init__(self, *, keep: bool = False, startup_timeout: float = 60.0) -> None:
        self.keep = keep
        self.startup_timeout = startup_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="olmstead-synapse-"))
        self.config_path = self.directory / "homeserver.yaml"
        self.log_path = self.directory / "homeserver.log"
        self.output_path = self.directory / "stdout.log"
        self.registration_shared_secret = secrets.token_hex(32)
        self.port = _free_port()
        #: seconds the last ``start()`` took until ``/versions`` answered
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._generated = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> ThrowawayHomeserver:
        """Start Synapse and wait until it answers ``/_matrix/client/versions``."""
        began = time.monotonic()
        if not self._generated:
            self._generate_config()
        for attempt in range(_PORT_ATTEMPTS):
            self._write_config()
            try:
                self._launch_and_wait(began + self.startup_timeout)
            except _PortTaken:
                if attempt == _PORT_ATTEMPTS - 1:
                    raise RuntimeError(
                        f"Synapse could not bind a loopback port:\n{self.log_tail()}"
                    ) from None
                self.port = _free_port()
                continue
            self.startup_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate Synapse; kill it if it has not exited within ``timeout`` seconds."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def cleanup(self) -> None:
        """Remove the temp directory, unless ``keep``."""
        if not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> ThrowawayHomeserver:
        try:
            return self.start()
        except BaseException:
            self.stop()
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.cleanup()

    def log_tail(self, n: int = 80) -> str:
        """The last ``n`` lines of Synapse's stdout/stderr and of its log file."""
        parts: list[str] = []
        for path in (self.output_path, self.log_path):
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-n:]
                if lines:
                    parts.append(f"--- {path.name} (last {len(lines)} lines) ---")
                    parts.extend(lines)
        return "\n".join(parts) if parts else "(Synapse wrote no log)"

    # --- accounts --------------------------------------------------------------------------

    def register_user(
        self, localpart: str | None = None, password: str | None = None
    ) -> dict[str, Any]:
        """Register a user through ``/_matrix/client/v3/register``.

        Returns the server's answer (``user_id``, ``access_token``,
        ``device_id``) plus the ``localpart`` and ``password`` used; both are
        random when not given.
        """
        localpart = localpart or f"user-{uuid.uuid4().hex[:12]}"
        password = password or secrets.token_hex(16)
        auth: dict[str, Any] = {"type": "m.login.dummy"}
        body: dict[str, Any] = {
            "auth": auth,
            "username": localpart,
            "password": password,
            "inhibit_login": False,
        }
        url = f"{self.base_url}/_matrix/client/v3/register"
        with httpx.Client(timeout=30) as http:
            answer = http.post(url, json=body)
            if answer.status_code == 401 and "session" in answer.json():
                # user-interactive auth: go again inside the session it opened
                auth["session"] = answer.json()["session"]
                answer = http.post(url, json=body)
        _raise_for_status(answer, "register")
        registered: dict[str, Any] = answer.json()
        return {**registered, "localpart": localpart, "password": password}

    def register_admin(
        self, localpart: str | None = None, password: str | None = None
    ) -> dict[str, Any]:
        """Register a server admin through ``/_synapse/admin/v1/register``.

        Uses the shared-secret API (a nonce, then an HMAC-SHA1 over nonce,
        username, password and ``admin``). Returns the same shape as
        ``register_user``.
        """
        localpart = localpart or f"admin-{uuid.uuid4().hex[:12]}"
        password = password or secrets.token_hex(16)
        url = f"{self.base_url}/_synapse/admin/v1/register"
        mac = hmac.new(self.registration_shared_secret.encode(), digestmod=hashlib.sha1)
        with httpx.Client(timeout=30) as http:
            nonce_answer = http.get(url)
            _raise_for_status(nonce_answer, "admin register (nonce)")
            nonce: str = nonce_answer.json()["nonce"]
            for part in (nonce.encode(), localpart.encode(), password.encode()):
                mac.update(part)
                mac.update(b"\x00")
            mac.update(b"admin")
            answer = http.post(
                url,
                json={
                    "nonce": nonce,
                    "username": localpart,
                    "password": password,
                    "admin": True,
                    "mac": mac.hexdigest(),
                },
            )
        _raise_for_status(answer, "admin register")
        registered: dict[str, Any] = answer.json()
        return {**registered, "localpart": localpart, "password": password}

    # --- internals -------------------------------------------------------------------------

    def _generate_config(self) -> None:
        generated = subprocess.run(
            [
                sys.executable,
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                self.server_name,
                "--config-path",
                str(self.config_path),
                "--data-directory",
                str(self.directory),
                "--generate-config",
                "--report-stats=no",
            ],
            cwd=self.directory,
            capture_output=True,
            text=True,
            check=False,
        )
        if generated.returncode != 0:
            raise RuntimeError(
                f"Synapse could not generate its config (exit {generated.returncode}):\n"
                f"{generated.stdout}\n{generated.stderr}"
            )
        self._generated = True

    def _write_config(self) -> None:
        import yaml  # Synapse's own dependency: present wherever Synapse is

        settings: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        settings.update(_OVERRIDES)
        settings["registration_shared_secret"] = self.registration_shared_secret
        settings["database"] = {
            "name": "sqlite3",
            "args": {"database": str(self.directory / "homeserver.db")},
        }
        settings["listeners"] = [
            {
                "port": self.port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ]
        log_config = self.directory / f"{self.server_name}.log.config"
        settings["log_config"] = str(log_config)
        logging_settings: dict[str, Any] = yaml.safe_load(log_config.read_text())
        logging_settings["handlers"]["file"]["filename"] = str(self.log_path)
        # straight to the file, unbuffered, so log_tail() shows what just happened
        logging_settings["root"]["handlers"] = ["file"]
        log_config.write_text(yaml.safe_dump(logging_settings))
        self.config_path.write_text(yaml.safe_dump(settings))

    def _launch_and_wait(self, deadline: float) -> None:
        seen = {path: _size(path) for path in (self.output_path, self.log_path)}
        with self.output_path.open("ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self._process = process
        url = f"{self.base_url}/_matrix/client/versions"
        with httpx.Client(timeout=2) as http:
            while True:
                if process.poll() is not None:
                    self._process = None
                    written = "".join(_read_from(path, at) for path, at in seen.items())
                    if "Address already in use" in written:
                        raise _PortTaken
                    raise RuntimeError(
                        f"Synapse exited with {process.returncode} while starting "
                        f"(log: {self.log_path}):\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(url).is_success:
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"Synapse did not answer {url} within {self.startup_timeout:g} s "
                        f"(log: {self.log_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.1)


class _PortTaken(Exception):
    """The port picked for Synapse was taken before Synapse could bind it."""


def _raise_for_status(answer: httpx.Response, what: str) -> None:
    if not answer.is_success:
        raise httpx.HTTPStatusError(
            f"{what}: HTTP {answer.status_code}: {answer.text}",
            request=answer.request,
            response=answer,
        )


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _read_from(path: Path, offset: int) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
