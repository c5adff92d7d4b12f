"""One real Synapse per test session, on a free loopback port; its log kept on failure."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from olmstead.throwaway_homeserver import ThrowawayHomeserver

_KEPT_LOG = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def homeserver(request: pytest.FixtureRequest) -> Iterator[ThrowawayHomeserver]:
    """The session's Synapse; its temp directory stays behind if any test failed."""
    # keep=True until we know the session went well: a failed start keeps its log too
    server = ThrowawayHomeserver(keep=True).start()
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed:
            request.config.stash[_KEPT_LOG] = str(server.log_path)
        else:
            server.keep = False
            server.cleanup()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    kept = terminalreporter.config.stash.get(_KEPT_LOG, None)
    if kept is not None:
        terminalreporter.write_line(f"Synapse log kept for the failed tests: {kept}", yellow=True)


@pytest.fixture
def new_user(homeserver: ThrowawayHomeserver) -> Callable[[], dict[str, Any]]:
    """Registers a fresh user per call: user_id, access_token, device_id, localpart, password."""

    def register() -> dict[str, Any]:
        return homeserver.register_user(f"user-{uuid.uuid4().hex[:12]}")

    return register
