"""Whose devices we follow, whose list is outdated, and what a ``/keys/query`` answer changes.

Users are tracked once they share an encrypted room with us (the client says so
with ``OlmMachine.update_tracked_users``) and marked outdated when tracking
starts and whenever a sync lists them in ``device_lists.changed``;
``device_lists.left`` stops tracking them. Outdated users are queried in batches,
one query at a time.

An answer is applied device by device: a device is accepted only if it passes
``Device.from_keys``; a known device whose Ed25519 key changed is refused and the
old keys kept (a device ID never changes identity; a server that says so is wrong
or hostile); a device no longer listed is kept, flagged deleted. A device listed
with exactly the keys object it was accepted with is not checked again. A user marked
outdated again while the query was in flight stays outdated.

Pure: the machine reads the stored devices it needs and commits what this returns.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from olmstead import boundary
from olmstead.backoff import Backoff
from olmstead.errors import RemoteProtocolError
from olmstead.identities.device import Device, InvalidDeviceKeys
from olmstead.requests import KeysQueryRequest

__all__ = ["DeviceTracker", "QueryOutcome"]

log = logging.getLogger(__name__)

#: users per /keys/query: bounded, so one request stays small
QUERY_BATCH = 250


@dataclass
class QueryOutcome:
    """What one ``/keys/query`` answer changes, for the machine to commit."""

    devices: list[Device] = field(default_factory=list)
    tracked_users: dict[str, bool] = field(default_factory=dict)
    #: devices refused, with why (also logged)
    refused: list[tuple[str, str, str]] = field(default_factory=list)


class DeviceTracker:
    def __init__(self, own_user_id: str, own_device_id: str, tracked: Mapping[str, bool]) -> None:
        self.own_user_id = own_user_id
        self.own_device_id = own_device_id
        self._tracked = set(tracked)
        self._outdated = {user for user, outdated in tracked.items() if outdated}
        self._waiting: KeysQueryRequest | None = None
        self._marked_in_flight: set[str] = set()
        self._backoff = Backoff()

    @property
    def tracked(self) -> frozenset[str]:
        return frozenset(self._tracked)

    @property
    def outdated(self) -> frozenset[str]:
        return frozenset(self._outdated)

    @property
    def in_flight(self) -> bool:
        """Whether a query was handed out and its answer (or failure) has not come."""
        return self._waiting is not None

    # --- what the client and the sync say ------------------------------------------------------

    def track(self, users: Iterable[str]) -> dict[str, bool]:
        """Start tracking ``users``; the rows to commit (new users, outdated)."""
        new = {user: True for user in users if user not in self._tracked}
        self._tracked |= set(new)
        self._mark_outdated(new)
        return new

    def on_device_lists(
        self, changed: Iterable[str], left: Iterable[str]
    ) -> tuple[dict[str, bool], set[str]]:
        """Apply a sync's ``device_lists``; the rows to commit and the users to drop."""
        marked = {user: True for user in changed if user in self._tracked}
        self._mark_outdated(marked)
        dropped = {user for user in left if user in self._tracked}
        self._tracked -= dropped
        self._outdated -= dropped
        return marked, dropped

    def _mark_outdated(self, users: Iterable[str]) -> None:
        users = set(users)
        self._outdated |= users
        if self._waiting is not None:
            self._marked_in_flight |= users

    # --- the query ---------------------------------------------------------------------------

    def next_request(self, now: float) -> KeysQueryRequest | None:
        if self._waiting is not None or not self._outdated or not self._backoff.ready(now):
            return None
        batch = sorted(self._outdated)[:QUERY_BATCH]
        self._waiting = KeysQueryRequest(
            f"keys_query-{uuid.uuid4().hex[:12]}", {user: [] for user in batch}
        )
        self._marked_in_flight = set()
        return self._waiting

    def owns(self, request_id: str) -> bool:
        return self._waiting is not None and self._waiting.request_id == request_id

    def queried_users(self) -> list[str]:
        assert self._waiting is not None
        return list(self._waiting.device_keys)

    def on_failure(self, now: float) -> None:
        self._waiting = None  # the users stay outdated: asked again after a backoff
        self._backoff.failed(now)

    def on_response(
        self,
        response: Mapping[str, Any],
        stored: Mapping[str, Mapping[str, Device]],
        now: float | None = None,
    ) -> QueryOutcome:
        """Apply an answer, given the stored devices of every queried user.

        Users the answer leaves out (their server failed) stay outdated and are asked
        again after a backoff (from ``now``), not at once: a server that never answers
        for them must not get a query per round.
        """
        assert self._waiting is not None
        # checked before anything changes: a refused answer leaves the query to be failed
        # (and retried after a backoff) by the caller
        # absent: no devices at all (servers built on ruma leave empty maps out); every
        # queried user then counts as not answered and stays outdated
        answered = response.get("device_keys", {}) if isinstance(response, Mapping) else None
        if not isinstance(answered, Mapping):
            raise RemoteProtocolError(
                "the /keys/query response has no device_keys object", "device_keys"
            )
        queried, self._waiting = self.queried_users(), None
        outcome = QueryOutcome()
        unanswered = 0
        for user_id in queried:
            listed = answered.get(user_id)
            if not isinstance(listed, Mapping):
                unanswered += 1
                continue  # not answered (a failure for that server): stays outdated
            self._apply_user(user_id, listed, stored.get(user_id, {}), outcome)
            if user_id not in self._marked_in_flight and user_id in self._tracked:
                self._outdated.discard(user_id)
                outcome.tracked_users[user_id] = False
        if unanswered and now is not None:
            self._backoff.failed(now)
        else:
            self._backoff.succeeded()
        return outcome

    def _apply_user(
        self,
        user_id: str,
        listed: Mapping[str, Any],
        known: Mapping[str, Device],
        outcome: QueryOutcome,
    ) -> None:
        for device_id, keys in listed.items():
            if user_id == self.own_user_id and device_id == self.own_device_id:
                continue
            if not boundary.is_identifier(device_id):
                self._refuse(outcome, user_id, repr(device_id)[:80], "not a usable device ID")
                continue
            old = known.get(device_id)
            try:
                if old is not None and not old.deleted and old.keys == keys:
                    continue  # unchanged since its signature was checked: not checked again
                device = Device.from_keys(user_id, device_id, keys)
            except (InvalidDeviceKeys, RecursionError) as exc:  # RecursionError: nested deep
                self._refuse(outcome, user_id, device_id, str(exc) or type(exc).__name__)
                continue
            if old is not None and old.ed25519 != device.ed25519:
                self._refuse(
                    outcome,
                    user_id,
                    device_id,
                    f"its Ed25519 key changed from {old.ed25519} to {device.ed25519}; the old "
                    "keys are kept (a device never changes identity: the server is wrong, or "
                    "someone replaced the device's keys)",
                )
                continue
            if old != device:
                outcome.devices.append(device)
        for device_id, old in known.items():
            if device_id not in listed and not old.deleted:
                outcome.devices.append(old.marked_deleted())

    @staticmethod
    def _refuse(outcome: QueryOutcome, user_id: str, device_id: str, why: str) -> None:
        log.warning("refused device %s of %s: %s", device_id, user_id, why)
        outcome.refused.append((user_id, device_id, why))
