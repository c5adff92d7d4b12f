"""The store contract: every backend must pass every test here."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import vodozemac

from olmstead import (
    Changes,
    LeaseSettings,
    PickleKey,
    StoreLocked,
    StoreLockLost,
    WrongPickleKey,
)
from olmstead.cross_signing.record import CrossSigningRecord
from olmstead.identities.device import Device
from olmstead.identities.user_identity import UserIdentity, check_identity
from olmstead.olm import account as own
from olmstead.store import AccountRecord
from olmstead.store.base import (
    InboundGroupSessionRecord,
    MessageIndex,
    OlmSessionRecord,
    OutboundGroupSessionRecord,
)
from tests.conftest import KEY, OTHER_KEY, Backend, pause
from tests.cross_signing_keys import CrossSigningIdentity
from tests.store.secrets_fixture import assert_intact, fill


def new_record() -> AccountRecord:
    account = vodozemac.Account()
    account.generate_one_time_keys(3)
    return AccountRecord("@bot:example.org", "BOTDEVICE", account, server_key_count=7)


async def test_new_store_is_empty(backend: Backend) -> None:
    store = await backend.open()
    assert await store.load_account() is None
    assert await store.get_value("sync_token") is None


async def test_account_round_trips(backend: Backend) -> None:
    store = await backend.open()
    record = new_record()
    record.shared, record.fallback_supported, record.fallback_created_at = True, True, 1234.5
    await store.save_changes(Changes(account=record))
    await store.close()

    loaded = await (await backend.open()).load_account()
    assert loaded is not None
    assert (loaded.user_id, loaded.device_id) == ("@bot:example.org", "BOTDEVICE")
    assert loaded.account.ed25519_key == record.account.ed25519_key
    assert loaded.account.curve25519_key == record.account.curve25519_key
    assert set(loaded.account.one_time_keys) == set(record.account.one_time_keys)
    assert (loaded.shared, loaded.server_key_count) == (True, 7)
    assert (loaded.fallback_supported, loaded.fallback_created_at) == (True, 1234.5)


async def test_saved_state_does_not_follow_later_changes(backend: Backend) -> None:
    store = await backend.open()
    record = new_record()
    await store.save_changes(Changes(account=record))
    record.account.mark_keys_as_published()
    record.shared = True
    loaded = await store.load_account()
    assert loaded is not None
    assert len(loaded.account.one_time_keys) == 3
    assert loaded.shared is False


async def test_values_set_replace_delete(backend: Backend) -> None:
    store = await backend.open()
    await store.save_changes(Changes(values={"sync_token": "s1", "other": "x"}))
    await store.save_changes(Changes(values={"sync_token": "s2", "other": None}))
    assert await store.get_value("sync_token") == "s2"
    assert await store.get_value("other") is None


async def test_wrong_key_names_both_fingerprints(backend: Backend) -> None:
    store = await backend.open(KEY)
    await store.save_changes(Changes(account=new_record()))
    expected = store.fingerprint
    await store.close()

    with pytest.raises(WrongPickleKey) as caught:
        await backend.open(OTHER_KEY)
    assert caught.value.expected == expected
    assert caught.value.given != expected
    assert expected in str(caught.value)
    assert caught.value.given in str(caught.value)
    # the right key still opens it, with the account intact
    assert await (await backend.open(KEY)).load_account() is not None


async def test_passphrase_keys_are_stretched_and_checked(backend: Backend) -> None:
    store = await backend.open(PickleKey("mautrix.bridge.e2ee"))
    await store.save_changes(Changes(account=new_record()))
    fingerprint = store.fingerprint
    await store.close()
    with pytest.raises(WrongPickleKey):
        await backend.open(PickleKey("mautrix.bridge.e2ef"))
    with pytest.raises(WrongPickleKey):  # the raw bytes of the string are another key
        await backend.open(PickleKey(b"mautrix.bridge.e2ee".ljust(32, b"\0")))
    reopened = await backend.open(PickleKey("mautrix.bridge.e2ee"))
    assert reopened.fingerprint == fingerprint


async def test_second_handle_waits_then_reports_holder(backend: Backend) -> None:
    await backend.open(holder="first-holder")
    with pytest.raises(StoreLocked) as caught:
        await backend.open(holder="second-holder")
    assert caught.value.holder == "first-holder"
    assert "first-holder" in str(caught.value)
    assert caught.value.since <= caught.value.expires


async def test_second_handle_proceeds_once_first_closes(backend: Backend) -> None:
    first = await backend.open(holder="first-holder")
    await first.save_changes(Changes(values={"written_by": "first"}))
    patient = LeaseSettings(duration=0.6, renew_every=0.2, wait=5.0, poll=0.02)
    waiter = asyncio.create_task(backend.open(lease=patient, holder="second-holder"))
    await asyncio.sleep(0.3)
    assert not waiter.done()  # still waiting: the first renews its lease
    await first.close()
    second = await waiter
    assert second.generation == 2  # started at 1, passed to one new holder
    assert await second.get_value("written_by") == "first"


async def test_lease_renewal_keeps_others_out_past_its_duration(backend: Backend) -> None:
    await backend.open(holder="first-holder")
    await asyncio.sleep(1.0)  # longer than the 0.6 s lease: only renewal keeps it
    with pytest.raises(StoreLocked):
        await backend.open(holder="second-holder")


async def test_expired_holder_is_fenced_off(backend: Backend) -> None:
    first = await backend.open(holder="first-holder")
    pause(first)
    await backend.expire_lease()
    second = await backend.open(holder="second-holder")
    await second.save_changes(Changes(values={"owner": "second"}))

    with pytest.raises(StoreLockLost):
        await first.save_changes(Changes(values={"owner": "first", "extra": "x"}))
    assert await second.get_value("owner") == "second"
    assert await second.get_value("extra") is None  # all or nothing: no part landed


def a_device(user_id: str = "@alice:example.org", device_id: str = "ALICEDEV") -> Device:
    account = vodozemac.Account()
    return Device.from_keys(user_id, device_id, own.device_keys(account, user_id, device_id))


async def test_devices_round_trip_by_user_and_by_curve25519(backend: Backend) -> None:
    store = await backend.open()
    phone, laptop = a_device(device_id="PHONE"), a_device(device_id="LAPTOP")
    bob = a_device("@bob:example.org", "BOBDEV")
    await store.save_changes(Changes(devices=[phone, laptop, bob]))
    await store.close()

    store = await backend.open()
    assert await store.get_devices("@alice:example.org") == {"PHONE": phone, "LAPTOP": laptop}
    assert await store.get_device_by_curve25519(bob.curve25519) == bob
    assert await store.get_device_by_curve25519("no such key") is None
    assert await store.get_devices("@nobody:example.org") == {}

    await store.save_changes(Changes(devices=[phone.marked_deleted()]))
    assert (await store.get_devices("@alice:example.org"))["PHONE"].deleted


def an_identity(user_id: str, *, own: bool = False) -> UserIdentity:
    keys = CrossSigningIdentity(user_id)
    return check_identity(
        user_id,
        keys.master_key(),
        keys.self_signing_key(),
        keys.user_signing_key() if own else None,
    )


async def test_user_identities_round_trip_with_a_pending_change(backend: Backend) -> None:
    store = await backend.open()
    bob, carol = an_identity("@bob:x"), an_identity("@carol:x", own=True)
    await store.save_changes(Changes(user_identities=[bob, carol]))
    await store.close()

    store = await backend.open()
    assert await store.get_user_identity("@bob:x") == bob
    assert await store.get_user_identities_of(["@carol:x", "@bob:x", "@nobody:x"]) == {
        "@carol:x": carol,
        "@bob:x": bob,
        "@nobody:x": None,
    }
    changed = UserIdentity(
        bob.user_id,
        bob.master,
        bob.self_signing,
        changed_to=an_identity("@bob:x"),
        was_verified=True,
    )
    await store.save_changes(Changes(user_identities=[changed]))
    await store.close()
    store = await backend.open()
    assert await store.get_user_identity("@bob:x") == changed
    assert await store.get_user_identity("@carol:x") == carol


async def test_tracked_users_are_set_updated_and_dropped(backend: Backend) -> None:
    store = await backend.open()
    await store.save_changes(Changes(tracked_users={"@a:x": True, "@b:x": True}))
    await store.save_changes(Changes(tracked_users={"@a:x": False}, untracked_users={"@b:x"}))
    await store.close()
    assert await (await backend.open()).get_tracked_users() == {"@a:x": False}


async def test_olm_sessions_round_trip_last_used_first(backend: Backend) -> None:
    ours, theirs = vodozemac.Account(), vodozemac.Account()
    theirs.generate_one_time_keys(2)
    first_key, second_key = theirs.one_time_keys.values()
    older = ours.create_outbound_session(theirs.curve25519_key, first_key)
    newer = ours.create_outbound_session(theirs.curve25519_key, second_key)
    sender = theirs.curve25519_key.to_base64()
    store = await backend.open()
    await store.save_changes(
        Changes(
            olm_sessions=[
                OlmSessionRecord(sender, older, created_at=1.0, last_used=5.0),
                OlmSessionRecord(sender, newer, created_at=2.0, last_used=3.0),
            ]
        )
    )
    loaded = await store.get_olm_sessions(sender)
    assert [r.session_id for r in loaded] == [older.session_id, newer.session_id]
    await store.save_changes(Changes(olm_sessions=[OlmSessionRecord(sender, newer, 2.0, 9.0)]))
    await store.close()

    store = await backend.open()
    loaded = await store.get_olm_sessions(sender)
    assert [r.session_id for r in loaded] == [newer.session_id, older.session_id]
    assert loaded[0].created_at == 2.0
    assert await store.get_olm_sessions("someone else") == []
    # the stored ratchet still works: the peer opens it from our first message
    message = loaded[0].session.encrypt(b"still works").to_pre_key()
    assert message is not None
    _, plaintext = theirs.create_inbound_session(ours.curve25519_key, message)
    assert plaintext == b"still works"


async def test_group_sessions_and_message_indices_round_trip(backend: Backend) -> None:
    outbound = vodozemac.GroupSession()
    inbound = vodozemac.InboundGroupSession(outbound.session_key)
    room = "!room:example.org"
    store = await backend.open()
    await store.save_changes(
        Changes(
            inbound_group_sessions=[InboundGroupSessionRecord(room, "curve", "ed", inbound)],
            outbound_group_sessions=[
                OutboundGroupSessionRecord(room, outbound, 10.0, {"@a:x": {"DEV": 0}}, 5, 1000)
            ],
            message_indices=[MessageIndex(outbound.session_id, 0, "$first", 1)],
        )
    )
    # a second use of an index never replaces the first
    await store.save_changes(
        Changes(message_indices=[MessageIndex(outbound.session_id, 0, "$replay", 2)])
    )
    await store.close()

    store = await backend.open()
    got_in = await store.get_inbound_group_session(room, outbound.session_id)
    assert got_in is not None
    assert (got_in.sender_key, got_in.signing_key) == ("curve", "ed")
    assert await store.get_inbound_group_session("!other:x", outbound.session_id) is None
    got_out = await store.get_outbound_group_session(room)
    assert got_out is not None
    assert got_out.session.session_id == outbound.session_id
    assert (got_out.shared_with, got_out.rotation_msgs, got_out.rotation_ms) == (
        {"@a:x": {"DEV": 0}},
        5,
        1000,
    )
    first = await store.get_message_index(outbound.session_id, 0)
    assert first == MessageIndex(outbound.session_id, 0, "$first", 1)
    message = got_out.session.encrypt(b"through the stored pair")
    assert got_in.session.decrypt(message).plaintext == b"through the stored pair"

    await store.save_changes(Changes(discarded_outbound={room}))
    assert await store.get_outbound_group_session(room) is None


async def test_rekey_moves_every_secret_to_the_new_key(backend: Backend) -> None:
    store = await backend.open(KEY)
    secrets = await fill(store, count=5)
    ticks: list[int] = []
    fingerprint = await store.rekey(OTHER_KEY, progress=ticks.append)
    assert sum(ticks) == secrets.rows
    assert fingerprint == store.fingerprint
    await assert_intact(store, secrets)  # the open handle carries on with the new key
    await store.close()

    with pytest.raises(WrongPickleKey):
        await backend.open(KEY)
    reopened = await backend.open(OTHER_KEY)
    assert reopened.fingerprint == fingerprint
    await assert_intact(reopened, secrets)


async def test_secrets_are_counted_by_kind(backend: Backend) -> None:
    store = await backend.open()
    none = {"account": 0, "olm": 0, "inbound": 0, "outbound": 0, "cross_signing": 0}
    assert await store.count_secrets() == none
    await fill(store, count=3)
    assert await store.count_secrets() == {
        "account": 1,
        "olm": 3,
        "inbound": 3,
        "outbound": 1,
        "cross_signing": 1,
    }


async def test_cross_signing_keys_round_trip_sealed_and_replaced_whole(backend: Backend) -> None:
    store = await backend.open()
    assert await store.load_cross_signing() is None
    first = CrossSigningRecord({"master": "a2V5"}, {"published": False, "outbox": [{"id": "x"}]})
    await store.save_changes(Changes(cross_signing=first))
    first.state["published"] = True  # a later change to the object is not in the store
    loaded = await store.load_cross_signing()
    assert loaded is not None
    assert loaded.secrets == {"master": "a2V5"}
    assert loaded.state == {"published": False, "outbox": [{"id": "x"}]}
    second = CrossSigningRecord({"master": "b3RoZXI"}, {"published": True, "outbox": []})
    await store.save_changes(Changes(cross_signing=second))
    again = await store.load_cross_signing()
    assert again is not None
    assert again.secrets == second.secrets
    assert again.state == second.state
    await store.close()
    with pytest.raises(WrongPickleKey):  # the sealed keys are never read with another key
        await backend.open(OTHER_KEY)


async def test_many_users_devices_are_read_at_once(backend: Backend) -> None:
    store = await backend.open()
    phone, laptop = a_device(device_id="PHONE"), a_device(device_id="LAPTOP")
    bob = a_device("@bob:example.org", "BOBDEV")
    carol = a_device("@carol:example.org", "CAROLDEV")
    await store.save_changes(Changes(devices=[phone, laptop, bob, carol]))

    got = await store.get_devices_of(["@alice:example.org", "@bob:example.org", "@nobody:x"])
    assert got == {
        "@alice:example.org": {"PHONE": phone, "LAPTOP": laptop},
        "@bob:example.org": {"BOBDEV": bob},
        "@nobody:x": {},
    }
    assert await store.get_devices_of([]) == {}


async def test_many_devices_olm_sessions_are_read_at_once(backend: Backend) -> None:
    ours = vodozemac.Account()
    peers = [vodozemac.Account() for _ in range(3)]
    records = []
    for n, peer in enumerate(peers):
        peer.generate_one_time_keys(2)
        for m, one_time_key in enumerate(peer.one_time_keys.values()):
            session = ours.create_outbound_session(peer.curve25519_key, one_time_key)
            records.append(OlmSessionRecord(peer.curve25519_key.to_base64(), session, n, n + m))
    store = await backend.open()
    await store.save_changes(Changes(olm_sessions=records[:4]))  # the third peer has none

    keys = [peer.curve25519_key.to_base64() for peer in peers]
    got = await store.get_olm_sessions_of(keys)
    assert list(got) == keys
    for key in keys:  # the same sessions, in the same order, as one device at a time
        assert [r.session_id for r in got[key]] == [
            r.session_id for r in await store.get_olm_sessions(key)
        ]
    assert [len(got[key]) for key in keys] == [2, 2, 0]
    assert [r.last_used for r in got[keys[0]]] == [1.0, 0.0]  # the last used first


async def test_many_message_indices_are_read_at_once(backend: Backend) -> None:
    store = await backend.open()
    await store.save_changes(
        Changes(
            message_indices=[
                MessageIndex("session", 0, "$zero", 10),
                MessageIndex("session", 7, "$seven", 17),
                MessageIndex("other", 1, "$elsewhere", 1),
            ]
        )
    )
    got = await store.get_message_indices("session", [0, 1, 7, 1000])
    assert got == {
        0: MessageIndex("session", 0, "$zero", 10),
        7: MessageIndex("session", 7, "$seven", 17),
    }
    assert await store.get_message_indices("session", []) == {}
    assert await store.get_message_indices("session", range(600)) == got  # past one IN list


async def test_a_group_session_keeps_its_first_sharer(backend: Backend) -> None:
    """A better copy of a session replaces the session, never who shared it: every backend
    alike, so the machine's cache and the store cannot disagree about it."""
    store = await backend.open()
    outbound = vodozemac.GroupSession()
    first = InboundGroupSessionRecord(
        "!room:x", "sharer curve", "sharer ed", vodozemac.InboundGroupSession(outbound.session_key)
    )
    await store.save_changes(Changes(inbound_group_sessions=[first]))
    other = InboundGroupSessionRecord(
        "!room:x", "other curve", "other ed", vodozemac.InboundGroupSession(outbound.session_key)
    )
    await store.save_changes(Changes(inbound_group_sessions=[other]))
    got = await store.get_inbound_group_session("!room:x", outbound.session_id)
    assert got is not None
    assert (got.sender_key, got.signing_key) == ("sharer curve", "sharer ed")


