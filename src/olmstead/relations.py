"""Contents for events that relate to others: replies, thread replies, edits, reactions.

The shapes are the spec's ("Rich replies", "Threading", "Event replacements",
"Event annotations and reactions"). In an encrypted room ``m.relates_to`` is also
put in the clear on the ``m.room.encrypted`` content (``OlmMachine.encrypt_room_events``
does it), so the server aggregates edits and reactions and lists threads as it does
for unencrypted rooms. Each function returns a new content and changes nothing given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from olmstead.errors import LocalProtocolError

__all__ = ["edit_content", "reaction_content", "reply_content", "thread_reply_content"]


def _event_id(event_id: str) -> str:
    if not isinstance(event_id, str) or not event_id.startswith("$"):
        raise LocalProtocolError(f"{event_id!r} is not an event ID (they start with '$')")
    return event_id


def _message(content: Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"msgtype": "m.text", "body": content}
    return dict(content)


def reply_content(in_reply_to: str, content: Mapping[str, Any] | str) -> dict[str, Any]:
    """``content`` (or a text) as a reply to event ``in_reply_to``:
    ``m.relates_to: {"m.in_reply_to": {"event_id": …}}``."""
    message = _message(content)
    message["m.relates_to"] = {"m.in_reply_to": {"event_id": _event_id(in_reply_to)}}
    return message


def thread_reply_content(
    thread_root: str, content: Mapping[str, Any] | str, *, latest_event: str | None = None
) -> dict[str, Any]:
    """``content`` in the thread rooted at ``thread_root``: ``rel_type: m.thread``, with
    the reply fallback to ``latest_event`` (the thread's last event the sender saw;
    default the root) that clients without threads show (``is_falling_back: true``)."""
    message = _message(content)
    message["m.relates_to"] = {
        "rel_type": "m.thread",
        "event_id": _event_id(thread_root),
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": _event_id(latest_event or thread_root)},
    }
    return message


def edit_content(original: str, new_content: Mapping[str, Any] | str) -> dict[str, Any]:
    """An edit of event ``original`` to ``new_content``: ``m.new_content`` and
    ``rel_type: m.replace``; the outer body is ``* <new body>`` for clients without
    edits. ``new_content`` carries no relation of its own (the spec ignores one)."""
    replacement = _message(new_content)
    replacement.pop("m.relates_to", None)
    message = {k: v for k, v in replacement.items() if k != "m.new_content"}
    if isinstance(message.get("body"), str):
        message["body"] = f"* {message['body']}"
    message["m.new_content"] = replacement
    message["m.relates_to"] = {"rel_type": "m.replace", "event_id": _event_id(original)}
    return message


def reaction_content(target: str, key: str) -> dict[str, Any]:
    """An ``m.reaction`` content: ``rel_type: m.annotation`` on ``target`` with ``key``
    (usually one emoji)."""
    if not isinstance(key, str) or not key:
        raise LocalProtocolError("a reaction needs a non-empty key, such as an emoji")
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": _event_id(target), "key": key}}
