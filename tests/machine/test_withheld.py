"""Withheld room keys (m.room_key.withheld): kept, checked, explained, and overruled by a key."""

from __future__ import annotations

from typing import Any

import pytest

from olmstead.errors import RoomKeyWithheld, UnknownRoomKey
from olmstead.requests import ToDeviceRequest
from tests.conftest import Backend
from tests.machine.pair import Peer, deliveries, learn_devices, new_peer, open_session
from tests.machine.test_keys_upload import open_machine
from tests.machine.test_megolm import ALICE, BOB, CAROL, ROOM, Timeline

WITHHELD_CONTENT = {
    "algorithm": "m.megolm.v1.aes-sha2",
    "room_id": ROOM,
    "session_id": "session",
    "sender_key": "YWxpY2UgZGV2aWNlIGtleSwgdGhpcnR5LXR3byBiISE",  # 32 bytes, as a key is
    "code": "m.unverified",
    "reason": "not verified",
}
CODES = ["m.blacklisted", "m.unverified", "m.unauthorised", "m.unavailable", "m.no_olm"]


async def held_back() -> tuple[Peer, Peer, list[ToDeviceRequest], dict[str, Any]]:
    """Alice shares a room key with Bob but it does not reach him; her event does."""
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    await open_session(alice, bob)
    await learn_devices(bob, alice)
    requests = await alice.machine.share_room_key(ROOM, [BOB])
    content = await alice.machine.encrypt_room_event(ROOM, "m.text", {"body": "secret"})
    return alice, bob, requests, Timeline().event(alice, content)


def notice(
    sender: Peer, event: dict[str, Any], code: str, *, sender_user: str | None = None, **extra: Any
) -> dict[str, Any]:
    content = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": ROOM,
        "session_id": event["content"]["session_id"],
        "sender_key": sender.machine.identity_keys["curve25519"],
        "code": code,
        "reason": f"because {code}",
        **extra,
    }
    content = {k: v for k, v in content.items() if v is not None}
    return {
        "type": "m.room_key.withheld",
        "sender": sender_user or sender.user_id,
        "content": content,
    }


@pytest.mark.parametrize("code", CODES)
async def test_each_withheld_code_explains_the_event(code: str) -> None:
    alice, bob, _requests, event = await held_back()
    before = await bob.machine.decrypt_room_events(ROOM, [event])
    assert isinstance(before[0], UnknownRoomKey)

    (passed,) = await bob.machine.receive_sync_changes(
        to_device_events=[notice(alice, event, code)]
    )
    assert passed == notice(alice, event, code)  # handed on as it came
    with pytest.raises(RoomKeyWithheld) as caught:
        await bob.machine.decrypt_room_event(ROOM, event)
    assert (caught.value.code, caught.value.reason) == (code, f"because {code}")
    assert caught.value.session_id == event["content"]["session_id"]
    assert caught.value.sender == ALICE
    assert code in str(caught.value)


async def test_m_no_olm_without_a_session_covers_every_session_of_the_device() -> None:
    alice, bob, _requests, event = await held_back()
    sent = notice(alice, event, "m.no_olm", room_id=None, session_id=None)
    assert "session_id" not in sent["content"]
    await bob.machine.receive_sync_changes(to_device_events=[sent])
    with pytest.raises(RoomKeyWithheld) as caught:
        await bob.machine.decrypt_room_event(ROOM, event)
    assert caught.value.code == "m.no_olm"


async def test_a_later_real_key_wins_and_the_waiting_event_is_delivered() -> None:
    alice, bob, requests, event = await held_back()
    result = await bob.machine.decrypt_room_events(ROOM, [event])
    assert isinstance(result[0], UnknownRoomKey)
    await bob.machine.commit_deliveries(keep=[(ROOM, event)])
    assert await bob.machine.retry_waiting_events() == []

    # the notice: the kept event is reported again, with the reason, and still kept
    await bob.machine.receive_sync_changes(to_device_events=[notice(alice, event, "m.unavailable")])
    (told,) = await bob.machine.retry_waiting_events()
    assert isinstance(told.result, RoomKeyWithheld)
    assert told.result.code == "m.unavailable"
    assert told.result.final is False
    assert not told.settles
    await bob.machine.commit_deliveries()
    assert await bob.machine.retry_waiting_events() == []  # told once

    # the key after all
    for request in requests:
        await bob.machine.receive_sync_changes(to_device_events=[deliveries(request, alice, bob)])
    (delivered,) = await bob.machine.retry_waiting_events()
    assert delivered.settles
    assert not isinstance(delivered.result, Exception)
    assert delivered.result.content == {"body": "secret"}
    await bob.machine.commit_deliveries(settled=[(ROOM, delivered.event_id)])
    assert await bob.machine.store.get_waiting_events() == []
    assert (await bob.machine.decrypt_room_event(ROOM, event)).content == {"body": "secret"}


async def test_a_notice_naming_another_user_s_device_is_refused() -> None:
    alice, bob, _requests, event = await held_back()
    carol = await new_peer(CAROL, "CAROLDEV")
    # carol claims that alice's device withholds the key: bob knows that device is alice's
    forged = notice(alice, event, "m.blacklisted", sender_user=carol.user_id)
    await bob.machine.receive_sync_changes(to_device_events=[forged])
    assert await bob.machine.store.get_withheld(ROOM, event["content"]["session_id"]) == []
    with pytest.raises(UnknownRoomKey):
        await bob.machine.decrypt_room_event(ROOM, event)


