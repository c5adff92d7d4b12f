"""Withheld room keys: ``m.room_key.withheld`` notices in, and the error they explain.

A sharing device that will not give us a session's key tells us why with an
``m.room_key.withheld`` to-device event (spec: "Reporting that decryption keys
are withheld", MSC2399). It comes unencrypted (the spec's way; rust-sdk and
js-sdk send it so) or, from some senders, Olm-encrypted. Its content::

    {"algorithm": "m.megolm.v1.aes-sha2", "room_id": …, "session_id": …,
     "sender_key": <the withholding device's Curve25519 key>,
     "code": "m.unverified", "reason": "…"}

``m.no_olm`` is sent once per device, not per session, and may come without
``room_id`` and ``session_id``: it then covers every session of that device.

A notice is taken only where its sender can be checked against what we know:
if the device of ``sender_key`` is known, it must belong to the notice's
sender (an unencrypted notice could otherwise blame any device); an encrypted
notice must name the key it was encrypted with. Notices are kept per (room,
session, sender key); a real key, when it comes, decrypts regardless.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from olmstead import boundary
from olmstead.errors import RemoteProtocolError, RoomKeyWithheld
from olmstead.store.base import CryptoStore, WithheldRecord, is_storable_text

__all__ = ["WITHHELD_CODES", "WITHHELD_TYPE", "find_withheld", "read_withheld"]

log = logging.getLogger(__name__)

WITHHELD_TYPE = "m.room_key.withheld"
#: the codes the spec defines; others are kept as the sender wrote them
WITHHELD_CODES = frozenset(
    {"m.blacklisted", "m.unverified", "m.unauthorised", "m.unavailable", "m.no_olm"}
)
_MEGOLM = "m.megolm.v1.aes-sha2"
#: longest identifier or code taken (room and session IDs are far shorter)
_MAX_ID = 255
#: a reason longer than this is cut: it is shown, not parsed
_MAX_REASON = 1000


async def read_withheld(
    store: CryptoStore,
    sender: Any,
    content: Any,
    *,
    olm_sender_key: str | None = None,
) -> WithheldRecord | None:
    """The notice an ``m.room_key.withheld`` carries, or ``None`` if it is refused.

    ``sender`` is the event's sender, ``content`` its content; ``olm_sender_key``
    the Curve25519 key it was Olm-encrypted with, if it was. Refused (logged,
    nothing stored): a malformed notice, one of another algorithm, one without a
    session that is not ``m.no_olm``, one whose device belongs to another user,
    an encrypted one that names another device's key, and a repeat of a stored one.
    """
    if not isinstance(sender, str) or not isinstance(content, Mapping):
        log.warning("ignored a withheld notice: no sender or content")
        return None
    sender_key, code = content.get("sender_key"), content.get("code")
    room_id, session_id = content.get("room_id", ""), content.get("session_id", "")
    reason = content.get("reason", "")
    if not (
        content.get("algorithm") == _MEGOLM
        and is_storable_text(sender_key)
        and 0 < len(sender_key) <= _MAX_ID
        and is_storable_text(code)
        and 0 < len(code) <= _MAX_ID
        and is_storable_text(room_id)
        and len(room_id) <= _MAX_ID
        and is_storable_text(session_id)
        and len(session_id) <= _MAX_ID
        and is_storable_text(sender)
    ):
        log.warning("ignored a withheld notice from %s: malformed or not Megolm", sender)
        return None
    try:  # the key in its one spelling: devices and notices are found by it
        sender_key = boundary.public_key(sender_key, "sender_key")
    except RemoteProtocolError:
        log.warning("ignored a withheld notice from %s: its sender_key is no key", sender)
        return None
    if code != "m.no_olm" and not (room_id and session_id):
        log.warning("ignored a withheld notice (%s) from %s: it names no session", code, sender)
        return None
    if code == "m.no_olm" and not session_id:
        room_id = ""  # covers every session of the device, in any room
    if olm_sender_key is not None and olm_sender_key != sender_key:
        log.warning("ignored an encrypted withheld notice from %s naming another device", sender)
        return None
    device = await store.get_device_by_curve25519(sender_key)
    if device is not None and device.user_id != sender:
        log.warning("ignored a withheld notice from %s for a device of %s", sender, device.user_id)
        return None
    text = _clean(reason[:_MAX_REASON]) if isinstance(reason, str) else ""
    notice = WithheldRecord(room_id, session_id, sender_key, sender, code, text)
    if notice in await store.get_withheld(room_id, session_id):
        log.debug("ignored a repeated withheld notice from %s", sender)
        return None  # senders resend them: nothing new to keep or tell
    return notice


def _clean(reason: str) -> str:
    """The reason as every store can keep it (it is shown, not parsed)."""
    return reason.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


async def find_withheld(
    store: CryptoStore,
    room_id: str,
    session_id: str,
    sender: str,
    sender_key: Any,
) -> RoomKeyWithheld | None:
    """Why the key of a room event's session was withheld, if a notice said so.

    ``sender_key`` is the (deprecated) ``sender_key`` of the event's content, if
    it has one: then only a notice from that device counts. A notice for the
    session comes before an ``m.no_olm`` that covers all of the device's sessions.
    """
    key = sender_key if isinstance(sender_key, str) else None
    notices = [
        n
        for n in await store.get_withheld(room_id, session_id)
        if key is None or n.sender_key == key
    ]
    if not notices and key is not None:
        notices = [n for n in await store.get_withheld("", "") if n.sender_key == key]
    for notice in notices:
        if notice.sender == sender:
            return RoomKeyWithheld(
                f"{sender} withheld the key of session {session_id} in {room_id} "
                f"({notice.code}: {notice.reason or 'no reason given'})",
                sender,
                session_id,
                notice.code,
                notice.reason,
            )
    return None
