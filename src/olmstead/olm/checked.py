"""The one place vodozemac is called with data from outside.

The binding raises ``ValueError`` subclasses for most bad input, but not for all
of it: an out-of-range integer raises ``OverflowError``, and some inputs make the
Rust code panic, which pyo3 turns into ``pyo3_runtime.PanicException`` — a
``BaseException``, so it passes through an application's ``except Exception``
(vodozemac 0.10 panics on an Ed25519 key of exactly 33 bytes). Every function
here checks what it can before the call (``olmstead.boundary``) and turns any
failure of the call itself, panics included, into olmstead's own errors; only
interpreter exits, interrupts and task cancellation pass through.

Callers pass ``error``: the olmstead error to raise, built from a message, so
that a broken key in a ``/keys/query`` answer is a ``RemoteProtocolError`` and a
broken Olm message a ``MalformedEvent``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import vodozemac

from olmstead import boundary
from olmstead.errors import OlmsteadError, RemoteProtocolError

__all__ = [
    "ErrorFactory",
    "binding",
    "create_inbound_session",
    "create_outbound_session",
    "curve25519_key",
    "ed25519_key",
    "group_decrypt",
    "inbound_group_session",
    "megolm_message",
    "olm_message",
    "pre_key_session_id",
    "session_decrypt",
    "verify_signature",
]

T = TypeVar("T")
ErrorFactory = Callable[[str], OlmsteadError]

#: what is never caught: the interpreter or the event loop asking us to stop
_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)


def _remote(message: str) -> OlmsteadError:
    return RemoteProtocolError(message)


@contextmanager
def binding(what: str, error: ErrorFactory = _remote) -> Iterator[None]:
    """Run a vodozemac call; any failure of it becomes ``error(message)``."""
    try:
        yield
    except _PASS_THROUGH:
        raise
    except OlmsteadError:
        raise
    except BaseException as exc:  # PanicException is a BaseException
        raise error(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from None


def curve25519_key(value: object, field: str) -> vodozemac.Curve25519PublicKey:
    """A Curve25519 public key from base64 (``RemoteProtocolError`` naming ``field``)."""
    text = boundary.public_key(value, field)
    with binding(f"{field} is not a Curve25519 key", _field_error(field)):
        return vodozemac.Curve25519PublicKey.from_base64(text)
    raise AssertionError("unreachable")  # pragma: no cover


def ed25519_key(value: object, field: str) -> vodozemac.Ed25519PublicKey:
    """An Ed25519 public key from base64; its length is checked before vodozemac sees it."""
    text = boundary.public_key(value, field)
    with binding(f"{field} is not an Ed25519 key", _field_error(field)):
        return vodozemac.Ed25519PublicKey.from_base64(text)
    raise AssertionError("unreachable")  # pragma: no cover


def verify_signature(key: object, message: bytes, signature: object) -> bool:
    """Whether ``signature`` (base64) by Ed25519 ``key`` (base64) signs ``message``.

    Anything malformed is simply not a valid signature.
    """
    try:
        public = ed25519_key(key, "key")
        raw = boundary.decode_base64(signature, "signature")
        if len(raw) != 64:
            return False
        with binding("signature"):
            public.verify_signature(message, vodozemac.Ed25519Signature.from_base64(str(signature)))
    except OlmsteadError:
        return False
    return True


def olm_message(message_type: int, body: bytes, error: ErrorFactory) -> vodozemac.AnyOlmMessage:
    """An Olm message from its type (0: pre-key, 1: normal) and body bytes."""
    if message_type not in (0, 1):
        raise error(f"the Olm message type is {message_type!r}, not 0 or 1")
    with binding("not an Olm message", error):
        return vodozemac.AnyOlmMessage.from_parts(message_type, body)
    raise AssertionError("unreachable")  # pragma: no cover


def pre_key_session_id(message: vodozemac.AnyOlmMessage) -> str | None:
    """The session ID a pre-key message belongs to; ``None`` for a normal message."""
    with binding("an Olm message"):
        pre_key = message.to_pre_key()
        if pre_key is None:
            return None
        session_id: str = pre_key.session_id()
        return session_id
    raise AssertionError("unreachable")  # pragma: no cover


def session_decrypt(session: vodozemac.Session, message: vodozemac.AnyOlmMessage) -> bytes | None:
    """The plaintext, or ``None`` if this session does not decrypt the message."""
    try:
        with binding("decrypt"):
            return session.decrypt(message)
    except OlmsteadError:
        return None
    raise AssertionError("unreachable")  # pragma: no cover


def create_inbound_session(
    account: vodozemac.Account,
    sender_key: vodozemac.Curve25519PublicKey,
    message: vodozemac.AnyOlmMessage,
    error: ErrorFactory,
) -> tuple[vodozemac.Session, bytes]:
    """A new inbound session from a pre-key message, and its plaintext.

    On success vodozemac removes the one-time key the message used from
    ``account``: pass a copy unless that removal is meant to be kept.
    """
    with binding("no new Olm session", error):
        pre_key = message.to_pre_key()
        if pre_key is None:
            raise error("not a pre-key message")
        return account.create_inbound_session(sender_key, pre_key)
    raise AssertionError("unreachable")  # pragma: no cover


def create_outbound_session(
    account: vodozemac.Account, identity_key: object, one_time_key: object, field: str
) -> vodozemac.Session:
    """A new outbound session with a device, from its identity key and a claimed key."""
    identity = curve25519_key(identity_key, f"{field}.curve25519")
    one_time = curve25519_key(one_time_key, f"{field}.key")
    with binding(f"no Olm session from {field}", _field_error(field)):
        return account.create_outbound_session(identity, one_time)
    raise AssertionError("unreachable")  # pragma: no cover


def inbound_group_session(
    session_key: object, error: ErrorFactory
) -> vodozemac.InboundGroupSession:
    """An inbound Megolm session from a room key's ``session_key``."""
    if not isinstance(session_key, str) or not session_key.isascii():
        raise error("the session_key is not a base64 string")
    with binding("the session_key is not a Megolm session key", error):
        return vodozemac.InboundGroupSession(vodozemac.SessionKey(session_key))
    raise AssertionError("unreachable")  # pragma: no cover


def megolm_message(ciphertext: object, error: ErrorFactory) -> vodozemac.MegolmMessage:
    """A Megolm message from its base64 ciphertext."""
    if not isinstance(ciphertext, str) or not ciphertext.isascii():
        raise error("the ciphertext is not a base64 string")
    with binding("the ciphertext is not a Megolm message", error):
        return vodozemac.MegolmMessage.from_base64(ciphertext)
    raise AssertionError("unreachable")  # pragma: no cover


def group_decrypt(
    session: vodozemac.InboundGroupSession, message: vodozemac.MegolmMessage, error: ErrorFactory
) -> tuple[bytes, int]:
    """The plaintext and message index of a Megolm message."""
    with binding("it does not decrypt", error):
        decrypted = session.decrypt(message)
        return decrypted.plaintext, decrypted.message_index
    raise AssertionError("unreachable")  # pragma: no cover


def _field_error(field: str) -> ErrorFactory:
    return lambda message: RemoteProtocolError(message, field)


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = ""
    return text.splitlines()[0][:200] if text else ""
