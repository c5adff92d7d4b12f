"""Our cross-signing identity through the machine alone: bootstrap, secret storage,
recovery on another device, signing another user, and every refusal."""

from __future__ import annotations

from typing import Any

import pytest

from olmstead import (
    CrossSigningExists,
    DeviceKeysReplaced,
    DeviceUnusable,
    InvalidRecoveryKey,
    InvalidSignature,
    KeysQueryRequest,
    KeysUploadRequest,
    MemoryDatabase,
    MemoryStore,
    OlmMachine,
    OlmsteadError,
    SecretsMismatch,
    SecretStorageMissing,
    SignatureUploadFailed,
    WrongPassphrase,
    WrongRecoveryKey,
)
from olmstead.cross_signing import published_identity
from olmstead.cross_signing import secret_storage as ssss
from olmstead.cross_signing.keys import SigningKey, b64decode, key_object
from olmstead.olm.signing import verify_signed_json
from olmstead.requests import (
    AccountDataRequest,
    DeviceSigningUploadRequest,
    SignaturesUploadRequest,
)
from tests.conftest import FAST_LEASE, KEY
from tests.machine.pair import Peer, new_peer
from tests.machine.test_keys_upload import Clock, ok, pass_device_check

USER = "@bot:example.org"
ITERATIONS = 1000  # PBKDF2 rounds in tests: the format, not the cost, is under test


class OwnKeys:
    """What a homeserver would publish of our user, built from what the machines sent."""

    def __init__(self) -> None:
        self.devices: dict[str, dict[str, Any]] = {}
        self.cross_signing: dict[str, dict[str, Any]] = {}
        self.account_data: dict[str, Any] = {}

    def add_device(self, machine: OlmMachine) -> None:
        self.devices[machine.device_id] = machine.device_keys()

    def query(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"device_keys": {USER: self.devices}, "failures": {}}
        for section, usage in (
            ("master_keys", "master_key"),
            ("self_signing_keys", "self_signing_key"),
            ("user_signing_keys", "user_signing_key"),
        ):
            if usage in self.cross_signing:
                answer[section] = {USER: self.cross_signing[usage]}
        return answer

    def take(self, request: Any) -> dict[str, Any]:
        """Apply a request as the server would; its success answer."""
        if isinstance(request, DeviceSigningUploadRequest):
            self.cross_signing = request.body()
        elif isinstance(request, SignaturesUploadRequest):
            for key_id, signed in request.signed_keys.get(USER, {}).items():
                target = self.devices.get(key_id)
                if target is None:
                    target = self.cross_signing["master_key"]
                for user, sigs in signed["signatures"].items():
                    target.setdefault("signatures", {}).setdefault(user, {}).update(sigs)
            return {"failures": {}}
        elif isinstance(request, AccountDataRequest):
            self.account_data[request.event_type] = request.content
        return {}


async def drive(machine: OlmMachine, server: OwnKeys) -> list[Any]:
    """Hand every request to ``server`` until the machine asks for nothing more."""
    sent: list[Any] = []
    while True:
        requests = await machine.outgoing_requests()
        if not requests:
            return sent
        for request in requests:
            sent.append(request)
            await machine.mark_request_as_sent(request.request_id, server.take(request))


async def settle(machine: OlmMachine) -> OlmMachine:
    """Let the key-state marker of the device's upload go out: only our identity is left."""
    for request in await machine.outgoing_requests():
        assert isinstance(request, AccountDataRequest)
        await machine.mark_request_as_sent(request.request_id, {})
    return machine


async def bootstrapped(passphrase: str | None = None) -> tuple[Peer, OwnKeys, str, list[Any]]:
    peer = await new_peer(USER, "FIRST")
    await settle(peer.machine)
    server = OwnKeys()
    server.add_device(peer.machine)
    key = await peer.machine.bootstrap_cross_signing(
        server.query(), passphrase=passphrase, iterations=ITERATIONS
    )
    sent = await drive(peer.machine, server)
    return peer, server, key, sent


async def second_device(server: OwnKeys) -> Peer:
    peer = await new_peer(USER, "SECOND")
    await settle(peer.machine)
    server.add_device(peer.machine)
    return peer


def test_recovery_keys_round_trip_and_typos_are_refused() -> None:
    key = bytes(range(32))
    text = ssss.encode_recovery_key(key)
    assert text.startswith("Es")
    groups = text.split(" ")
    assert all(len(g) == 4 for g in groups[:-1])
    assert len(text.replace(" ", "")) == 48
    assert ssss.decode_recovery_key(text) == key
    assert ssss.decode_recovery_key(text.replace(" ", "")) == key
    swapped = text[:5] + ("2" if text[5] != "2" else "3") + text[6:]
    with pytest.raises(InvalidRecoveryKey):
        ssss.decode_recovery_key(swapped)
    with pytest.raises(InvalidRecoveryKey, match="base58"):
        ssss.decode_recovery_key("0OIl " + text)
    with pytest.raises(InvalidRecoveryKey, match="prefix"):
        ssss.decode_recovery_key(ssss.encode_recovery_key(key)[:-4])


