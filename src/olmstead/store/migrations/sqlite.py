"""The SQLite schema, as numbered steps. ``PRAGMA user_version`` records the last applied.

Numbers only grow; they are handed out per change, so a gap (a step another branch
adds) is allowed: each step runs once, in order, on a store below its number.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "key check, account, writer lease",
        """
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        CREATE TABLE account (
            id        INTEGER PRIMARY KEY CHECK (id = 1),
            user_id   TEXT NOT NULL,
            device_id TEXT NOT NULL,
            pickle    TEXT NOT NULL,
            state     TEXT NOT NULL
        );
        CREATE TABLE lease_lock (
            name        TEXT PRIMARY KEY,
            holder      TEXT NOT NULL,
            acquired_at REAL NOT NULL,
            expires_at  REAL NOT NULL,
            generation  INTEGER NOT NULL
        );
        """,
    ),
    (
        2,
        "named values (sync token and other small state)",
        """
        CREATE TABLE kv (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """,
    ),
    (
        3,
        "other devices and the users whose devices are tracked",
        """
        CREATE TABLE devices (
            user_id    TEXT NOT NULL,
            device_id  TEXT NOT NULL,
            curve25519 TEXT NOT NULL,
            data       TEXT NOT NULL,
            PRIMARY KEY (user_id, device_id)
        );
        CREATE INDEX devices_by_curve25519 ON devices (curve25519);
        CREATE TABLE tracked_users (
            user_id  TEXT PRIMARY KEY,
            outdated INTEGER NOT NULL
        );
        """,
    ),
    (
        4,
        "Olm sessions, found by the sender's Curve25519 key",
        """
        CREATE TABLE olm_sessions (
            sender_key TEXT NOT NULL,
            session_id TEXT NOT NULL,
            pickle     TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_used  REAL NOT NULL,
            PRIMARY KEY (sender_key, session_id)
        );
        """,
    ),
    (
        5,
        "Megolm sessions, inbound and outbound, and the message indices seen",
        """
        CREATE TABLE inbound_group_sessions (
            room_id     TEXT NOT NULL,
            session_id  TEXT NOT NULL,
            sender_key  TEXT NOT NULL,
            signing_key TEXT NOT NULL,
            pickle      TEXT NOT NULL,
            PRIMARY KEY (room_id, session_id)
        );
        CREATE TABLE outbound_group_sessions (
            room_id TEXT PRIMARY KEY,
            pickle  TEXT NOT NULL,
            state   TEXT NOT NULL
        );
        CREATE TABLE megolm_message_indices (
            session_id    TEXT NOT NULL,
            message_index INTEGER NOT NULL,
            event_id      TEXT NOT NULL,
            origin_ts     INTEGER NOT NULL,
            PRIMARY KEY (session_id, message_index)
        );
        """,
    ),
    (
        6,
        "room events waiting for their key, withheld room keys, the to-device outbox",
        """
        CREATE TABLE waiting_room_events (
            room_id     TEXT NOT NULL,
            event_id    TEXT NOT NULL,
            session_id  TEXT NOT NULL,
            event       TEXT NOT NULL,
            received_at REAL NOT NULL,
            position    INTEGER NOT NULL,
            PRIMARY KEY (room_id, event_id)
        );
        CREATE INDEX waiting_room_events_by_session ON waiting_room_events (session_id);
        CREATE TABLE withheld_sessions (
            room_id    TEXT NOT NULL,
            session_id TEXT NOT NULL,
            sender_key TEXT NOT NULL,
            sender     TEXT NOT NULL,
            code       TEXT NOT NULL,
            reason     TEXT NOT NULL,
            PRIMARY KEY (room_id, session_id, sender_key)
        );
        CREATE TABLE outbox (
            request_id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            data       TEXT NOT NULL
        );
        """,
    ),
    (
        7,
        "our cross-signing keys (sealed) and the outbox of requests about them",
        """
        CREATE TABLE cross_signing (
            id     INTEGER PRIMARY KEY CHECK (id = 1),
            pickle TEXT NOT NULL,
            state  TEXT NOT NULL
        );
        """,
    ),
    (
        8,
        "other users' cross-signing identities: the pinned one and any change",
        """
        CREATE TABLE user_identities (
            user_id TEXT PRIMARY KEY,
            data    TEXT NOT NULL
        );
        """,
    ),
]
