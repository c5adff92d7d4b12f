"""The throwaway Synapse itself: loopback only, open registration, working tokens, and
the one-time-key behaviour olmstead relies on."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from olmstead.throwaway_homeserver import ThrowawayHomeserver


def _reachable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect((host, port))
        except OSError:
            return False
        return True


def _other_local_addresses() -> set[str]:
    """Addresses of this machine other than 127.0.0.1 that a socket could reach."""
    found = {"127.0.0.2"}  # also loopback on Linux, but not the address Synapse bound
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as outward,
    ):
        outward.connect(("192.0.2.1", 9))  # TEST-NET: picks the outward interface, sends nothing
        found.add(str(outward.getsockname()[0]))
    if socket.has_ipv6:
        found.add("::1")
    found.discard("127.0.0.1")
    return found


def _auth(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {user['access_token']}"}


def test_answers_versions_on_127_0_0_1_only(homeserver: ThrowawayHomeserver) -> None:
    url = urlsplit(homeserver.base_url)
    assert (url.scheme, url.hostname) == ("http", "127.0.0.1")
    assert url.port == homeserver.port
    assert homeserver.server_name == "localhost"

    versions = httpx.get(f"{homeserver.base_url}/_matrix/client/versions", timeout=10)
    assert versions.status_code == 200
    assert "v1.1" in versions.json()["versions"]

    assert _reachable("127.0.0.1", homeserver.port)
    others = _other_local_addresses()
    assert others  # at least 127.0.0.2 and, with IPv6, ::1
    for address in others:
        assert not _reachable(address, homeserver.port), f"Synapse answers on {address}"


def test_has_no_federation_endpoints(homeserver: ThrowawayHomeserver) -> None:
    answer = httpx.get(f"{homeserver.base_url}/_matrix/federation/v1/version", timeout=10)
    assert answer.status_code == 404  # not served: only the client resources are


def test_registered_token_works_on_whoami(
    homeserver: ThrowawayHomeserver, new_user: Callable[[], dict[str, Any]]
) -> None:
    user = new_user()
    assert user["user_id"] == f"@{user['localpart']}:localhost"
    assert user["access_token"]
    assert user["device_id"]

    whoami = httpx.get(
        f"{homeserver.base_url}/_matrix/client/v3/account/whoami", headers=_auth(user), timeout=10
    )
    assert whoami.status_code == 200
    assert whoami.json()["user_id"] == user["user_id"]
    assert whoami.json()["device_id"] == user["device_id"]

    stranger = httpx.get(
        f"{homeserver.base_url}/_matrix/client/v3/account/whoami",
        headers={"Authorization": "Bearer not-a-token"},
        timeout=10,
    )
    assert stranger.status_code == 401


def test_registration_is_not_rate_limited(new_user: Callable[[], dict[str, Any]]) -> None:
    # Synapse's default rc_registration allows a burst of 3, then about one every 6 s
    users = [new_user() for _ in range(6)]
    assert len({user["user_id"] for user in users}) == 6


def test_register_admin_makes_a_server_admin(
    homeserver: ThrowawayHomeserver, new_user: Callable[[], dict[str, Any]]
) -> None:
    admin = homeserver.register_admin()
    user = new_user()
    base = f"{homeserver.base_url}/_synapse/admin/v2/users"

    about_admin = httpx.get(f"{base}/{admin['user_id']}", headers=_auth(admin), timeout=10)
    assert about_admin.status_code == 200
    assert about_admin.json()["admin"] is True

    about_user = httpx.get(f"{base}/{user['user_id']}", headers=_auth(admin), timeout=10)
    assert about_user.status_code == 200
    assert about_user.json()["admin"] is False

    not_admin = httpx.get(f"{base}/{admin['user_id']}", headers=_auth(user), timeout=10)
    assert not_admin.status_code == 403


def test_one_time_key_id_reused_with_another_key_is_refused(
    homeserver: ThrowawayHomeserver, new_user: Callable[[], dict[str, Any]]
) -> None:
    """Synapse keeps the first key under an ID; a different key under it is a 400."""
    user = new_user()
    url = f"{homeserver.base_url}/_matrix/client/v3/keys/upload"
    first_key = "A" * 43
    other_key = "B" * 43

    first = httpx.post(
        url,
        json={"one_time_keys": {"curve25519:AAAAAQ": first_key}},
        headers=_auth(user),
        timeout=10,
    )
    assert first.status_code == 200, first.text
    assert first.json()["one_time_key_counts"].get("curve25519") == 1

    # the same key again is accepted and changes nothing
    again = httpx.post(
        url,
        json={"one_time_keys": {"curve25519:AAAAAQ": first_key}},
        headers=_auth(user),
        timeout=10,
    )
    assert again.status_code == 200, again.text
    assert again.json()["one_time_key_counts"].get("curve25519") == 1

    conflict = httpx.post(
        url,
        json={"one_time_keys": {"curve25519:AAAAAQ": other_key}},
        headers=_auth(user),
        timeout=10,
    )
    assert conflict.status_code == 400
    assert "already exists" in conflict.json()["error"]

    # and the first key is the one that stays
    claimed = httpx.post(
        f"{homeserver.base_url}/_matrix/client/v3/keys/claim",
        json={"one_time_keys": {user["user_id"]: {user["device_id"]: "curve25519"}}},
        headers=_auth(user),
        timeout=10,
    )
    assert claimed.status_code == 200
    assert claimed.json()["one_time_keys"][user["user_id"]][user["device_id"]] == {
        "curve25519:AAAAAQ": first_key
    }


def test_stop_and_cleanup() -> None:
    with ThrowawayHomeserver(keep=True) as server:
        assert server.running
        port, directory = server.port, server.directory
        assert server.startup_seconds is not None
        assert server.startup_seconds < 60
        assert httpx.get(f"{server.base_url}/_matrix/client/versions", timeout=10).is_success
        assert "Synapse now listening on TCP port" in server.log_tail(400)
    assert not server.running
    assert not _reachable("127.0.0.1", port)
    assert server.log_path.exists()  # keep=True left the temp directory and its log
    server.keep = False
    server.cleanup()
    assert not directory.exists()