async def test_a_notice_from_an_unknown_device_does_not_explain_another_sender_s_event() -> None:
    _alice, bob, _requests, event = await held_back()
    carol = await new_peer(CAROL, "CAROLDEV")  # bob does not know carol's device
    forged = notice(carol, event, "m.blacklisted")  # stored: it cannot be checked ...
    forged["content"]["sender_key"] = "carolsdevicekey"
    await bob.machine.receive_sync_changes(to_device_events=[forged])
    with pytest.raises(UnknownRoomKey):  # ... but alice's event is not carol's to explain
        await bob.machine.decrypt_room_event(ROOM, event)


async def test_a_notice_from_another_user_does_not_explain_an_event_without_sender_key() -> None:
    _alice, bob, _requests, event = await held_back()
    del event["content"]["sender_key"]  # deprecated: newer senders leave it out
    carol = await new_peer(CAROL, "CAROLDEV")  # bob does not know carol's device
    await bob.machine.receive_sync_changes(to_device_events=[notice(carol, event, "m.blacklisted")])
    with pytest.raises(UnknownRoomKey):  # the session is alice's: carol cannot explain it
        await bob.machine.decrypt_room_event(ROOM, event)


@pytest.mark.parametrize(
    "change",
    [
        {"code": None},
        {"code": 7},
        {"sender_key": None},
        {"sender_key": ""},
        {"session_id": None},  # only m.no_olm may leave the session out
        {"algorithm": "m.olm.v1.curve25519-aes-sha2"},
        {"room_id": ["!list:x"]},
        {"code": "x" * 300},
    ],
)
async def test_malformed_notices_are_dropped(change: dict[str, Any]) -> None:
    alice, bob, _requests, event = await held_back()
    sent = notice(alice, event, "m.unavailable")
    for key, value in change.items():
        if value is None:
            sent["content"].pop(key)
        else:
            sent["content"][key] = value
    (passed,) = await bob.machine.receive_sync_changes(to_device_events=[sent])
    assert passed is sent
    with pytest.raises(UnknownRoomKey):
        await bob.machine.decrypt_room_event(ROOM, event)


async def test_an_encrypted_notice_counts_and_must_name_its_own_device() -> None:
    alice, bob, _requests, event = await held_back()
    own = notice(alice, event, "m.unverified")["content"]
    other = {**own, "sender_key": "someone-elses-key"}
    devices = (await alice.machine.get_user_devices(BOB)).values()
    for content in (other, own):
        request, _ = await alice.machine.encrypt_to_devices(devices, "m.room_key.withheld", content)
        assert request is not None
        await bob.machine.receive_sync_changes(to_device_events=[deliveries(request, alice, bob)])
        if content is other:
            with pytest.raises(UnknownRoomKey):
                await bob.machine.decrypt_room_event(ROOM, event)
            assert await bob.machine.store.get_withheld(ROOM, own["session_id"]) == []
    with pytest.raises(RoomKeyWithheld) as caught:
        await bob.machine.decrypt_room_event(ROOM, event)
    assert caught.value.code == "m.unverified"


@pytest.mark.parametrize(
    "change",
    [
        {"code": "m.unverified\x00"},  # JSON allows NUL; PostgreSQL text does not
        {"session_id": "\ud800session"},  # a lone surrogate: not UTF-8, no store keeps it
        {"room_id": "!room\x00:example.org"},
        {"sender_key": "key\udc00"},
    ],
)
async def test_a_notice_no_store_can_keep_is_refused_and_the_sync_commits(
    backend: Backend, change: dict[str, Any]
) -> None:
    bob = await open_machine(backend)
    content = {**WITHHELD_CONTENT, **change}
    event = {"type": "m.room_key.withheld", "sender": ALICE, "content": content}
    (passed,) = await bob.receive_sync_changes(to_device_events=[event], sync_token="s1")
    assert passed is event
    assert await bob.store.get_value("sync_token") == "s1"  # one bad event stops nothing
    assert await bob.store.get_withheld(ROOM, "session") == []  # refused: nothing stored


async def test_a_reason_no_store_can_keep_is_cleaned(backend: Backend) -> None:
    bob = await open_machine(backend)
    content = {**WITHHELD_CONTENT, "reason": "nul\x00 and \ud800 surrogate"}
    event = {"type": "m.room_key.withheld", "sender": ALICE, "content": content}
    await bob.receive_sync_changes(to_device_events=[event], sync_token="s1")
    assert await bob.store.get_value("sync_token") == "s1"
    (kept,) = await bob.store.get_withheld(ROOM, "session")
    assert kept.reason == "nul and ? surrogate"


async def test_a_kept_event_is_told_of_its_notice_once_whoever_sends_more() -> None:
    alice, bob, _requests, event = await held_back()
    await bob.machine.commit_deliveries(keep=[(ROOM, event)])
    assert await bob.machine.retry_waiting_events() == []
    await bob.machine.receive_sync_changes(to_device_events=[notice(alice, event, "m.unavailable")])
    (told,) = await bob.machine.retry_waiting_events()
    assert isinstance(told.result, RoomKeyWithheld)
    await bob.machine.commit_deliveries()

    carol = await new_peer(CAROL, "CAROLDEV")  # bob does not know carol's device
    again = [
        notice(alice, event, "m.unavailable"),  # the same notice, repeated
        notice(carol, event, "m.no_olm", room_id=None, session_id=None),  # a stranger's
        notice(carol, event, "m.blacklisted"),  # a stranger's, for alice's session
    ]
    for sent in again:
        await bob.machine.receive_sync_changes(to_device_events=[sent])
        assert await bob.machine.retry_waiting_events() == []  # nothing new for the event
        await bob.machine.commit_deliveries()

    await bob.machine.receive_sync_changes(to_device_events=[notice(alice, event, "m.unverified")])
    (changed,) = await bob.machine.retry_waiting_events()  # alice changed her mind: told
    assert isinstance(changed.result, RoomKeyWithheld)
    assert changed.result.code == "m.unverified"
