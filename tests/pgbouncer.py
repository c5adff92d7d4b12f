"""A real pgbouncer (Debian package ``pgbouncer``) in front of the test PostgreSQL.

Started on a free loopback port with its defaults but for the pool mode; trust
authentication, as the test server has. It refuses to run as root, so as root it
drops to the ``postgres`` user (``-u``), which must be able to read its files.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import POSTGRES_DSN

INSTALL = "apt-get install -y pgbouncer"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running_pgbouncer(pool_mode: str, users: list[str]) -> Iterator[int]:
    """pgbouncer in ``pool_mode`` for ``users``; yields its port, stops it afterwards."""
    binary = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )
    if binary is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"pgbouncer is not installed: {INSTALL}")
        pytest.skip(f"pgbouncer is not installed: {INSTALL}")
    server = urlsplit(POSTGRES_DSN)
    port = _free_port()
    # world-readable on purpose (no secrets: trust authentication), for the postgres user
    directory = Path(tempfile.mkdtemp(prefix="olmstead-pgbouncer-"))
    directory.chmod(0o755)
    (directory / "users.txt").write_text("".join(f'"{user}" ""\n' for user in users))
    (directory / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.hostname or '127.0.0.1'} port={server.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
        f"auth_type = trust\nauth_file = {directory / 'users.txt'}\n"
        f"pool_mode = {pool_mode}\n"
        "unix_socket_dir =\n"
    )
    for name in ("users.txt", "pgbouncer.ini"):
        (directory / name).chmod(0o644)
    as_user = ["-u", "postgres"] if os.geteuid() == 0 else []
    log = directory / "pgbouncer.log"  # opened here, as root: its log goes to stderr
    with open(log, "wb") as log_out:
        process = subprocess.Popen(
            [binary, *as_user, str(directory / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=log_out,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    error = log.read_text(errors="replace")
                    raise RuntimeError(f"pgbouncer did not start: {error}") from None
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