def test_secrets_encrypt_per_name_and_fail_their_mac_with_another_key() -> None:
    key, other = bytes(32), bytes([1] * 32)
    sealed = ssss.encrypt_secret(key, "m.cross_signing.master", b"secret")
    assert sealed.iv[8] & 0x80 == 0  # bit 63 cleared
    assert ssss.decrypt_secret(key, "m.cross_signing.master", sealed) == b"secret"
    assert ssss.decrypt_secret(other, "m.cross_signing.master", sealed) is None
    assert ssss.decrypt_secret(key, "m.cross_signing.self_signing", sealed) is None
    description = ssss.read_key_description("k", ssss.key_description(key))
    assert description is not None
    assert ssss.key_matches(key, description)
    assert not ssss.key_matches(other, description)


async def test_bootstrap_commits_then_hands_out_keys_signatures_and_secret_storage() -> None:
    peer = await new_peer(USER, "FIRST")
    await settle(peer.machine)
    server = OwnKeys()
    server.add_device(peer.machine)
    key = await peer.machine.bootstrap_cross_signing(server.query(), iterations=ITERATIONS)
    status = peer.machine.cross_signing_status
    assert status.has_keys
    assert not status.published  # not ours until the server confirms them
    assert status.pending == 7
    stored = await peer.machine.store.load_cross_signing()  # committed before anything left
    assert stored is not None
    assert stored.state["outbox"][0]["kind"] == "device_signing"

    first = await peer.machine.outgoing_requests()
    assert [type(r) for r in first] == [DeviceSigningUploadRequest]  # one at a time, in order
    assert await peer.machine.outgoing_requests() == []
    await peer.machine.mark_request_as_sent(first[0].request_id, server.take(first[0]))
    assert peer.machine.cross_signing_status.published
    sent = first + await drive(peer.machine, server)
    assert [type(r) for r in sent] == [
        DeviceSigningUploadRequest,
        SignaturesUploadRequest,
        *[AccountDataRequest] * 5,
    ]
    assert sent[-1].event_type == ssss.DEFAULT_KEY_TYPE  # the default key last
    assert peer.machine.cross_signing_status.pending == 0

    identity = published_identity(
        server.query(), USER, "FIRST", peer.machine.identity_keys["ed25519"]
    )
    assert identity.self_signing_valid
    assert identity.user_signing_valid
    assert identity.device_signed
    assert identity.master_signed_by_device
    assert identity.master_key == peer.machine.cross_signing_status.public_keys["master"]

    # the secrets in account data open with the recovery key, and are the private keys
    key_id = server.account_data[ssss.DEFAULT_KEY_TYPE]["key"]
    secret = ssss.read_encrypted_secret(server.account_data["m.cross_signing.master"], key_id)
    assert secret is not None
    plain = ssss.decrypt_secret(ssss.decode_recovery_key(key), "m.cross_signing.master", secret)
    assert plain is not None
    assert SigningKey(b64decode(plain.decode())).public_key == identity.master_key


async def test_an_interrupted_bootstrap_resumes_with_the_same_keys_and_recovery_key() -> None:
    db = MemoryDatabase()
    store = await MemoryStore.open(KEY, db, lease=FAST_LEASE)
    machine = await OlmMachine.open(store, USER, "FIRST", clock=Clock())
    await pass_device_check(machine, USER, "FIRST")
    (upload,) = await machine.outgoing_requests()
    await machine.mark_request_as_sent(upload.request_id, ok(50))
    await settle(machine)
    key = await machine.bootstrap_cross_signing({}, iterations=ITERATIONS)
    (handed,) = await machine.outgoing_requests()
    await store.close()  # the process dies with the upload in flight

    store = await MemoryStore.open(KEY, db, lease=FAST_LEASE)
    again = await OlmMachine.open(store, USER, "FIRST", clock=Clock())
    # our pending master key on the server (the upload had landed) is no reason to refuse
    server = OwnKeys()
    server.take(handed)
    assert await again.bootstrap_cross_signing(server.query(), iterations=ITERATIONS) == key
    (resent,) = await again.outgoing_requests()
    assert resent == handed  # the same keys, the same bytes, never new ones


async def test_bootstrap_refuses_an_account_that_has_a_master_key_already() -> None:
    _peer, server, _key, _sent = await bootstrapped()
    other = await second_device(server)
    with pytest.raises(CrossSigningExists):
        await other.machine.bootstrap_cross_signing(server.query(), iterations=ITERATIONS)
    assert await other.machine.store.load_cross_signing() is None
    assert await other.machine.outgoing_requests() == []


