"""A throwaway Synapse on a free loopback port: for the tests and ``olmstead demo`` only.

It needs the ``homeserver`` extra (PyPI ``matrix-synapse``). It listens on
127.0.0.1 only, keeps everything (SQLite database, signing key, log) in a temp
directory, allows open registration and raises the rate limits so tests measure
olmstead rather than Synapse's limiter. Nothing here is for production.
"""

from __future__ import annotations

import contextlib
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
_OVERRIDES: dict[str, Any] = {
    "enable_registration": True,
    "enable_registration_without_verification": True,
    "report_stats": False,
    "trusted_key_servers": [],
    "suppress_key_server_warning": True,
    "federation_domain_whitelist": [],
    "presence": {"enabled": False},
    "rc_message": _GENEROUS,
    "rc_registration": _GENEROUS,
    "rc_registration_token_validity": _GENEROUS,
    "rc_login": {"address": _GENEROUS, "account": _GENEROUS, "failed_attempts": _GENEROUS},
    "rc_joins": {"local": _GENEROUS, "remote": _GENEROUS},
    "rc_joins_per_room": _GENEROUS,
    "rc_invites": {"per_room": _GENEROUS, "per_user": _GENEROUS, "per_issuer": _GENEROUS},
    "rc_3pid_validation": _GENEROUS,
    "rc_admin_redaction": _GENEROUS,
    "rc_key_requests": _GENEROUS,
    "rc_room_creation": _GENEROUS,
    "rc_reports": _GENEROUS,
    "rc_presence": {"per_user": _GENEROUS},
    "rc_delayed_event_mgmt": _GENEROUS,
}


class ThrowawayHomeserver:
    """``with ThrowawayHomeserver() as hs:`` starts Synapse; ``hs.base_url`` reaches it."""

    server_name = "localhost"

    def __init__(self, *, keep: bool = False, startup_timeout: float = 90.0) -> None:
        self.keep = keep
        self.startup_timeout = startup_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="olmstead-synapse-"))
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.directory / "homeserver.log"
        self._process: subprocess.Popen[bytes] | None = None

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> ThrowawayHomeserver:
        config = self._write_config()
        output = (self.directory / "stdout.log").open("wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(config)],
            cwd=self.directory,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        output.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Synapse exited with {self._process.returncode} while starting:\n"
                    + self.log_tail()
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/_matrix/client/versions", timeout=2).is_success:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"Synapse did not answer within {self.startup_timeout} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._process = None

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> ThrowawayHomeserver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.cleanup()

    def log_tail(self, lines: int = 80) -> str:
        text = ""
        for path in (self.directory / "stdout.log", self.log_path):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    # --- accounts ------------------------------------------------------------------------------

    def register_user(
        self, localpart: str | None = None, password: str | None = None
    ) -> dict[str, Any]:
        """Register a user; its ``user_id``, ``access_token``, ``device_id``, and
        the ``localpart`` and ``password`` it was made with."""
        localpart = localpart or f"user-{uuid.uuid4().hex[:10]}"
        password = password or uuid.uuid4().hex
        body: dict[str, Any] = {
            "username": localpart,
            "password": password,
            "auth": {"type": "m.login.dummy"},
            "inhibit_login": False,
        }
        url = f"{self.base_url}/_matrix/client/v3/register"
        answer = httpx.post(url, json=body, timeout=30)
        if answer.status_code == 401 and "session" in answer.json():
            body["auth"]["session"] = answer.json()["session"]
            answer = httpx.post(url, json=body, timeout=30)
        answer.raise_for_status()
        registered: dict[str, Any] = answer.json()
        return {**registered, "localpart": localpart, "password": password}

    def _write_config(self) -> Path:
        import yaml  # Synapse's own dependency: present wherever Synapse is

        config = self.directory / "homeserver.yaml"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                self.server_name,
                "--config-path",
                str(config),
                "--data-directory",
                str(self.directory),
                "--generate-config",
                "--report-stats=no",
            ],
            cwd=self.directory,
            check=True,
            capture_output=True,
        )
        settings = yaml.safe_load(config.read_text())
        settings.update(_OVERRIDES)
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
        logging_settings = yaml.safe_load(log_config.read_text())
        logging_settings["handlers"]["file"]["filename"] = str(self.log_path)
        log_config.write_text(yaml.safe_dump(logging_settings))
        config.write_text(yaml.safe_dump(settings))
        return config


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
