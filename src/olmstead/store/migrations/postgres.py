"""The PostgreSQL schema, as numbered steps; ``olmstead_schema`` records the last applied.

Every table is keyed by ``account_id``: one database holds many devices (a bridge's
puppets, several bots). Steps run under a transaction-scoped advisory lock, so
processes starting at once migrate one after the other.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "accounts, devices, sessions, leases: the SQLite schema 1-5, keyed by account",
        """
        CREATE TABLE olmstead_meta (
            account_id TEXT NOT NULL,
            key        TEXT NOT NULL,
            value      TEXT NOT NULL,
            PRIMARY KEY (account_id, key)
        );
        CREATE TABLE olmstead_account (
            account_id TEXT PRIMARY KEY,
            user_id    TEXT NOT NULL,
            device_id  TEXT NOT NULL,
            pickle     TEXT NOT NULL,
            state      TEXT NOT NULL
        );
        CREATE TABLE olmstead_lease (
            account_id  TEXT PRIMARY KEY,
            holder      TEXT NOT NULL,
            acquired_at DOUBLE PRECISION NOT NULL,
            expires_at  DOUBLE PRECISION NOT NULL,
            generation  BIGINT NOT NULL
        );
        CREATE TABLE olmstead_kv (
            account_id TEXT NOT NULL,
            key        TEXT NOT NULL,
            value      TEXT NOT NULL,
            PRIMARY KEY (account_id, key)
        );
        CREATE TABLE olmstead_devices (
            account_id TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            device_id  TEXT NOT NULL,
            curve25519 TEXT NOT NULL,
            data       TEXT NOT NULL,
            PRIMARY KEY (account_id, user_id, device_id)
        );
        CREATE INDEX olmstead_devices_by_curve25519 ON olmstead_devices (account_id, curve25519);
        CREATE TABLE olmstead_tracked_users (
            account_id TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            outdated   BOOLEAN NOT NULL,
            PRIMARY KEY (account_id, user_id)
        );
        CREATE TABLE olmstead_olm_sessions (
            account_id TEXT NOT NULL,
            sender_key TEXT NOT NULL,
            session_id TEXT NOT NULL,
            pickle     TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            last_used  DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (account_id, sender_key, session_id)
        );
        CREATE TABLE olmstead_inbound_group_sessions (
            account_id  TEXT NOT NULL,
            room_id     TEXT NOT NULL,
            session_id  TEXT NOT NULL,
            sender_key  TEXT NOT NULL,
            signing_key TEXT NOT NULL,
            pickle      TEXT NOT NULL,
            PRIMARY KEY (account_id, room_id, session_id)
        );
        CREATE TABLE olmstead_outbound_group_sessions (
            account_id TEXT NOT NULL,
            room_id    TEXT NOT NULL,
            pickle     TEXT NOT NULL,
            state      TEXT NOT NULL,
            PRIMARY KEY (account_id, room_id)
        );
        CREATE TABLE olmstead_message_indices (
            account_id    TEXT NOT NULL,
            session_id    TEXT NOT NULL,
            message_index BIGINT NOT NULL,
            event_id      TEXT NOT NULL,
            origin_ts     BIGINT NOT NULL,
            PRIMARY KEY (account_id, session_id, message_index)
        );
        """,
    ),
    (
        # numbered as in SQLite from here on (1 covers SQLite's 1-5), so that the steps
        # of work done side by side keep their numbers when merged
        6,
        "room events waiting for their key, withheld room keys, the to-device outbox",
        """
        CREATE TABLE olmstead_waiting_room_events (
            account_id  TEXT NOT NULL,
            room_id     TEXT NOT NULL,
            event_id    TEXT NOT NULL,
            session_id  TEXT NOT NULL,
            event       TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            position    BIGINT NOT NULL,
            PRIMARY KEY (account_id, room_id, event_id)
        );
        CREATE INDEX olmstead_waiting_room_events_by_session
            ON olmstead_waiting_room_events (account_id, session_id);
        CREATE TABLE olmstead_withheld_sessions (
            account_id TEXT NOT NULL,
            room_id    TEXT NOT NULL,
            session_id TEXT NOT NULL,
            sender_key TEXT NOT NULL,
            sender     TEXT NOT NULL,
            code       TEXT NOT NULL,
            reason     TEXT NOT NULL,
            PRIMARY KEY (account_id, room_id, session_id, sender_key)
        );
        CREATE TABLE olmstead_outbox (
            account_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            data       TEXT NOT NULL,
            PRIMARY KEY (account_id, request_id)
        );
        """,
    ),
    (
        7,
        "our cross-signing keys (sealed) and the outbox of requests about them",
        """
        CREATE TABLE olmstead_cross_signing (
            account_id TEXT PRIMARY KEY,
            pickle     TEXT NOT NULL,
            state      TEXT NOT NULL
        );
        """,
    ),
    (
        8,
        "other users' cross-signing identities: the pinned one and any change",
        """
        CREATE TABLE olmstead_user_identities (
            account_id TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            data       TEXT NOT NULL,
            PRIMARY KEY (account_id, user_id)
        );
        """,
    ),
]