async def test_a_second_device_recovers_with_the_recovery_key_and_signs_itself() -> None:
    peer, server, key, _sent = await bootstrapped()
    other = await second_device(server)
    await other.machine.recover_cross_signing(server.query(), server.account_data, recovery_key=key)
    assert other.machine.cross_signing_status.public_keys == (
        peer.machine.cross_signing_status.public_keys
    )
    sent = await drive(other.machine, server)
    assert [type(r) for r in sent] == [SignaturesUploadRequest]
    identity = published_identity(
        server.query(), USER, "SECOND", other.machine.identity_keys["ed25519"]
    )
    assert identity.device_signed


async def test_a_passphrase_opens_secret_storage_and_a_wrong_one_is_refused() -> None:
    _peer, server, _key, _sent = await bootstrapped(passphrase="correct horse")
    other = await second_device(server)
    with pytest.raises(WrongPassphrase):
        await other.machine.recover_cross_signing(
            server.query(), server.account_data, passphrase="wrong horse"
        )
    assert await other.machine.store.load_cross_signing() is None
    assert await other.machine.outgoing_requests() == []
    await other.machine.recover_cross_signing(
        server.query(), server.account_data, passphrase="correct horse"
    )
    assert other.machine.cross_signing_status.has_keys


async def test_a_wrong_recovery_key_stores_and_sends_nothing() -> None:
    _peer, server, _key, _sent = await bootstrapped()
    other = await second_device(server)
    wrong = ssss.encode_recovery_key(bytes(32))
    with pytest.raises(WrongRecoveryKey):
        await other.machine.recover_cross_signing(
            server.query(), server.account_data, recovery_key=wrong
        )
    with pytest.raises(InvalidRecoveryKey):
        await other.machine.recover_cross_signing(
            server.query(), server.account_data, recovery_key="EsTx not a key"
        )
    with pytest.raises(SecretStorageMissing):
        await other.machine.recover_cross_signing(server.query(), {}, recovery_key=wrong)
    assert await other.machine.store.load_cross_signing() is None
    assert await other.machine.outgoing_requests() == []


def forge_self_signing(server: OwnKeys) -> None:
    """A self-signing key that the master key did not sign (signature by another key)."""
    intruder = SigningKey.generate()
    ssk = key_object(USER, "self_signing", intruder.public_key)
    master = server.cross_signing["master_key"]["keys"]
    ((master_id, _),) = master.items()
    signed = intruder.sign_json(USER, ssk)
    signed["signatures"][USER][master_id] = signed["signatures"][USER].pop(
        f"ed25519:{intruder.public_key}"
    )
    server.cross_signing["self_signing_key"] = signed


def replace_master(server: OwnKeys) -> None:
    """Another identity's keys, correctly chained: the server's account was reset."""
    master, ssk, usk = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    server.cross_signing = {
        "master_key": key_object(USER, "master", master.public_key),
        "self_signing_key": master.sign_json(
            USER, key_object(USER, "self_signing", ssk.public_key)
        ),
        "user_signing_key": master.sign_json(
            USER, key_object(USER, "user_signing", usk.public_key)
        ),
    }


@pytest.mark.parametrize(
    ("tamper", "error"),
    [(forge_self_signing, InvalidSignature), (replace_master, SecretsMismatch)],
)
async def test_secrets_that_do_not_match_the_published_chain_are_refused(
    tamper: Any, error: type[Exception]
) -> None:
    _peer, server, key, _sent = await bootstrapped()
    other = await second_device(server)
    tamper(server)
    with pytest.raises(error):
        await other.machine.recover_cross_signing(
            server.query(), server.account_data, recovery_key=key
        )
    assert await other.machine.store.load_cross_signing() is None
    assert await other.machine.outgoing_requests() == []


async def test_forged_links_fail_our_own_verifier() -> None:
    peer, server, _key, _sent = await bootstrapped()
    ed25519 = peer.machine.identity_keys["ed25519"]
    forge_self_signing(server)
    forged = published_identity(server.query(), USER, "FIRST", ed25519)
    assert not forged.self_signing_valid
    assert not forged.device_signed
    _peer, server, _key, _sent = await bootstrapped()
    device = server.devices["FIRST"]
    ssk_id = next(k for k in device["signatures"][USER] if k != "ed25519:FIRST")
    device["signatures"][USER][ssk_id] = device["signatures"][USER]["ed25519:FIRST"]
    assert not published_identity(
        server.query(), USER, "FIRST", _peer.machine.identity_keys["ed25519"]
    ).device_signed
    assert not published_identity(server.query(), USER, "FIRST", ed25519).device_signed


