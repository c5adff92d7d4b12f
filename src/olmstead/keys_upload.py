"""When to make one-time and fallback keys, what ``/keys/upload`` carries, what its answer means.

This sub-machine decides; the ``OlmMachine`` commits. It changes only the
``AccountRecord`` it is handed (a copy the machine commits before adopting) and
keeps one flag of its own, whether the server reported our fallback key used.

Rules that keep keys here and on the server from drifting apart:

- While an upload is pending (unpublished keys, or device keys the server has not
  confirmed), no key is generated: a retry carries the very same IDs and keys.
- Keys become published only when a success response is marked, together with
  the server's new count, in one commit.

One-time key target: the server is kept at 50 keys (vodozemac's
``max_number_of_one_time_keys``, the most it will publish at once) and refilled
once it falls below 25. Half-way refills cost one upload per 25 claims rather
than one per claim, and 25 keys in reserve outlast the claims a burst of new
sessions makes between two syncs. Fewer than 50 keys live on the server keeps
every one of them among the 5,000 private keys vodozemac retains.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from olmstead import boundary
from olmstead.errors import RemoteProtocolError
from olmstead.olm import account as own
from olmstead.olm.canonical_json import canonical_json
from olmstead.requests import KeysUploadRequest
from olmstead.store.base import AccountRecord

__all__ = ["KeySettings", "KeysUpload"]

log = logging.getLogger(__name__)

SIGNED_CURVE25519 = "signed_curve25519"


@dataclass(frozen=True)
class KeySettings:
    target: int = 50
    refill_below: int = 25
    #: rotate the fallback key after this many seconds (matrix-rust-sdk: a week)
    fallback_rotation: float = 7 * 24 * 3600.0


class KeysUpload:
    def __init__(self, settings: KeySettings, claim: bool = True) -> None:
        self.settings = settings
        self._fallback_used = False
        #: claim a new device ID with one key before the device keys go up (off only
        #: when the operator opted in to replacing the keys on the ID)
        self.claim = claim

    # --- what to send ----------------------------------------------------------------------

    @staticmethod
    def is_pending(record: AccountRecord) -> bool:
        account = record.account
        return (
            not record.shared
            or bool(account.one_time_keys)
            or bool(own.unpublished_fallback_key(account))
        )

    def pending_request(self, record: AccountRecord) -> KeysUploadRequest | None:
        """The upload that the account's committed state calls for, or ``None``."""
        if not self.is_pending(record):
            return None
        account, user, device = record.account, record.user_id, record.device_id
        if self._claiming(record) and account.one_time_keys:
            # a new device's first upload claims its ID with one-time keys alone: Synapse
            # writes the device keys of an upload even when its one-time keys collide,
            # but an upload of one-time keys alone that collides writes nothing. Two fresh
            # accounts' first key IDs always collide, so a second client starting on this
            # device ID fails here without touching ours (REFERENCE: "Claiming a new device ID")
            otks = own.signed_one_time_keys(account, user, device)  # the one claim key
            digest = hashlib.sha256(canonical_json({"c": otks})).hexdigest()
            return KeysUploadRequest(f"keys_claim-{digest[:24]}", None, otks, {})
        device_keys = None if record.shared else own.device_keys(account, user, device)
        otks = own.signed_one_time_keys(account, user, device)
        fallback = own.signed_fallback_keys(account, user, device)
        digest = hashlib.sha256(
            canonical_json({"d": device_keys, "o": otks, "f": fallback})
        ).hexdigest()
        return KeysUploadRequest(f"keys_upload-{digest[:24]}", device_keys, otks, fallback)

    def wanted(self, record: AccountRecord, now: float) -> tuple[int, bool]:
        """How many one-time keys, and whether a fallback key, to generate now."""
        account = record.account
        if account.one_time_keys or own.unpublished_fallback_key(account):
            return 0, False  # a pending upload is retried as it is, never grown
        return self._one_time_keys_wanted(record), self._fallback_wanted(record, now)

    def top_up(self, record: AccountRecord, now: float) -> None:
        """Generate the keys ``wanted`` asks for, in ``record``."""
        one_time_keys, fallback = self.wanted(record, now)
        if one_time_keys:
            record.account.generate_one_time_keys(one_time_keys)
        if fallback:
            own.generate_fallback_key(record.account)
            record.fallback_created_at = now
            self._fallback_used = False

    def _one_time_keys_wanted(self, record: AccountRecord) -> int:
        if not record.shared:
            if self._claiming(record):
                return 1  # the claim: one key, the first ID every fresh account uses
            # a new device: its first upload with device keys fills up to the target
            wanted = self.settings.target - (record.server_key_count or 0)
            return max(0, min(wanted, record.account.max_number_of_one_time_keys))
        count = record.server_key_count
        if count is None or count >= self.settings.refill_below:
            return 0  # unknown until the server reports it: never guess high
        return min(self.settings.target - count, record.account.max_number_of_one_time_keys)

    def _fallback_wanted(self, record: AccountRecord, now: float) -> bool:
        if (
            self._claiming(record)  # never in the claim: it must not replace another's
            or not record.fallback_supported
            or own.unpublished_fallback_key(record.account)
        ):
            return False
        created = record.fallback_created_at
        return (
            created is None
            or self._fallback_used
            or now - created >= self.settings.fallback_rotation
        )

    def _claiming(self, record: AccountRecord) -> bool:
        return self.claim and not record.shared and not record.claimed

    def replace_fallback_key(self) -> None:
        """Make a new fallback key with the next top-up (where the server supports them)."""
        self._fallback_used = True

    # --- what the server said ----------------------------------------------------------------

    def on_sync_counts(
        self,
        record: AccountRecord,
        one_time_key_counts: Mapping[str, int] | None,
        unused_fallback_key_types: Sequence[str] | None,
    ) -> None:
        """Take the counts a sync reported, into ``record``.

        Counts move with every claim and every sync reports them again, so they are
        kept in memory only. That the server supports fallback keys is worth a commit:
        the caller passes a copy of the account to commit when that flag is about to
        turn on.
        """
        if one_time_key_counts is not None:
            record.server_key_count = _count(one_time_key_counts)
        if unused_fallback_key_types is not None:
            record.fallback_supported = True
            published = record.fallback_created_at is not None and not (
                own.unpublished_fallback_key(record.account)
            )
            if published and SIGNED_CURVE25519 not in unused_fallback_key_types:
                self._fallback_used = True

    def on_upload_response(self, record: AccountRecord, response: Mapping[str, Any]) -> None:
        """Mark the pending keys published, in ``record``.

        A success status is what counts: the server stored the keys. An answer
        without a usable ``one_time_key_counts`` (older Dendrite answered ``{}`` to an
        upload of only a fallback key) is logged, and the count is left unknown until
        the next sync reports it, so no keys are generated on a guess.
        """
        counts = response.get("one_time_key_counts") if isinstance(response, Mapping) else None
        try:
            count: int | None = boundary.key_counts(counts, "one_time_key_counts")
        except RemoteProtocolError as error:
            log.warning("the /keys/upload answer succeeded, but %s; count unknown", error)
            count = None
        if counts is None:
            log.warning(
                "the /keys/upload answer has no one_time_key_counts (%s); the keys count as "
                "published, the count is taken from the next sync",
                boundary.show(response),
            )
        # the same test pending_request made: this answer is to the claim
        was_claim = self._claiming(record) and bool(record.account.one_time_keys)
        if count is None and was_claim:
            # a new device held none before its claim (the device check saw it free), so
            # the server holds what the claim carried: the upload after it tops up from there
            count = len(record.account.one_time_keys)
        record.account.mark_keys_as_published()
        if was_claim:
            record.claimed = True  # device keys go next
        else:
            record.shared = True
        record.server_key_count = count
        log.info(
            "keys for %s %s published; the server holds %s one-time keys",
            record.user_id,
            record.device_id,
            "an unknown number of" if count is None else count,
        )


def _count(counts: Mapping[str, Any]) -> int:
    count = boundary.key_counts(counts)  # a missing algorithm means none are left
    assert count is not None
    return count