def waiting(event_id: str, session_id: str, received_at: float, position: int = 0) -> Any:
    from olmstead.store.base import WaitingRoomEvent

    event = {"type": "m.room.encrypted", "event_id": event_id, "content": {"n": event_id}}
    return WaitingRoomEvent("!r:x", event_id, session_id, event, received_at, position)


async def test_waiting_room_events_kept_in_order_found_by_session_settled(
    backend: Backend,
) -> None:
    store = await backend.open()
    first = [waiting("$b", "s1", 2.0, 1), waiting("$a", "s1", 2.0, 0), waiting("$c", "s2", 1.0)]
    await store.save_changes(Changes(waiting_events=first))
    # kept again (a sync that came twice): the first record stays
    await store.save_changes(Changes(waiting_events=[waiting("$a", "s1", 9.0)]))
    await store.close()
    store = await backend.open()
    assert [w.event_id for w in await store.get_waiting_events()] == ["$c", "$a", "$b"]
    found = await store.get_waiting_events(["s1"])
    assert [(w.event_id, w.received_at) for w in found] == [("$a", 2.0), ("$b", 2.0)]
    assert found[0].event["content"] == {"n": "$a"}
    assert await store.count_waiting_events() == 3
    await store.save_changes(Changes(settled_events={("!r:x", "$a"), ("!r:x", "$c")}))
    assert [w.event_id for w in await store.get_waiting_events()] == ["$b"]
    assert await store.get_waiting_events(["s2"]) == []


