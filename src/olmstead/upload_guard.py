"""Whether an upload may go out now, and what an upload's failure says about the server.

This sub-machine ends the ``One time key … already exists`` retry storm:

- **Before a new account's first upload** it looks the device up (``/keys/query``).
  Identity keys on the server that are not ours mean another client lives on this
  device ID, or the ID was reused: ``DeviceIdInUse``, and nothing is uploaded
  (unless the operator opted in to replacing them).
- **A duplicate one-time key** (400 ``… already exists``) is decided by the old key's
  signature, which Synapse quotes in its error: signed by our Ed25519 key, the store
  was rolled back and the stale keys are *drained* by claiming our own keys until the
  server hands out the fallback key, then the upload is retried; signed by anyone
  else, ``DeviceIdentityConflict`` and uploads stop. If the message cannot be parsed,
  one of our keys is claimed and its signature decides.
- **Our device, watched**: when a sync lists our own user among the device list
  changes, our device is looked up again; identity keys on the server that are no
  longer ours (another client uploaded over them) are ``DeviceKeysReplaced``, at
  once, and uploads stop.
- **Never a storm**: once an upload failed, at most ``max_attempts`` uploads in any
  ``window`` seconds, with exponential backoff and jitter between them and at least
  the server's ``Retry-After``; requests never grow.

It decides; the machine commits and hands out requests. No I/O, no store.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from olmstead import boundary
from olmstead.backoff import Backoff
from olmstead.errors import (
    DeviceIdentityConflict,
    DeviceIdInUse,
    DeviceKeysReplaced,
    KeyStateError,
    OlmsteadError,
    OneTimeKeyConflict,
    RateLimited,
    RemoteProtocolError,
    StaleKeysRemain,
)
from olmstead.olm.signing import verify_signed_json
from olmstead.requests import KeysClaimRequest, KeysQueryRequest

__all__ = ["OneTimeKeysDrained", "UploadGuard", "UploadPolicy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadPolicy:
    #: uploads allowed in any ``window`` seconds once one failed
    max_attempts: int = 3
    window: float = 300.0
    #: backoff after the n-th failure: first_delay * 2**(n-1), capped, with jitter
    first_delay: float = 2.0
    max_delay: float = 300.0
    #: the most of our own keys a drain claims before it gives up
    max_drain: int = 600
    #: a handed-out upload nobody reported on may go out again after this long
    in_flight_timeout: float = 120.0
    #: replace identity keys the server holds for our device ID (explicit opt-in)
    replace_existing_device: bool = False


@dataclass(frozen=True)
class OneTimeKeysDrained:
    """Reported when stale one-time keys of ours were drained from the server."""

    user_id: str
    device_id: str
    conflicting_key_id: str
    drained: int


@dataclass
class _Attempts:
    backoff: Backoff
    times: list[float] = field(default_factory=list)
    in_flight_since: float | None = None


class UploadGuard:
    def __init__(self, policy: UploadPolicy, user_id: str, device_id: str) -> None:
        self.policy = policy
        self.user_id = user_id
        self.device_id = device_id
        self.problem: KeyStateError | None = None
        self._mode: Literal["check_device", "ready", "probe", "drain"] = "check_device"
        self._conflict_key_id = ""
        self._drained = 0
        self._attempts = self._new_attempts()
        self._waiting: KeysQueryRequest | KeysClaimRequest | None = None
        self._guard_backoff = Backoff(policy.first_delay, policy.max_delay)
        self._waiting_since = 0.0
        #: a sync listed our own user as changed: look our device up again
        self._watch_due = False
        self._watching: KeysQueryRequest | None = None

    # --- what to send ------------------------------------------------------------------------

    def next_request(self, shared: bool, now: float) -> KeysQueryRequest | KeysClaimRequest | None:
        """A query or claim that must come before any upload, if one is due."""
        if self.problem is not None:
            return None
        if self._mode == "check_device" and shared:
            self._mode = "ready"  # the server confirmed our keys once: nothing to check
        if self._mode == "ready" and shared and self._watch_due and self._watching is None:
            self._watch_due = False
            self._watching = KeysQueryRequest(
                f"watch_device-{uuid.uuid4().hex[:12]}", {self.user_id: [self.device_id]}
            )
            return self._watching
        if self._mode == "ready" or not self._guard_backoff.ready(now):
            return None
        if self._waiting is not None:
            if now - self._waiting_since < self.policy.in_flight_timeout:
                return None  # never two at once: a second claim would use up a key
            self._waiting = None  # nobody reported on it: ask again
        if self._waiting is None:
            self._waiting_since = now
            request_id = f"{self._mode}-{uuid.uuid4().hex[:12]}"
            if self._mode == "check_device":
                self._waiting = KeysQueryRequest(request_id, {self.user_id: [self.device_id]})
            else:
                target = {self.user_id: {self.device_id: "signed_curve25519"}}
                self._waiting = KeysClaimRequest(request_id, target)
        return self._waiting

    def start_drain(self) -> None:
        """Drain our stale keys now: the key-state marker showed the store was rolled back."""
        if self.problem is None and self._mode != "drain":
            self._mode, self._drained, self._conflict_key_id = "drain", 0, ""

    def watch_own_device(self) -> None:
        """A sync listed our own user as changed: check our device's keys on the server."""
        self._watch_due = True

    def owns(self, request_id: str) -> bool:
        return any(
            r is not None and r.request_id == request_id for r in (self._waiting, self._watching)
        )

    def may_upload(self, now: float) -> bool:
        if self.problem is not None or self._mode != "ready":
            return False
        a = self._attempts
        if (
            a.in_flight_since is not None
            and now - a.in_flight_since < self.policy.in_flight_timeout
        ):
            return False
        if a.backoff.failures == 0:
            return True
        recent = [t for t in a.times if now - t < self.policy.window]
        return a.backoff.ready(now) and len(recent) < self.policy.max_attempts

    def upload_handed_out(self, now: float) -> None:
        self._attempts.times.append(now)
        self._attempts.in_flight_since = now

    # --- what came back ---------------------------------------------------------------------

    def _new_attempts(self) -> _Attempts:
        return _Attempts(Backoff(self.policy.first_delay, self.policy.max_delay))

    def on_upload_success(self) -> None:
        self._attempts = self._new_attempts()

    def on_upload_failure(self, error: OlmsteadError, now: float, our_ed25519: str) -> None:
        """Back off, and read a duplicate-key error for whose keys are on the server.

        Raises ``DeviceIdentityConflict`` when the stale key is another identity's.
        """
        self._attempts.in_flight_since = None
        retry_after = error.retry_after if isinstance(error, RateLimited) else None
        delay = self._attempts.backoff.failed(now, retry_after or 0.0)
        if isinstance(error, OneTimeKeyConflict):
            self._on_duplicate_key(error, our_ed25519)
        else:
            log.warning(
                "key upload failed (%s); next attempt in %.1f s at the earliest", error, delay
            )

    def _on_duplicate_key(self, conflict: OneTimeKeyConflict, our_ed25519: str) -> None:
        self._conflict_key_id = conflict.key_id or ""
        old = conflict.old_key
        if old is None:
            log.warning(
                "duplicate one-time key, but the server's message does not quote it; "
                "claiming one of our keys to see whose they are"
            )
            self._mode = "probe"
            return
        self._judge_stale_key(old, our_ed25519)

    def _judge_stale_key(self, key: Mapping[str, Any], our_ed25519: str) -> None:
        if verify_signed_json(dict(key), self.user_id, self.device_id, our_ed25519):
            if self._mode != "drain":
                log.warning(
                    "the server holds one-time keys that we signed but no longer have (%s): "
                    "the store was rolled back or lost state; draining them",
                    self._conflict_key_id or "found by a claim",
                )
                self._mode, self._drained = "drain", 0
            return
        self.problem = DeviceIdentityConflict(self.user_id, self.device_id, _signer(key))
        raise self.problem

    def on_response(
        self, request_id: str, response: Mapping[str, Any], our_ed25519: str
    ) -> OneTimeKeysDrained | None:
        """Take the answer to our own device query or claim. May raise a ``KeyStateError``."""
        if self._watching is not None and self._watching.request_id == request_id:
            self._watching = None
            self._check_still_ours(response, our_ed25519)
            return None
        assert self._waiting is not None
        assert self._waiting.request_id == request_id
        self._waiting = None
        self._guard_backoff.succeeded()
        if self._mode == "check_device":
            self._check_device(response, our_ed25519)
            return None
        key = _claimed_key(response, self.user_id, self.device_id)
        if key is None:
            return self._drain_done()
        self._judge_stale_key(key, our_ed25519)  # raises if another identity's
        if key.get("fallback") is True:  # ours, and nothing else is left
            return self._drain_done()
        self._drained += 1
        if self._drained >= self.policy.max_drain:
            self.problem = StaleKeysRemain(self.user_id, self.device_id, self._drained)
            raise self.problem
        return None

    def on_failure(self, request_id: str, now: float) -> None:
        """Our query or claim failed: ask again after a backoff."""
        if self._watching is not None and self._watching.request_id == request_id:
            self._watching, self._watch_due = None, True  # asked again with the next round
            return
        # also after on_response refused a malformed answer (it let the request go first)
        if self._waiting is None or self.owns(request_id):
            self._waiting = None
            self._guard_backoff.failed(now)

    def _drain_done(self) -> OneTimeKeysDrained | None:
        mode, drained = self._mode, self._drained
        self._mode, self._drained = "ready", 0
        self._attempts.backoff.not_before = 0.0  # repaired: retry the upload without waiting
        if mode == "probe":
            log.warning("no stale one-time key found by claiming; the upload will be retried")
            return None
        report = OneTimeKeysDrained(self.user_id, self.device_id, self._conflict_key_id, drained)
        log.warning(
            "drained %d stale one-time keys of %s %s from the server; uploading again",
            drained,
            self.user_id,
            self.device_id,
        )
        return report

    def _server_key(self, response: Mapping[str, Any]) -> Any:
        # absent: none (ruma leaves {} out)
        devices = response.get("device_keys", {}) if isinstance(response, Mapping) else None
        if not isinstance(devices, Mapping):
            raise RemoteProtocolError(
                "the /keys/query response has no device_keys object", "device_keys"
            )
        mine = devices.get(self.user_id, {})
        entry = mine.get(self.device_id) if isinstance(mine, Mapping) else None
        keys = entry.get("keys") if isinstance(entry, Mapping) else None
        return keys.get(f"ed25519:{self.device_id}") if isinstance(keys, Mapping) else None

    def _check_still_ours(self, response: Mapping[str, Any], our_ed25519: str) -> None:
        server_key = self._server_key(response)
        if server_key == our_ed25519:
            return
        shown = server_key if isinstance(server_key, str) else None
        self.problem = DeviceKeysReplaced(self.user_id, self.device_id, shown)
        log.error("%s", self.problem)
        raise self.problem

    def _check_device(self, response: Mapping[str, Any], our_ed25519: str) -> None:
        server_key = self._server_key(response)
        if server_key is None or server_key == our_ed25519:
            self._mode = "ready"  # free, or our own keys from an upload we did not see finish
            return
        if self.policy.replace_existing_device:
            log.warning(
                "replacing identity keys %s on device %s, as configured", server_key, self.device_id
            )
            self._mode = "ready"
            return
        shown = server_key if isinstance(server_key, str) else boundary.show(server_key)
        self.problem = DeviceIdInUse(self.user_id, self.device_id, shown)
        raise self.problem


def _claimed_key(
    response: Mapping[str, Any], user_id: str, device_id: str
) -> Mapping[str, Any] | None:
    keys = response.get("one_time_keys", {})  # absent: nothing claimed (ruma leaves {} out)
    if not isinstance(keys, Mapping):
        raise RemoteProtocolError(
            "the /keys/claim response has no one_time_keys object", "one_time_keys"
        )
    device = (
        keys.get(user_id, {}).get(device_id) if isinstance(keys.get(user_id), Mapping) else None
    )
    if not isinstance(device, Mapping) or not device:
        return None
    key = next(iter(device.values()))
    if not isinstance(key, Mapping):
        raise RemoteProtocolError(f"a claimed key is not an object: {boundary.show(key)}")
    return key


def _signer(key: Mapping[str, Any]) -> str:
    signatures = key.get("signatures")
    if isinstance(signatures, Mapping):
        for user, sigs in signatures.items():
            if isinstance(sigs, Mapping):
                return f"{', '.join(sigs)} of {user} (not our key)"
    return "an unknown key (the key carries no signature of ours)"
