"""Other users' cross-signing identities: the chain checks, pinning, changes, trust levels,
sharing strategies, trust on received events, and MSC4147's sender_device_keys."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from typing import Any

import pytest

from olmstead import (
    IdentityChanged,
    InsecureDevice,
    LocalProtocolError,
    OlmsteadError,
    SenderMismatch,
    SharingStrategy,
    TrustLevel,
    UndecryptableToDevice,
)
from olmstead.requests import KeysQueryRequest, ToDeviceRequest
from olmstead.sessions.olm_sessions import DecryptedToDevice, OlmPayload
from tests.cross_signing_keys import CrossSigningIdentity, KeysQueryAnswer, SigningKey, canonical
from tests.machine.pair import Peer, deliveries, new_peer
from tests.machine.test_megolm import Timeline

ALICE, BOB, CAROL = "@alice:example.org", "@bob:example.org", "@carol:example.org"
ROOM = "!room:example.org"


async def answer_query(peer: Peer, answer: dict[str, Any]) -> None:
    """``peer`` tracks every user of ``answer`` and receives it as its /keys/query answer."""
    users = list(answer["device_keys"])
    await peer.machine.update_tracked_users(users)
    for user in users:  # already tracked users are asked again, as after a device list change
        await peer.machine.receive_sync_changes(device_lists={"changed": [user]})
    queries = [r for r in await peer.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)]
    for watch in [q for q in queries if q.request_id.startswith("watch_device-")]:
        # our own user listed as changed: the upload guard looks our device up again
        ours = {"device_keys": {peer.user_id: {peer.device_id: peer.machine.device_keys()}}}
        await peer.machine.mark_request_as_sent(watch.request_id, ours)
    (query,) = [q for q in queries if not q.request_id.startswith("watch_device-")]
    await peer.machine.mark_request_as_sent(query.request_id, answer)


def device_signed(peer: Peer, obj: dict[str, Any], key_id: str | None = None) -> dict[str, Any]:
    """``obj`` signed by ``peer``'s device key (as our bootstrap signs our master key)."""
    signed = copy.deepcopy(obj)
    signature = peer.machine._record.account.sign(canonical(signed)).to_base64()
    signed.setdefault("signatures", {}).setdefault(peer.user_id, {})[
        f"ed25519:{key_id or peer.device_id}"
    ] = signature
    return signed


async def alice_and_bob() -> tuple[Peer, Peer, CrossSigningIdentity]:
    alice, bob = await new_peer(ALICE, "ALICEDEV"), await new_peer(BOB, "BOBDEV")
    return alice, bob, CrossSigningIdentity(BOB)


# --- the chain -------------------------------------------------------------------------------


async def test_a_device_its_owner_signed_is_cross_signed_and_the_master_key_pinned() -> None:
    alice, bob, b = await alice_and_bob()
    answer = KeysQueryAnswer().device(b.sign_device(bob.machine.device_keys())).identity(b)
    await answer_query(alice, answer.json())
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.CROSS_SIGNED
    identity = await alice.machine.get_user_identity(BOB)
    assert identity is not None
    assert identity.master_key == b.master.public
    assert identity.changed_to is None
    assert not await alice.machine.is_identity_verified(BOB)


async def test_cross_signing_keys_of_users_not_asked_about_are_ignored() -> None:
    alice, bob, b = await alice_and_bob()
    c = CrossSigningIdentity(CAROL)
    answer = KeysQueryAnswer().device(b.sign_device(bob.machine.device_keys())).identity(b)
    answer.identity(c)
    answer.device_keys.pop(CAROL)  # only bob was asked about
    await answer_query(alice, answer.json())
    assert await alice.machine.get_user_identity(BOB) is not None
    assert await alice.machine.get_user_identity(CAROL) is None


async def test_unsigned_device_and_owner_without_identity() -> None:
    alice, bob, b = await alice_and_bob()
    carol = await new_peer(CAROL, "CAROLDEV")
    answer = KeysQueryAnswer().device(bob.machine.device_keys()).identity(b)
    answer.device(carol.machine.device_keys())
    await answer_query(alice, answer.json())
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.NOT_SIGNED
    assert await alice.machine.get_device_trust(CAROL, "CAROLDEV") is (
        TrustLevel.OWNER_HAS_NO_IDENTITY
    )
    assert await alice.machine.get_device_trust(BOB, "NOSUCHDEV") is TrustLevel.UNKNOWN_DEVICE