async def test_withheld_notices_per_session_and_sender(backend: Backend) -> None:
    from olmstead.store.base import WithheldRecord

    store = await backend.open()
    await store.save_changes(
        Changes(
            withheld=[
                WithheldRecord("!r:x", "s1", "k1", "@a:x", "m.unverified", "not verified"),
                WithheldRecord("!r:x", "s1", "k2", "@b:x", "m.blacklisted", "blocked"),
                WithheldRecord("", "", "k3", "@c:x", "m.no_olm", "no session"),
            ]
        )
    )
    replaced = WithheldRecord("!r:x", "s1", "k1", "@a:x", "m.unavailable", "later")
    await store.save_changes(Changes(withheld=[replaced]))
    found = sorted(await store.get_withheld("!r:x", "s1"), key=lambda w: w.sender_key)
    assert [(w.sender_key, w.code, w.reason) for w in found] == [
        ("k1", "m.unavailable", "later"),
        ("k2", "m.blacklisted", "blocked"),
    ]
    assert [w.code for w in await store.get_withheld("", "")] == ["m.no_olm"]
    assert await store.get_withheld("!r:x", "s2") == []


async def test_outbox_kept_unchanged_until_sent(backend: Backend) -> None:
    from olmstead.store.base import OutboxEntry

    store = await backend.open()
    messages = {"@a:x": {"DEV": {"algorithm": "m.olm.v1.curve25519-aes-sha2", "body": "é"}}}
    share = OutboxEntry(
        "room_key-1", "m.room.encrypted", messages, 1.0, "!r:x", "s1", {"@a:x": {"DEV": 3}}
    )
    dummy = OutboxEntry("dummy-1", "m.room.encrypted", messages, 2.0)
    await store.save_changes(Changes(outbox=[share, dummy]))
    await store.close()
    store = await backend.open()
    assert await store.get_outbox() == [share, dummy]
    await store.save_changes(Changes(outbox_sent={"room_key-1"}))
    assert await store.get_outbox() == [dummy]