async def test_refused_signatures_are_reported_not_ignored() -> None:
    peer = await new_peer(USER, "FIRST")
    await settle(peer.machine)
    server = OwnKeys()
    server.add_device(peer.machine)
    await peer.machine.bootstrap_cross_signing(server.query(), iterations=ITERATIONS)
    (keys,) = await peer.machine.outgoing_requests()
    await peer.machine.mark_request_as_sent(keys.request_id, server.take(keys))
    (signatures,) = await peer.machine.outgoing_requests()
    assert isinstance(signatures, SignaturesUploadRequest)
    failures = {USER: {"FIRST": {"errcode": "M_INVALID_SIGNATURE", "error": "Invalid signature"}}}
    with pytest.raises(SignatureUploadFailed) as caught:
        await peer.machine.mark_request_as_sent(signatures.request_id, {"failures": failures})
    assert caught.value.failures == failures
    (next_one,) = await peer.machine.outgoing_requests()  # the same bytes are not resent
    assert isinstance(next_one, AccountDataRequest)


async def test_signing_another_users_master_key_with_our_user_signing_key() -> None:
    peer, _server, _key, _sent = await bootstrapped()
    theirs = key_object("@alice:example.org", "master", SigningKey.generate().public_key)
    await peer.machine.sign_user("@alice:example.org", theirs)
    (request,) = await peer.machine.outgoing_requests()
    assert isinstance(request, SignaturesUploadRequest)
    ((_public, signed),) = request.signed_keys["@alice:example.org"].items()
    usk = peer.machine.cross_signing_status.public_keys["user_signing"]
    assert verify_signed_json(signed, USER, usk, usk)
    with pytest.raises(InvalidSignature):
        await peer.machine.sign_user("@alice:example.org", {**theirs, "user_id": "@eve:x"})


async def test_our_device_replaced_on_the_server_is_reported_and_uploads_stop() -> None:
    peer = await new_peer(USER, "FIRST")
    await peer.machine.receive_sync_changes(device_lists={"changed": [USER]})
    (query,) = [
        r for r in await peer.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)
    ]
    still = {"device_keys": {USER: {"FIRST": peer.machine.device_keys()}}}
    await peer.machine.mark_request_as_sent(query.request_id, still)
    assert peer.machine.key_problem is None

    await peer.machine.receive_sync_changes(device_lists={"changed": [USER]})
    (query,) = [
        r for r in await peer.machine.outgoing_requests() if isinstance(r, KeysQueryRequest)
    ]
    other = await new_peer(USER, "FIRST")
    replaced = {"device_keys": {USER: {"FIRST": other.machine.device_keys()}}}
    with pytest.raises(DeviceKeysReplaced):
        await peer.machine.mark_request_as_sent(query.request_id, replaced)
    assert isinstance(peer.machine.key_problem, DeviceKeysReplaced)
    await peer.machine.receive_sync_changes(one_time_key_counts={"signed_curve25519": 0})
    assert not [
        r for r in await peer.machine.outgoing_requests() if isinstance(r, KeysUploadRequest)
    ]
    with pytest.raises(DeviceUnusable) as refused:  # and nothing is encrypted as it any more
        await peer.machine.share_room_key("!room:example.org", [USER])
    assert isinstance(refused.value.cause, DeviceKeysReplaced)


def leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        found = [path] if path else []
        for key, item in value.items():
            found.extend(leaf_paths(item, (*path, key)))
        return found
    return [path]


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    return {**value, path[0]: replaced(value[path[0]], path[1:], new)}


HOSTILE: list[Any] = [None, 0, True, "", "A" * 5000, [], {}, {"k": [1, {"x": None}]}, 1.5]


async def test_every_field_of_the_server_s_answers_mutated_is_refused_cleanly() -> None:
    """Each field of the account data and of /keys/query, replaced by hostile values:
    recovery either succeeds unchanged or raises an olmstead error, storing nothing."""
    peer, server, key, _sent = await bootstrapped()
    first_keys = peer.machine.cross_signing_status.public_keys
    other = await second_device(server)
    query = server.query()
    tried = 0
    for source in ("account_data", "query"):
        original = server.account_data if source == "account_data" else query
        for path in leaf_paths(original):
            for value in HOSTILE:
                data = replaced(original, path, value)
                account_data = data if source == "account_data" else server.account_data
                keys = data if source == "query" else query
                tried += 1
                before = await other.machine.store.load_cross_signing()
                try:
                    await other.machine.recover_cross_signing(keys, account_data, recovery_key=key)
                except OlmsteadError:
                    after = await other.machine.store.load_cross_signing()
                    assert (after is None) == (before is None)
                    if after is not None and before is not None:
                        assert (after.secrets, after.state) == (before.secrets, before.state)
                    continue
                # accepted: only a change that leaves what recovery checks intact
                status = other.machine.cross_signing_status
                assert status.public_keys == first_keys
    assert tried > 200