def _retitled(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    changed = copy.deepcopy(obj)
    changed.update(changes)
    return changed


Forgery = Callable[[CrossSigningIdentity, KeysQueryAnswer], None]


def _master_names_another_user(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    a.master_keys[BOB] = _retitled(b.master_key(), user_id=CAROL)


def _master_with_wrong_usage(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    a.master_keys[BOB] = _retitled(b.master_key(), usage=["self_signing"])


def _master_with_two_keys(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    other = SigningKey().public
    keys = {f"ed25519:{b.master.public}": b.master.public, f"ed25519:{other}": other}
    a.master_keys[BOB] = _retitled(b.master_key(), keys=keys)


def _master_key_id_names_another_key(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    a.master_keys[BOB] = _retitled(
        b.master_key(), keys={f"ed25519:{SigningKey().public}": b.master.public}
    )


def _master_not_a_key(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    a.master_keys[BOB] = _retitled(b.master_key(), keys={"ed25519:AAAA": "AAAA"})


def _master_with_a_forged_self_signature(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    forged = SigningKey().sign(b.master_key(), BOB, key_id=b.master.public)
    a.master_keys[BOB] = forged


def _self_signing_signed_by_another_key(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    a.self_signing_keys[BOB] = SigningKey().sign(
        b.key_object("self_signing", b.self_signing), BOB, key_id=b.master.public
    )


def _self_signing_changed_after_signing(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    swapped = SigningKey().public
    a.self_signing_keys[BOB] = _retitled(b.self_signing_key(), keys={f"ed25519:{swapped}": swapped})


def _self_signing_unsigned(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    a.self_signing_keys[BOB] = b.key_object("self_signing", b.self_signing)


def _self_signing_missing(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    del a.self_signing_keys[BOB]


def _self_signing_of_another_user(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    a.self_signing_keys[BOB] = b.master.sign(
        _retitled(b.key_object("self_signing", b.self_signing), user_id=CAROL), BOB
    )


def _self_signing_with_master_usage(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    a.self_signing_keys[BOB] = b.master.sign(b.key_object("master", b.self_signing), BOB)


def _user_signing_signed_by_another_key(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    a.user_signing_keys[BOB] = SigningKey().sign(
        b.key_object("user_signing", b.user_signing), BOB, key_id=b.master.public
    )


def _not_objects(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    a.master_keys[BOB] = ["not", "an", "object"]


def _master_nested_too_deep(b: CrossSigningIdentity, a: KeysQueryAnswer) -> None:
    # unsigned, so every signature still verifies; thousands deep, so storing it would fail
    deep: dict[str, Any] = {}
    for _ in range(5000):
        deep = {"a": deep}
    a.master_keys[b.user_id]["unsigned"] = deep


FORGERIES = [
    _master_names_another_user,
    _master_with_wrong_usage,
    _master_with_two_keys,
    _master_key_id_names_another_key,
    _master_not_a_key,
    _master_with_a_forged_self_signature,
    _self_signing_signed_by_another_key,
    _self_signing_changed_after_signing,
    _self_signing_unsigned,
    _self_signing_missing,
    _self_signing_of_another_user,
    _self_signing_with_master_usage,
    _user_signing_signed_by_another_key,
    _not_objects,
    _master_nested_too_deep,
]


@pytest.mark.parametrize("forge", FORGERIES, ids=[f.__name__.strip("_") for f in FORGERIES])
async def test_a_forged_link_is_refused_logged_and_never_adopted(
    forge: Forgery, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob, b = await alice_and_bob()
    answer = KeysQueryAnswer().device(b.sign_device(bob.machine.device_keys())).identity(b)
    answer.user_signing_keys[BOB] = b.user_signing_key()
    forge(b, answer)
    with caplog.at_level(logging.WARNING):
        await answer_query(alice, answer.json())
    assert "refused the cross-signing keys of @bob:example.org" in caplog.text
    assert await alice.machine.get_user_identity(BOB) is None
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is (TrustLevel.OWNER_HAS_NO_IDENTITY)
    assert alice.machine.take_identity_changes() == []


@pytest.mark.parametrize("forge", FORGERIES, ids=[f.__name__.strip("_") for f in FORGERIES])
async def test_a_forged_update_leaves_the_pinned_identity_as_it_was(forge: Forgery) -> None:
    alice, bob, b = await alice_and_bob()
    signed_device = b.sign_device(bob.machine.device_keys())
    await answer_query(alice, KeysQueryAnswer().device(signed_device).identity(b).json())
    before = await alice.machine.get_user_identity(BOB)
    other = CrossSigningIdentity(BOB)  # a forger's identity, presented as bob's
    answer = KeysQueryAnswer().device(signed_device).identity(other)
    answer.user_signing_keys[BOB] = other.user_signing_key()
    forge(other, answer)
    await answer_query(alice, answer.json())
    assert await alice.machine.get_user_identity(BOB) == before
    assert alice.machine.take_identity_changes() == []
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.CROSS_SIGNED


async def test_a_device_signature_by_another_key_under_the_self_signing_key_id() -> None:
    alice, bob, b = await alice_and_bob()
    forged = SigningKey().sign(bob.machine.device_keys(), BOB, key_id=b.self_signing.public)
    await answer_query(alice, KeysQueryAnswer().device(forged).identity(b).json())
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.NOT_SIGNED


async def test_a_device_signed_by_the_master_key_is_not_cross_signed() -> None:
    # the spec's chain runs master -> self-signing -> device; a shortcut is not trusted
    alice, bob, b = await alice_and_bob()
    shortcut = b.master.sign(bob.machine.device_keys(), BOB)
    await answer_query(alice, KeysQueryAnswer().device(shortcut).identity(b).json())
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.NOT_SIGNED


async def test_a_rotated_self_signing_key_signed_by_the_pinned_master_is_adopted() -> None:
    alice, bob, b = await alice_and_bob()
    await answer_query(
        alice, KeysQueryAnswer().device(bob.machine.device_keys()).identity(b).json()
    )
    b.self_signing = SigningKey()
    answer = KeysQueryAnswer().device(b.sign_device(bob.machine.device_keys())).identity(b)
    await answer_query(alice, answer.json())
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.CROSS_SIGNED
    assert alice.machine.take_identity_changes() == []


# --- a changed master key ---------------------------------------------------------------------


async def test_a_changed_master_key_is_reported_and_not_adopted_until_acknowledged() -> None:
    alice, bob, b = await alice_and_bob()
    await answer_query(
        alice, KeysQueryAnswer().device(bob.machine.device_keys()).identity(b).json()
    )
    reset = CrossSigningIdentity(BOB)  # bob reset his identity and signed his device anew
    answer = KeysQueryAnswer().device(reset.sign_device(bob.machine.device_keys())).identity(reset)
    await answer_query(alice, answer.json())

    assert alice.machine.take_identity_changes() == [
        IdentityChanged(BOB, b.master.public, reset.master.public, False)
    ]
    identity = await alice.machine.get_user_identity(BOB)
    assert identity is not None
    assert identity.master_key == b.master.public
    assert identity.changed_to is not None
    assert identity.changed_to.master_key == reset.master.public
    # measured against the pinned identity, the new signature counts for nothing
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.NOT_SIGNED

    await answer_query(alice, answer.json())  # the same change again: not a new report
    assert alice.machine.take_identity_changes() == []

    adopted = await alice.machine.acknowledge_identity_change(BOB)
    assert adopted.master_key == reset.master.public
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.CROSS_SIGNED
    with pytest.raises(LocalProtocolError, match="no identity change"):
        await alice.machine.acknowledge_identity_change(BOB)


async def test_an_identity_change_survives_a_restart_of_the_machine() -> None:
    from tests.machine.pair import reopen

    alice, bob, b = await alice_and_bob()
    await answer_query(
        alice, KeysQueryAnswer().device(bob.machine.device_keys()).identity(b).json()
    )
    reset = CrossSigningIdentity(BOB)
    await answer_query(
        alice, KeysQueryAnswer().device(bob.machine.device_keys()).identity(reset).json()
    )
    alice = await reopen(alice)
    identity = await alice.machine.get_user_identity(BOB)
    assert identity is not None
    assert identity.master_key == b.master.public
    assert identity.changed_to is not None
    assert identity.changed_to.master_key == reset.master.public


async def test_acknowledging_a_change_names_the_key_seen_and_refuses_a_newer_one() -> None:
    # the application saw one change; the server changed the key again before the
    # acknowledgement: the newer key is not adopted in its name
    alice, bob, b = await alice_and_bob()
    await answer_query(
        alice, KeysQueryAnswer().device(bob.machine.device_keys()).identity(b).json()
    )
    seen, newer = CrossSigningIdentity(BOB), CrossSigningIdentity(BOB)
    reports = []
    for identity in (seen, newer):
        answer = KeysQueryAnswer().device(bob.machine.device_keys()).identity(identity)
        await answer_query(alice, answer.json())
        reports.extend(alice.machine.take_identity_changes())
    (first, second) = reports
    assert (first.new_master_key, second.new_master_key) == (
        seen.master.public,
        newer.master.public,
    )
    before = await alice.machine.get_user_identity(BOB)
    with pytest.raises(LocalProtocolError, match="changed again"):
        await alice.machine.acknowledge_identity_change(BOB, first.new_master_key)
    assert await alice.machine.get_user_identity(BOB) == before  # nothing adopted

    adopted = await alice.machine.acknowledge_identity_change(BOB, second.new_master_key)
    assert adopted.master_key == newer.master.public


async def test_a_flood_of_changes_keeps_one_report_per_user_until_taken() -> None:
    # a server that flips a user's master key on every query: the reports not yet taken
    # do not pile up; the newest one says what waits
    alice, bob, b = await alice_and_bob()
    await answer_query(
        alice, KeysQueryAnswer().device(bob.machine.device_keys()).identity(b).json()
    )
    flips = [CrossSigningIdentity(BOB) for _ in range(2)] * 10
    for identity in flips:
        answer = KeysQueryAnswer().device(bob.machine.device_keys()).identity(identity)
        await answer_query(alice, answer.json())
    assert alice.machine.take_identity_changes() == [
        IdentityChanged(BOB, b.master.public, flips[-1].master.public, False)
    ]
    pinned = await alice.machine.get_user_identity(BOB)
    assert pinned is not None
    assert pinned.master_key == b.master.public


# --- verified by us ---------------------------------------------------------------------------


async def verified_bob(
    *, master_signed_by_device: bool = True
) -> tuple[Peer, Peer, CrossSigningIdentity, CrossSigningIdentity]:
    """Alice with her own cross-signing identity, having signed bob's master key."""
    alice, bob, b = await alice_and_bob()
    a = CrossSigningIdentity(ALICE)
    own_master = a.master_key()
    if master_signed_by_device:
        own_master = device_signed(alice, own_master)
    answer = KeysQueryAnswer().identity(a, master=own_master, own=True)
    answer.device(a.sign_device(alice.machine.device_keys()))
    answer.device(b.sign_device(bob.machine.device_keys()))
    answer.identity(b, master=a.sign_user(b.master_key()))
    await answer_query(alice, answer.json())
    return alice, bob, a, b


async def test_a_user_whose_master_key_our_user_signing_key_signed_is_verified() -> None:
    alice, _bob, _a, _b = await verified_bob()
    assert await alice.machine.is_identity_verified(BOB)
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.VERIFIED


async def test_our_master_key_counts_only_if_our_device_signed_it() -> None:
    # a user-signing key is only ours if the master key above it is: the server could
    # serve any master key as ours
    alice, _bob, _a, _b = await verified_bob(master_signed_by_device=False)
    assert not await alice.machine.is_identity_verified(BOB)
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.CROSS_SIGNED


async def test_a_verified_users_changed_identity_stops_sharing_until_acknowledged() -> None:
    alice, bob, _a, b = await verified_bob()
    await open_session_with(alice, bob)
    reset = CrossSigningIdentity(BOB)
    answer = KeysQueryAnswer().device(reset.sign_device(bob.machine.device_keys())).identity(reset)
    await answer_query(alice, answer.json())
    assert alice.machine.take_identity_changes() == [
        IdentityChanged(BOB, b.master.public, reset.master.public, True)
    ]

    # whatever the strategy, bob's devices get no room key meanwhile
    requests = await alice.machine.share_room_key(ROOM, [BOB], strategy=SharingStrategy.ALL_DEVICES)
    assert recipients(requests, "m.room.encrypted") == set()
    assert withheld_codes(requests) == {("@bob:example.org", "BOBDEV"): "m.unverified"}

    await alice.machine.acknowledge_identity_change(BOB)
    assert not await alice.machine.is_identity_verified(BOB)  # the new one is not verified
    requests = await alice.machine.share_room_key(ROOM, [BOB])
    assert recipients(requests, "m.room.encrypted") == {(BOB, "BOBDEV")}


async def test_a_server_that_drops_our_signature_first_cannot_unblock_a_changed_identity() -> None:
    # the server serves bob's pinned master key without our user-signing key's signature,
    # then a new master key: bob was verified, so sharing with him must still stop
    alice, bob, _a, b = await verified_bob()
    await open_session_with(alice, bob)
    stripped = KeysQueryAnswer().device(b.sign_device(bob.machine.device_keys())).identity(b)
    await answer_query(alice, stripped.json())
    assert await alice.machine.is_identity_verified(BOB)  # a signature is never taken away
    assert await alice.machine.get_device_trust(BOB, "BOBDEV") is TrustLevel.VERIFIED

    reset = CrossSigningIdentity(BOB)
    answer = KeysQueryAnswer().device(reset.sign_device(bob.machine.device_keys())).identity(reset)
    await answer_query(alice, answer.json())
    assert alice.machine.take_identity_changes() == [
        IdentityChanged(BOB, b.master.public, reset.master.public, True)
    ]
    requests = await alice.machine.share_room_key(ROOM, [BOB])
    assert recipients(requests, "m.room.encrypted") == set()


# --- sharing strategies -----------------------------------------------------------------------


async def open_session_with(alice: Peer, *peers: Peer) -> None:
    claims: dict[str, Any] = {}
    for peer in peers:
        for user, devices in peer.claim_answer()["one_time_keys"].items():
            claims.setdefault(user, {}).update(devices)
    claim = await alice.machine.get_missing_sessions({p.user_id for p in peers})
    assert claim is not None
    await alice.machine.mark_request_as_sent(claim.request_id, {"one_time_keys": claims})


def recipients(requests: list[ToDeviceRequest], event_type: str) -> set[tuple[str, str]]:
    return {
        (user, device)
        for r in requests
        if r.event_type == event_type
        for user, devices in r.messages.items()
        for device in devices
    }


def withheld_codes(requests: list[ToDeviceRequest]) -> dict[tuple[str, str], str]:
    return {
        (user, device): content["code"]
        for r in requests
        if r.event_type == "m.room_key.withheld"
        for user, devices in r.messages.items()
        for device, content in devices.items()
    }


async def three_kinds() -> tuple[Peer, Peer, Peer, Peer, CrossSigningIdentity]:
    """Alice, bob's cross-signed device, bob's unsigned one, carol (no identity)."""
    alice = await new_peer(ALICE, "ALICEDEV")
    bob1, bob2 = await new_peer(BOB, "BOB1"), await new_peer(BOB, "BOB2")
    carol = await new_peer(CAROL, "CAROLDEV")
    b = CrossSigningIdentity(BOB)
    answer = KeysQueryAnswer().identity(b)
    answer.device(b.sign_device(bob1.machine.device_keys())).device(bob2.machine.device_keys())
    answer.device(carol.machine.device_keys())
    await answer_query(alice, answer.json())
    await open_session_with(alice, bob1, bob2, carol)
    return alice, bob1, bob2, carol, b


async def test_all_devices_is_the_default_and_shares_with_every_device() -> None:
    alice, *_ = await three_kinds()
    requests = await alice.machine.share_room_key(ROOM, [BOB, CAROL])
    assert recipients(requests, "m.room.encrypted") == {
        (BOB, "BOB1"),
        (BOB, "BOB2"),
        (CAROL, "CAROLDEV"),
    }
    assert withheld_codes(requests) == {}


async def test_exclude_insecure_withholds_from_devices_their_owner_did_not_sign() -> None:
    alice, *_ = await three_kinds()
    requests = await alice.machine.share_room_key(
        ROOM, [BOB, CAROL], strategy=SharingStrategy.EXCLUDE_INSECURE
    )
    assert recipients(requests, "m.room.encrypted") == {(BOB, "BOB1")}
    assert withheld_codes(requests) == {
        (BOB, "BOB2"): "m.unverified",
        (CAROL, "CAROLDEV"): "m.unverified",
    }
    (withheld,) = [r for r in requests if r.event_type == "m.room_key.withheld"]
    content = withheld.messages[BOB]["BOB2"]
    assert content["room_id"] == ROOM
    assert content["algorithm"] == "m.megolm.v1.aes-sha2"
    assert content["sender_key"] == alice.machine.identity_keys["curve25519"]

    # withheld once per session; the same session goes on (no rotation for a refusal)
    again = await alice.machine.share_room_key(
        ROOM, [BOB, CAROL], strategy=SharingStrategy.EXCLUDE_INSECURE
    )
    assert again == []


async def test_the_machine_wide_strategy_applies_when_none_is_given() -> None:
    alice, *_ = await three_kinds()
    alice.machine.sharing_strategy = SharingStrategy.EXCLUDE_INSECURE
    requests = await alice.machine.share_room_key(ROOM, [BOB, CAROL])
    assert recipients(requests, "m.room.encrypted") == {(BOB, "BOB1")}


async def test_a_device_cross_signed_later_gets_the_key_of_the_same_session() -> None:
    alice, bob1, bob2, _carol, b = await three_kinds()
    strategy = SharingStrategy.EXCLUDE_INSECURE
    await alice.machine.share_room_key(ROOM, [BOB], strategy=strategy)
    first = await session_id(alice)
    answer = KeysQueryAnswer().identity(b)
    answer.device(b.sign_device(bob1.machine.device_keys()))
    answer.device(b.sign_device(bob2.machine.device_keys()))
    await answer_query(alice, answer.json())
    later = await alice.machine.share_room_key(ROOM, [BOB], strategy=strategy)
    assert recipients(later, "m.room.encrypted") == {(BOB, "BOB2")}
    assert await session_id(alice) == first


async def session_id(peer: Peer) -> str:
    record = await peer.machine.store.get_outbound_group_session(ROOM)
    assert record is not None
    return record.session.session_id


async def test_a_device_that_had_the_key_and_is_now_refused_rotates_the_session() -> None:
    alice, _bob1, _bob2, _carol, _b = await three_kinds()
    await alice.machine.share_room_key(ROOM, [BOB])  # all devices
    before = await session_id(alice)
    requests = await alice.machine.share_room_key(
        ROOM, [BOB], strategy=SharingStrategy.EXCLUDE_INSECURE
    )
    assert (
        await session_id(alice) != before
    )  # BOB2 holds the old key: the new one must not reach it
    assert recipients(requests, "m.room.encrypted") == {(BOB, "BOB1")}
    assert withheld_codes(requests) == {(BOB, "BOB2"): "m.unverified"}


async def test_verified_only_shares_with_verified_devices_alone() -> None:
    alice, bob, _a, _b = await verified_bob()
    carol = await new_peer(CAROL, "CAROLDEV")
    await answer_query(alice, KeysQueryAnswer().device(carol.machine.device_keys()).json())
    await open_session_with(alice, bob, carol)
    requests = await alice.machine.share_room_key(
        ROOM, [BOB, CAROL], strategy=SharingStrategy.VERIFIED_ONLY
    )
    assert recipients(requests, "m.room.encrypted") == {(BOB, "BOBDEV")}
    assert withheld_codes(requests) == {(CAROL, "CAROLDEV"): "m.unverified"}


async def test_verified_only_withholds_from_a_cross_signed_but_unverified_device() -> None:
    alice, *_ = await three_kinds()
    requests = await alice.machine.share_room_key(
        ROOM, [BOB], strategy=SharingStrategy.VERIFIED_ONLY
    )
    assert recipients(requests, "m.room.encrypted") == set()
    assert set(withheld_codes(requests)) == {(BOB, "BOB1"), (BOB, "BOB2")}


# --- receiving ---------------------------------------------------------------------------------


async def receive_room_key(alice: Peer, sender: Peer) -> list[ToDeviceRequest]:
    """``sender`` (who knows alice) shares its room key with her; she receives it."""
    await answer_query(sender, KeysQueryAnswer().device(alice.machine.device_keys()).json())
    await open_session_with(sender, alice)
    requests = await sender.machine.share_room_key(ROOM, [ALICE])
    (keys,) = [r for r in requests if r.event_type == "m.room.encrypted"]
    (got,) = await alice.machine.receive_sync_changes(
        to_device_events=[deliveries(keys, sender, alice)]
    )
    assert isinstance(got, DecryptedToDevice)
    assert got.type == "m.room_key"
    return requests


async def test_room_events_carry_the_sending_devices_trust_level() -> None:
    alice, bob1, bob2, carol, _b = await three_kinds()
    timeline = Timeline()
    expected = {}
    for peer, level in (
        (bob1, TrustLevel.CROSS_SIGNED),
        (bob2, TrustLevel.NOT_SIGNED),
        (carol, TrustLevel.OWNER_HAS_NO_IDENTITY),
    ):
        await receive_room_key(alice, peer)
        content = await peer.machine.encrypt_room_event(ROOM, "m.room.message", {"body": "hi"})
        expected[peer.device_id] = (timeline.event(peer, content), level)
    for event, level in expected.values():
        decrypted = await alice.machine.decrypt_room_event(ROOM, event)
        assert decrypted.trust is level


async def test_our_own_room_events_are_verified() -> None:
    alice, *_ = await three_kinds()
    await alice.machine.share_room_key(ROOM, [BOB])
    content = await alice.machine.encrypt_room_event(ROOM, "m.room.message", {"body": "me"})
    event = Timeline().event(alice, content)
    assert (await alice.machine.decrypt_room_event(ROOM, event)).trust is TrustLevel.VERIFIED


async def test_an_unknown_sending_device_is_unknown() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    dave = await new_peer("@dave:example.org", "DAVEDEV")  # alice never queried dave
    await receive_room_key(alice, dave)
    content = await dave.machine.encrypt_room_event(ROOM, "m.room.message", {"body": "?"})
    decrypted = await alice.machine.decrypt_room_event(ROOM, Timeline().event(dave, content))
    assert decrypted.trust is TrustLevel.UNKNOWN_DEVICE


async def test_refusing_insecure_senders_refuses_their_room_events_with_a_typed_error() -> None:
    alice, bob1, bob2, _carol, _b = await three_kinds()
    alice.machine.only_cross_signed_senders = True
    timeline = Timeline()
    events = []
    for peer in (bob1, bob2):
        await receive_room_key(alice, peer)  # room keys are kept, whoever sent them
        content = await peer.machine.encrypt_room_event(ROOM, "m.room.message", {"body": "x"})
        events.append(timeline.event(peer, content))
    good, refused = await alice.machine.decrypt_room_events(ROOM, events)
    assert not isinstance(good, Exception)
    assert good.trust is TrustLevel.CROSS_SIGNED
    assert isinstance(refused, InsecureDevice)
    assert refused.trust == "not_signed"
    assert refused.sender == BOB


async def test_to_device_events_carry_trust_and_insecure_senders_are_refused() -> None:
    alice, bob1, bob2, _carol, _b = await three_kinds()
    for peer in (bob1, bob2):
        await answer_query(peer, KeysQueryAnswer().device(alice.machine.device_keys()).json())
        await open_session_with(peer, alice)

    async def from_peer(peer: Peer) -> Any:
        devices = (await peer.machine.get_user_devices(ALICE)).values()
        request, _ = await peer.machine.encrypt_to_devices(devices, "org.example.ping", {"n": 1})
        assert request is not None
        (got,) = await alice.machine.receive_sync_changes(
            to_device_events=[deliveries(request, peer, alice)]
        )
        return got

    got = await from_peer(bob1)
    assert isinstance(got, DecryptedToDevice)
    assert got.trust is TrustLevel.CROSS_SIGNED
    got = await from_peer(bob2)
    assert isinstance(got, DecryptedToDevice)
    assert got.trust is TrustLevel.NOT_SIGNED
    alice.machine.only_cross_signed_senders = True
    got = await from_peer(bob2)
    assert isinstance(got, UndecryptableToDevice)
    assert isinstance(got.error, InsecureDevice)
    got = await from_peer(bob1)
    assert isinstance(got, DecryptedToDevice)
    assert got.content == {"n": 1}


# --- MSC4147: sender_device_keys --------------------------------------------------------------


async def crafted(sender: Peer, to: Peer, payload: dict[str, Any]) -> Any:
    """Encrypt ``payload`` as-is from ``sender`` to ``to``'s device; what ``to`` makes of it."""
    device = (await sender.machine.get_user_devices(to.user_id))[to.device_id]
    sealed = await sender.machine.olm.encrypt(
        sender.machine.identity_keys, device, OlmPayload(payload), sender.clock()
    )
    assert sealed is not None
    event = {"type": "m.room.encrypted", "sender": sender.user_id, "content": sealed[0]}
    (got,) = await to.machine.receive_sync_changes(to_device_events=[event])
    return got


def payload_of(sender: Peer, device_keys: Any) -> dict[str, Any]:
    return {
        "type": "org.example.ping",
        "content": {},
        "sender": sender.user_id,
        "sender_device": sender.device_id,
        "keys": {"ed25519": sender.machine.identity_keys["ed25519"]},
        "sender_device_keys": device_keys,
    }


async def test_olm_payloads_carry_our_signed_device_keys() -> None:
    alice = await new_peer(ALICE, "ALICEDEV")
    dave = await new_peer("@dave:example.org", "DAVEDEV")
    await answer_query(dave, KeysQueryAnswer().device(alice.machine.device_keys()).json())
    await open_session_with(dave, alice)
    devices = (await dave.machine.get_user_devices(ALICE)).values()
    request, _ = await dave.machine.encrypt_to_devices(devices, "org.example.ping", {})
    assert request is not None
    (got,) = await alice.machine.receive_sync_changes(
        to_device_events=[deliveries(request, dave, alice)]
    )
    # alice never queried dave: the payload told her which device it was
    assert isinstance(got, DecryptedToDevice)
    assert not got.verified
    assert got.sender_device_keys is not None
    assert got.sender_device_keys.keys == dave.machine.device_keys()


async def test_sender_device_keys_let_a_cross_signed_device_be_trusted_before_a_query() -> None:
    alice, bob, b = await alice_and_bob()
    await answer_query(alice, KeysQueryAnswer().identity(b).json())  # bob's identity, no devices
    await answer_query(bob, KeysQueryAnswer().device(alice.machine.device_keys()).json())
    await open_session_with(bob, alice)
    got = await crafted(bob, alice, payload_of(bob, b.sign_device(bob.machine.device_keys())))
    assert isinstance(got, DecryptedToDevice)
    assert got.trust is TrustLevel.CROSS_SIGNED


Mangle = Callable[[Peer, Peer, dict[str, Any]], Any]


def _another_devices_keys(bob: Peer, carol: Peer, keys: dict[str, Any]) -> Any:
    return carol.machine.device_keys()


def _broken_signature(bob: Peer, carol: Peer, keys: dict[str, Any]) -> Any:
    keys["algorithms"] = [*keys["algorithms"], "org.example.added"]
    return keys


def _another_user(bob: Peer, carol: Peer, keys: dict[str, Any]) -> Any:
    keys["user_id"] = CAROL
    keys.pop("signatures")
    return device_signed(bob, keys)


def _claims_another_ed25519(bob: Peer, carol: Peer, keys: dict[str, Any]) -> Any:
    # self-consistent keys (signed by their own Ed25519 key) that are not bob's device
    forger = SigningKey()
    keys["keys"][f"ed25519:{bob.device_id}"] = forger.public
    keys.pop("signatures")
    return forger.sign(keys, BOB, key_id=bob.device_id)


def _not_an_object(bob: Peer, carol: Peer, keys: dict[str, Any]) -> Any:
    return "keys"


def _no_device_id(bob: Peer, carol: Peer, keys: dict[str, Any]) -> Any:
    keys.pop("device_id")
    return keys


MANGLES = [
    _another_devices_keys,
    _broken_signature,
    _another_user,
    _claims_another_ed25519,
    _not_an_object,
    _no_device_id,
]


@pytest.mark.parametrize("mangle", MANGLES, ids=[m.__name__.strip("_") for m in MANGLES])
async def test_mismatched_sender_device_keys_are_refused(mangle: Mangle) -> None:
    alice, bob, _b = await alice_and_bob()
    carol = await new_peer(CAROL, "CAROLDEV")
    await answer_query(bob, KeysQueryAnswer().device(alice.machine.device_keys()).json())
    await open_session_with(bob, alice)
    keys = mangle(bob, carol, copy.deepcopy(bob.machine.device_keys()))
    got = await crafted(bob, alice, payload_of(bob, keys))
    assert isinstance(got, UndecryptableToDevice)
    assert isinstance(got.error, SenderMismatch)
    assert "sender_device_keys" in str(got.error)


async def test_sender_device_keys_renaming_the_known_sending_device_are_refused() -> None:
    # the sender's own keys, self-signed, under another device ID than the one we know
    alice, bob, _b = await alice_and_bob()
    await answer_query(alice, KeysQueryAnswer().device(bob.machine.device_keys()).json())
    await answer_query(bob, KeysQueryAnswer().device(alice.machine.device_keys()).json())
    await open_session_with(bob, alice)
    keys = copy.deepcopy(bob.machine.device_keys())
    keys.pop("signatures")
    keys["device_id"] = "BOBRENAMED"
    keys["keys"] = {
        "ed25519:BOBRENAMED": bob.machine.identity_keys["ed25519"],
        "curve25519:BOBRENAMED": bob.machine.identity_keys["curve25519"],
    }
    keys = device_signed(bob, keys, key_id="BOBRENAMED")
    got = await crafted(bob, alice, payload_of(bob, keys))
    assert isinstance(got, UndecryptableToDevice)
    assert isinstance(got.error, SenderMismatch)
    assert "not the known BOBDEV" in str(got.error)


async def test_sender_device_keys_under_a_known_device_id_with_other_keys_are_refused() -> None:
    alice, bob, _b = await alice_and_bob()
    other = await new_peer(BOB, "BOBOTHER")
    await answer_query(alice, KeysQueryAnswer().device(other.machine.device_keys()).json())
    await answer_query(bob, KeysQueryAnswer().device(alice.machine.device_keys()).json())
    await open_session_with(bob, alice)
    # bob's real keys, signed by bob's device, but under the ID of bob's other device
    keys = copy.deepcopy(bob.machine.device_keys())
    keys.pop("signatures")
    keys["device_id"] = "BOBOTHER"
    keys["keys"] = {
        "ed25519:BOBOTHER": bob.machine.identity_keys["ed25519"],
        "curve25519:BOBOTHER": bob.machine.identity_keys["curve25519"],
    }
    got = await crafted(bob, alice, payload_of(bob, device_signed(bob, keys, "BOBOTHER")))
    assert isinstance(got, UndecryptableToDevice)
    assert "other keys than the ones we know" in str(got.error)


# --- every single mutation of a valid answer --------------------------------------------------


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value: each key and index, leaves and containers alike."""
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_paths(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_paths(item, (*path, index)))
    return found


def _mutations(value: Any) -> list[Any]:
    """What a hostile server might put in a place instead: other types, a changed string."""
    others: list[Any] = [None, 0, 1.5, True, "", [], {}, {"ed25519:x": "x"}, ["master"]]
    if isinstance(value, str) and value:
        others.append(value[:-1] + ("A" if value[-1] != "A" else "B"))
    if isinstance(value, dict) and value and all(str(k).startswith("ed25519:") for k in value):
        forger = SigningKey().public  # a well-formed key map holding a key nobody signed
        others.append({f"ed25519:{forger}": forger})
    return [other for other in others if other != value]


DELETE = object()


def _mutated(answer: dict[str, Any], path: tuple[Any, ...], replacement: Any) -> dict[str, Any]:
    changed = copy.deepcopy(answer)
    *parents, last = path
    target = changed
    for step in parents:
        target = target[step]
    if replacement is DELETE:
        del target[last]
    else:
        target[last] = replacement
    return changed


async def test_no_single_mutation_of_a_cross_signing_answer_is_accepted_as_trust() -> None:
    """Each place in a valid answer's cross-signing keys, deleted or replaced in turn: only
    olmstead's errors may escape, and nothing but bob's real keys is ever trusted."""
    bob = await new_peer(BOB, "BOBDEV")
    b = CrossSigningIdentity(BOB)
    answer = KeysQueryAnswer().device(b.sign_device(bob.machine.device_keys())).identity(b)
    answer.user_signing_keys[BOB] = b.user_signing_key()
    valid = answer.json()
    tried = 0
    for section in ("master_keys", "self_signing_keys", "user_signing_keys"):
        for path in [(section,), *((section, BOB, *p) for p in _paths(valid[section][BOB]))]:
            here: Any = valid
            for step in path:
                here = here[step]
            for replacement in [DELETE, *_mutations(here)]:
                tried += 1
                alice = await new_peer(ALICE, "ALICEDEV")
                # refusing the whole answer is allowed; anything else escaping is not
                with contextlib.suppress(OlmsteadError):
                    await answer_query(alice, _mutated(valid, path, replacement))
                identity = await alice.machine.get_user_identity(BOB)
                if identity is not None:
                    assert identity.master_key == b.master.public, (path, replacement)
                    assert identity.self_signing.key == b.self_signing.public
                    if identity.user_signing is not None:
                        assert identity.user_signing.key == b.user_signing.public
                trust = await alice.machine.get_device_trust(BOB, "BOBDEV")
                assert trust is not TrustLevel.VERIFIED
                assert identity is not None or trust is not TrustLevel.CROSS_SIGNED
    assert tried > 100


async def test_events_that_waited_for_their_key_carry_trust_and_can_be_refused() -> None:
    from tests.machine.test_delivery_queue import keep
    from tests.machine.test_withheld import held_back

    for refuse in (False, True):
        alice, bob, requests, event = await held_back()  # bob knows alice: no identity
        bob.machine.only_cross_signed_senders = refuse
        await keep(bob, event)
        for request in requests:
            await bob.machine.receive_sync_changes(
                to_device_events=[deliveries(request, alice, bob)]
            )
        (outcome,) = await bob.machine.retry_waiting_events()
        if refuse:
            assert isinstance(outcome.result, InsecureDevice)
            assert outcome.settles  # final: the key came, the sender is refused
        else:
            assert not isinstance(outcome.result, Exception)
            assert outcome.result.trust is TrustLevel.OWNER_HAS_NO_IDENTITY
