"""Where data from outside enters: shape, type and range checks, before vodozemac or the store.

Every value a homeserver, another user or another device sends is hostile until
one of these functions accepted it. Each names the field it checks, so a refusal
says exactly what was wrong: ``RemoteProtocolError`` for a server's answer or a
sync section, ``MalformedEvent`` for one event (which then fails alone), and
``LocalProtocolError`` for an argument of olmstead's own API.

What the checks guarantee to the code behind them:

- identifiers (user, device, room and event IDs, sync tokens) are ``str``, not
  empty, at most ``MAX_IDENTIFIER_BYTES`` of UTF-8, with no NUL and no lone
  surrogate: every store backend can hold them;
- counts and timestamps are ``int`` (never ``bool``) within ``0 .. MAX_INT``:
  a 64-bit signed column holds them;
- base64 decodes (padded or not) to the length the key type needs before
  vodozemac sees it (vodozemac 0.10 panics on an Ed25519 key of 33 bytes);
- a sync section the spec lets a server leave out may be absent (``None``).

Pure functions, no I/O; the machine and the client call them.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from olmstead.errors import LocalProtocolError, MalformedEvent, RemoteProtocolError

__all__ = [
    "KEY_BYTES",
    "MAX_IDENTIFIER_BYTES",
    "MAX_INT",
    "SyncSections",
    "api_json",
    "api_mapping",
    "api_strings",
    "count",
    "decode_base64",
    "device_lists",
    "event_field",
    "event_identifier",
    "fallback_key_types",
    "identifier",
    "is_identifier",
    "key_counts",
    "mapping",
    "public_key",
    "response_mapping",
    "show",
    "string_list",
    "to_device_events",
]

#: Matrix caps user, room and event IDs at 255 bytes; sync tokens get more room
MAX_IDENTIFIER_BYTES = 4096
#: the largest count or timestamp taken: what a signed 64-bit column holds
MAX_INT = 2**63 - 1
#: Curve25519 and Ed25519 public keys
KEY_BYTES = 32


# --- single values ---------------------------------------------------------------------------


def is_identifier(value: object) -> bool:
    """Whether ``value`` is a string every store can hold as an identifier."""
    if not isinstance(value, str) or not value or "\x00" in value:
        return False
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON can carry one, UTF-8 cannot
        return False
    return len(encoded) <= MAX_IDENTIFIER_BYTES


def identifier(value: object, field: str) -> str:
    """``value`` as an identifier; ``RemoteProtocolError`` naming ``field`` otherwise."""
    if not is_identifier(value):
        raise RemoteProtocolError(f"{field} is not a usable identifier: {show(value)}", field)
    assert isinstance(value, str)
    return value


def count(value: object, field: str) -> int:
    """A non-negative integer up to ``MAX_INT`` (``True`` is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise RemoteProtocolError(f"{field} is not a non-negative integer: {show(value)}", field)
    return value


def mapping(value: object, field: str) -> Mapping[str, Any]:
    """``value`` if it is a JSON object; ``RemoteProtocolError`` naming ``field`` otherwise."""
    if not isinstance(value, Mapping):
        raise RemoteProtocolError(f"{field} is not an object: {show(value)}", field)
    return value


def response_mapping(value: object, endpoint: str) -> Mapping[str, Any]:
    """A server's answer, which the spec makes a JSON object."""
    if not isinstance(value, Mapping):
        raise RemoteProtocolError(
            f"the {endpoint} answer is not a JSON object: {show(value)}", endpoint
        )
    return value


def string_list(value: object, field: str) -> list[str]:
    """A JSON array of identifiers."""
    if not _is_list(value):
        raise RemoteProtocolError(f"{field} is not an array: {show(value)}", field)
    assert isinstance(value, Sequence)
    return [identifier(item, f"{field}[{i}]") for i, item in enumerate(value)]


def decode_base64(value: object, field: str) -> bytes:
    """Standard base64, padded or not (Matrix sends it unpadded)."""
    if not isinstance(value, str) or not value.isascii():
        raise RemoteProtocolError(f"{field} is not a base64 string: {show(value)}", field)
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError(f"{field} is not valid base64: {show(value)}", field) from None


def public_key(value: object, field: str) -> str:
    """A Curve25519 or Ed25519 public key (base64 of exactly 32 bytes), in its one
    canonical spelling: unpadded, as the spec writes keys.

    A key can be spelled several ways (padded, or with other unused trailing bits) and
    olmstead finds sessions and devices by the string, so every key from outside is
    used in this form only: one key, one name.
    """
    raw = decode_base64(value, field)
    if len(raw) != KEY_BYTES:
        raise RemoteProtocolError(
            f"{field} is {len(raw)} bytes, not a {KEY_BYTES}-byte public key", field
        )
    return base64.b64encode(raw).decode().rstrip("=")


# --- one event ------------------------------------------------------------------------------


def event_field(
    event: Mapping[str, Any], path: str, kind: type, *, sender: str | None = None
) -> Any:
    """The value at dotted ``path`` in ``event`` if it is a ``kind``; ``MalformedEvent``
    naming the path otherwise (``bool`` never passes for ``int``)."""
    value: Any = event
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedEvent(
            f"the event's {path} is not {_kind_name(kind)}: {show(value)}", sender, field=path
        )
    if isinstance(value, int) and not 0 <= value <= MAX_INT:
        raise MalformedEvent(f"the event's {path} is out of range: {value}", sender, field=path)
    return value


def event_identifier(event: Mapping[str, Any], path: str, *, sender: str | None = None) -> str:
    """An identifier inside an event; ``MalformedEvent`` naming the path otherwise."""
    value = event_field(event, path, str, sender=sender)
    if not is_identifier(value):
        raise MalformedEvent(
            f"the event's {path} is not a usable identifier: {show(value)}", sender, field=path
        )
    assert isinstance(value, str)
    return value


# --- sync sections ---------------------------------------------------------------------------


def key_counts(value: object, field: str = "device_one_time_keys_count") -> int | None:
    """Our ``signed_curve25519`` count from ``device_one_time_keys_count`` (or a
    ``/keys/upload`` answer's ``one_time_key_counts``); an absent algorithm is 0."""
    if value is None:
        return None
    counts = mapping(value, field)
    return count(counts.get("signed_curve25519", 0), f"{field}.signed_curve25519")


def fallback_key_types(
    value: object, field: str = "device_unused_fallback_key_types"
) -> list[str] | None:
    """``device_unused_fallback_key_types``: ``None`` if absent, else a list of algorithms."""
    if value is None:
        return None
    return string_list(value, field)


def device_lists(value: object, field: str = "device_lists") -> tuple[list[str], list[str]] | None:
    """``device_lists``: the ``changed`` and ``left`` user IDs (either may be absent)."""
    if value is None:
        return None
    lists = mapping(value, field)
    changed, left = lists.get("changed"), lists.get("left")
    return (
        [] if changed is None else string_list(changed, f"{field}.changed"),
        [] if left is None else string_list(left, f"{field}.left"),
    )


def to_device_events(value: object, field: str = "to_device.events") -> list[Any]:
    """The array of to-device events; each item is checked on its own later."""
    if value is None:
        return []
    if not _is_list(value):
        raise RemoteProtocolError(f"{field} is not an array: {show(value)}", field)
    assert isinstance(value, Sequence)
    return list(value)


@dataclass
class SyncSections:
    """The key-related sections of one ``/sync`` answer, each checked on its own.

    ``read`` never raises: a section of the wrong shape is left out (as if the
    server had not sent it) and its ``RemoteProtocolError`` listed in ``problems``,
    so one bad section does not cost the rest of the sync.
    """

    one_time_key_counts: Mapping[str, Any] | None = None
    unused_fallback_key_types: list[str] | None = None
    device_lists: Mapping[str, Any] | None = None
    to_device_events: list[Any] = field(default_factory=list)
    next_batch: str | None = None
    problems: list[RemoteProtocolError] = field(default_factory=list)

    @classmethod
    def read(cls, answer: Mapping[str, Any]) -> SyncSections:
        sections = cls()
        counts = answer.get("device_one_time_keys_count")
        fallback = answer.get(
            "device_unused_fallback_key_types",
            answer.get("org.matrix.msc2732.device_unused_fallback_key_types"),
        )
        lists = answer.get("device_lists")
        to_device = answer.get("to_device")
        next_batch = answer.get("next_batch")
        try:
            key_counts(counts)
            sections.one_time_key_counts = counts
        except RemoteProtocolError as error:
            sections.problems.append(error)
        try:
            sections.unused_fallback_key_types = fallback_key_types(fallback)
        except RemoteProtocolError as error:
            sections.problems.append(error)
        try:
            device_lists(lists)
            sections.device_lists = lists
        except RemoteProtocolError as error:
            sections.problems.append(error)
        try:
            events = None if to_device is None else mapping(to_device, "to_device").get("events")
            sections.to_device_events = to_device_events(events)
        except RemoteProtocolError as error:
            sections.problems.append(error)
        try:
            sections.next_batch = identifier(next_batch, "next_batch")
        except RemoteProtocolError as error:
            sections.problems.append(error)
        return sections


# --- arguments of olmstead's own API --------------------------------------------------------


def api_strings(value: object, name: str) -> list[str]:
    """An iterable of strings passed to a public method (``LocalProtocolError`` otherwise)."""
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__iter__"):
        raise LocalProtocolError(f"{name} must be an iterable of strings, not {show(value)}")
    items = list(value)
    bad = [item for item in items if not is_identifier(item)]
    if bad:
        raise LocalProtocolError(f"{name} holds a value that is not an identifier: {show(bad[0])}")
    return items


def api_json(value: object, name: str) -> bytes:
    """Compact JSON of an application's content, ASCII-escaped (a lone surrogate in text
    cut mid-emoji is valid JSON, not valid UTF-8); ``LocalProtocolError`` if it is not
    JSON (an object of another type, a cycle, nesting deeper than Python recurses)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(f"{name} is not JSON: {exc}") from None


def api_mapping(value: object, name: str) -> Mapping[str, Any]:
    """A mapping passed to a public method (``LocalProtocolError`` otherwise)."""
    if not isinstance(value, Mapping):
        raise LocalProtocolError(f"{name} must be a mapping, not {show(value)}")
    return value


# --- helpers ---------------------------------------------------------------------------------


def _is_list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", Mapping: "an object", list: "an array"}.get(
        kind, kind.__name__
    )


def show(value: object) -> str:
    """A short, safe rendering of a hostile value for a message."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ can only come from our own caller; still never fail
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."
