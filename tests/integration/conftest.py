"""One real Synapse per test session, on a free loopback port; its log kept on failure."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from olmstead.throwaway_homeserver import ThrowawayHomeserver


@pytest.fixture(scope="session")
def homeserver(request: pytest.FixtureRequest) -> Iterator[ThrowawayHomeserver]:
    server = ThrowawayHomeserver(keep=True).start()
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed:
            print(f"\nSynapse log kept for the failed tests: {server.log_path}")
        else:
            server.keep = False
            server.cleanup()


@pytest.fixture
def new_user(homeserver: ThrowawayHomeserver) -> Callable[[], dict[str, Any]]:
    """Registers a fresh user per call: user_id, access_token, device_id, localpart, password."""
    return homeserver.register_user
