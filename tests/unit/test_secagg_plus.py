"""Secure aggregation with secret-shared masks and signed keys: Shamir, identities, the fixed-point
bound, the exact sum under dropouts, state through bytes, and three attacks that succeed against
the pairwise-only masking of models/privacy/secagg.py and fail against the new protocol.

All key material comes from OS entropy (real X25519, Ed25519, ChaCha20); only updates are seeded.
"""

from __future__ import annotations

import io
import itertools
import os
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from models.privacy import secagg as old
from models.privacy import shamir
from models.privacy.fixed_point import FixedPointOverflowError, decode, encode
from models.privacy.identity import (
    KeyAuthenticationError,
    generate_identity,
    load_identity,
    load_registry,
    public_bytes,
    save_identity,
    sign,
    signed_message,
    verify,
)
from models.privacy.secagg_plus import (
    KeyDirectory,
    MaskedInput,
    ProtocolViolationError,
    RoundConfig,
    SecAggError,
    SurvivorList,
    TooFewClientsError,
    UnmaskRequest,
    agree,
    pair_sign,
    prg,
)
from models.privacy.secagg_plus_client import SecAggClient, mask_once, round_keys_message
from models.privacy.secagg_plus_driver import run_round
from models.privacy.secagg_plus_server import SecAggServer

SIZE = 400
FRACTION_BITS = 24
STEP = 2.0**-FRACTION_BITS


def _identities(n: int):
    identities = {u: generate_identity() for u in range(n)}
    return identities, {u: k.public_key() for u, k in identities.items()}


def _updates(n: int, seed: int = 0, scale: float = 3.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.normal(0, scale, SIZE) for u in range(n)}


class ManualRound:
    """The protocol driven step by step, so a test can play a dishonest server in between."""

    def __init__(self, n: int, threshold: int, seed: int = 0) -> None:
        self.identities, self.registry = _identities(n)
        self.config = RoundConfig("test-run", 1, n, SIZE, threshold)
        self.updates = _updates(n, seed)
        self.server = SecAggServer(self.config, self.registry)
        self.clients = {u: SecAggClient(u, self.config) for u in range(n)}

    def advertise(self):
        adverts = [c.advertise_keys(self.identities[u]) for u, c in self.clients.items()]
        self.directory = self.server.key_directory(adverts)
        return adverts, self.directory

    def through_masking(self):
        """Every client advertises, shares and masks; returns the masked inputs by client."""
        _, directory = self.advertise()
        shares = [c.share_keys(directory, self.registry) for c in self.clients.values()]
        inboxes = self.server.route_shares(shares)
        return {u: c.masked_input(self.updates[u], inboxes[u]) for u, c in self.clients.items()}

    def signatures(self, survivors: SurvivorList, who):
        return [self.clients[u].sign_survivors(survivors, self.identities[u]) for u in who]


# --- Shamir ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["seed", "x25519"])
def test_any_t_shares_rebuild_the_secret_and_t_minus_1_give_a_wrong_one(kind):
    secret = (
        os.urandom(32) if kind == "seed" else old.ClientKeys.generate().private.private_bytes_raw()
    )
    xs, t = [1, 2, 3, 4, 5, 6], 4
    shares = shamir.split(secret, xs, t)

    for subset in itertools.combinations(xs, t):
        assert shamir.combine({x: shares[x] for x in subset}, t, 32) == secret
    for subset in itertools.combinations(xs, t - 1):
        # the best one can do with t-1 points: interpolate the lower-degree polynomial through them
        guess = shamir.combine({x: shares[x] for x in subset}, t - 1, shamir.SHARE_BYTES)
        assert int.from_bytes(guess, "big") != int.from_bytes(secret, "big")
    with pytest.raises(ValueError, match="3 shares given, 4 are needed"):
        shamir.combine({x: shares[x] for x in xs[:3]}, t, 32)


def test_t_minus_1_shares_fit_every_candidate_secret_equally():
    # perfect hiding, checked structurally: for t-1 shares and ANY candidate secret there is a
    # polynomial of degree t-1 through the shares with that secret at 0 (so they rule nothing out)
    t, xs = 3, [1, 2, 3, 4]
    shares = shamir.split(os.urandom(32), xs, t)
    seen = {x: int.from_bytes(shares[x], "big") for x in xs[: t - 1]}
    for candidate in (b"\0" * 32, b"\xff" * 32, os.urandom(32)):
        points = {0: int.from_bytes(candidate, "big"), **seen}

        def f(x, points=points):  # Lagrange through the t points, evaluated anywhere
            total = 0
            for xi, yi in points.items():
                term = yi
                for xj in points:
                    if xj != xi:
                        term = term * (x - xj) * pow(xi - xj, -1, shamir.PRIME)
                total += term
            return total % shamir.PRIME

        assert all(f(x) == y for x, y in seen.items())
        assert f(0) == int.from_bytes(candidate, "big")


def test_sharing_refuses_bad_coordinates_and_thresholds():
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(b"k" * 32, [1, 1, 2], 2)
    with pytest.raises(ValueError, match="out of range"):
        shamir.split(b"k" * 32, [0, 1, 2], 2)
    with pytest.raises(ValueError, match="threshold == 4"):
        shamir.split(b"k" * 32, [1, 2, 3], 4)


def test_sharing_draws_fresh_coefficients_each_time():
    secret = os.urandom(32)
    assert shamir.split(secret, [1, 2], 2)[1] != shamir.split(secret, [1, 2], 2)[1]


# --- identities -----------------------------------------------------------------------------


def test_identity_files_are_private_reloadable_and_never_overwritten(tmp_path):
    key = generate_identity()
    private_path, _ = save_identity(key, tmp_path, 7)

    assert private_path.stat().st_mode & 0o777 == 0o600
    assert load_identity(private_path).private_bytes_raw() == key.private_bytes_raw()
    registry = load_registry(tmp_path)
    assert list(registry) == [7]
    assert registry[7].public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(FileExistsError):
        save_identity(generate_identity(), tmp_path, 7)
    private_path.chmod(0o644)
    with pytest.raises(PermissionError, match="must be 0600"):
        load_identity(private_path)


def _pem(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_the_registry_is_read_only_where_no_one_else_could_have_put_a_key(tmp_path):
    """The registry says whose round keys the server accepts: a key someone else registered for
    client 2 lets them sign round keys as client 2, and simulated clients, which check their
    peers against the same registry, would share masks with them. Each way another user could
    have put it there is refused, naming the file."""
    from models.files import UnsafeFile

    team = tmp_path / "team"
    registry = team / "workspaces" / "run" / "secagg-registry"
    registry.mkdir(parents=True)
    honest, forged = generate_identity(), generate_identity()
    (registry / "client-1.pub").write_bytes(_pem(honest))
    (registry / "client-2.pub").write_bytes(_pem(forged))  # as another user would put it
    (registry / "client-2.pub").chmod(0o644)
    assert load_registry(registry)[2].public_bytes_raw() == public_bytes(forged)  # a trusted place

    team.chmod(0o777)  # every user may write to a folder on the way: any file below may be theirs
    with pytest.raises(UnsafeFile, match=rf"reached through {team}, which every user may write"):
        load_registry(registry)
    team.chmod(0o755)
    for mode in (0o666, 0o620):  # the file itself: writable by every user, or by its group
        (registry / "client-2.pub").chmod(mode)
        refusal = rf"client-2\.pub: the registered identity key has mode {mode:04o}: others may "
        with pytest.raises(
            UnsafeFile, match=refusal + r"write it; only its owner may \(chmod 644 "
        ):
            load_registry(registry)
    (registry / "client-2.pub").unlink()
    elsewhere = tmp_path / "forged.pub"
    elsewhere.write_bytes(_pem(forged))
    (registry / "client-2.pub").symlink_to(elsewhere)  # a name that leads out of the registry
    with pytest.raises(UnsafeFile, match=r"client-2\.pub: the registered identity key is a symb"):
        load_registry(registry)
    (registry / "client-2.pub").unlink()
    (registry / "client-2.pub").write_bytes(_pem(forged))
    (registry / "client-2.pub").chmod(0o600)  # as a run of sites writes its sites' keys
    assert set(load_registry(registry)) == {1, 2}


def test_a_signature_verifies_only_for_its_signer_and_message():
    identities, registry = _identities(2)
    message = signed_message(b"round-keys", b"ctx", 0, b"a", b"b")
    signature = sign(identities[0], message)

    verify(registry, verifier=1, signer=0, message=message, signature=signature)
    with pytest.raises(KeyAuthenticationError, match="does not verify"):
        verify(registry, verifier=1, signer=1, message=message, signature=signature)
    with pytest.raises(KeyAuthenticationError, match="does not verify"):
        other = signed_message(b"round-keys", b"ctx", 0, b"a", b"c")
        verify(registry, verifier=1, signer=0, message=other, signature=signature)
    with pytest.raises(KeyAuthenticationError, match="no signature"):
        verify(registry, verifier=1, signer=0, message=message, signature=b"")
    with pytest.raises(KeyAuthenticationError, match="no identity key registered"):
        verify(registry, verifier=1, signer=5, message=message, signature=signature)


# --- fixed point ----------------------------------------------------------------------------


def test_the_overflow_bound_covers_the_sum_of_the_declared_clients():
    limit = 2.0**63 / 10 / 2.0**FRACTION_BITS  # max |x| for 10 clients
    big = np.array([0.99 * limit, -0.99 * limit])

    encoded = [encode(big, n_clients=10) for _ in range(10)]
    np.testing.assert_allclose(decode(np.sum(encoded, axis=0, dtype=np.uint64)), 10 * big)
    with pytest.raises(FixedPointOverflowError, match="overflows the sum of 11 clients"):
        encode(big, n_clients=11)
    with pytest.raises(FixedPointOverflowError, match="NaN"):
        encode(np.array([np.nan]), n_clients=2)
    # the old per-value check lets through values whose sum over three clients wraps around
    value = old.encode(np.array([0.9 * 2.0**38]))
    assert old.decode(value + value + value)[0] < 0


# --- the protocol ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "drop",
    [
        None,
        {"mask": {2, 7}},  # 20% of 10 vanish after sharing their keys
        {"share": {1}, "mask": {6}},  # 20%, at two stages
        {"advertise": {0}, "unmask": {3, 9}},  # late dropouts are covered by the threshold
    ],
)
@pytest.mark.parametrize("degree", [None, 6])
def test_the_sum_is_exactly_the_sum_of_the_survivors_encoded_updates(drop, degree):
    identities, registry = _identities(10)
    updates = _updates(10, seed=3)
    # a majority of the clients holding each client's shares: 10, or a ring's 7
    threshold = 6 if degree is None else 4
    config = RoundConfig("test-run", 4, 10, SIZE, threshold=threshold, degree=degree)

    result = run_round(updates, config, identities, registry, drop=drop)

    gone = set().union(*(drop or {}).values()) - (drop or {}).get("unmask", set())
    assert set(result.survivors) == set(range(10)) - gone
    encoded = [encode(updates[u], n_clients=10) for u in result.survivors]
    np.testing.assert_array_equal(result.encoded_total, np.sum(encoded, axis=0, dtype=np.uint64))
    plain = np.sum([updates[u] for u in result.survivors], axis=0)
    assert np.abs(result.total - plain).max() <= len(result.survivors) * STEP / 2


def test_the_state_survives_bytes_between_every_phase_without_pickle():
    identities, registry = _identities(5)
    updates = _updates(5, seed=4)
    config = RoundConfig("test-run", 2, 5, SIZE, threshold=3)

    result = run_round(
        updates, config, identities, registry, drop={"mask": {1}}, state_through_bytes=True
    )

    expected = np.sum(
        [encode(updates[u], n_clients=5) for u in (0, 2, 3, 4)], axis=0, dtype=np.uint64
    )
    np.testing.assert_array_equal(result.encoded_total, expected)
    state = SecAggClient(0, config)
    state.advertise_keys(identities[0])
    data = state.to_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:  # no object arrays inside
        assert all(archive[name].dtype != object for name in archive.files)
    assert SecAggClient.from_bytes(data).to_bytes() == data
    with pytest.raises(ValueError, match="not a fedrec protocol payload"):
        SecAggClient.from_bytes(b"\x80\x04 not an npz")


def test_masks_come_from_os_entropy_not_the_global_numpy_generator():
    updates = _updates(3, seed=5)
    inputs = []
    for _ in range(2):
        np.random.seed(0)  # noqa: NPY002 (the global generator is what this test watches)
        before = np.random.get_state()[1].copy()  # noqa: NPY002
        round_ = ManualRound(3, 2)
        round_.updates = updates
        inputs.append(round_.through_masking()[0].vector)
        assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002  # global generator untouched
    assert not np.array_equal(inputs[0], inputs[1])  # same seed, same update, different masks


def test_a_phase_runs_once_and_in_order():
    round_ = ManualRound(3, 2)
    masked = round_.through_masking()
    client = round_.clients[0]
    with pytest.raises(ProtocolViolationError, match="phase 'masked'"):
        client.masked_input(round_.updates[0], None)
    survivors = round_.server.commit(list(masked.values()))
    request = round_.server.unmask_request(round_.signatures(survivors, [0, 1, 2]))
    client.unmask(request, round_.registry)
    with pytest.raises(ProtocolViolationError, match="phase 'done'"):
        client.unmask(request, round_.registry)


def test_a_wrong_share_is_caught_when_the_mask_key_is_rebuilt():
    round_ = ManualRound(4, 3)
    masked = round_.through_masking()
    survivors = round_.server.commit([masked[u] for u in (0, 1, 2)])
    request = round_.server.unmask_request(round_.signatures(survivors, [0, 1, 2]))
    answers = [round_.clients[u].unmask(request, round_.registry) for u in (0, 1, 2)]
    bad = answers[0].s_shares[3]
    answers[0].s_shares[3] = bytes([bad[0] ^ 1]) + bad[1:]

    with pytest.raises(ProtocolViolationError, match=r"wrong share|does not fit"):
        round_.server.aggregate(answers)


# --- attack (b): dropout differencing -------------------------------------------------------


def test_attack_b_dropout_differencing_recovers_an_update_from_the_old_protocol():
    updates = _updates(4, seed=6)
    keys = {i: old.ClientKeys.generate() for i in updates}
    public = {i: k.public for i, k in keys.items()}
    first = {i: old.mask(i, old.encode(u), keys[i], public, b"ctx") for i, u in updates.items()}
    # client 3 "drops"; the survivors run the round again, masking the same updates anew
    survivors_sum = old.survivors_round(updates, [0, 1, 2], b"ctx", attempt=1)
    # ... and then client 3's first vector arrives late
    first_sum = old.decode(old.unmask_sum(list(first.values())))

    recovered = first_sum - survivors_sum
    np.testing.assert_allclose(recovered, updates[3], atol=4 * STEP)


def test_attack_b_a_late_vector_reveals_nothing_with_secret_shared_self_masks():
    round_ = ManualRound(6, 4, seed=6)
    masked = round_.through_masking()
    survivors = round_.server.commit([masked[u] for u in range(5)])  # 5 "drops"
    with pytest.raises(ProtocolViolationError, match="after the round committed"):
        round_.server.late_input(masked[5])
    request = round_.server.unmask_request(round_.signatures(survivors, range(5)))
    answers = [round_.clients[u].unmask(request, round_.registry) for u in range(5)]
    survivors_sum = round_.server.aggregate_decoded(answers)
    np.testing.assert_allclose(
        survivors_sum, sum(round_.updates[u] for u in range(5)), atol=5 * STEP
    )
    assert all(5 not in a.b_shares for a in answers)  # the dropped client's self mask stays secret

    # the server now holds everything it can: the late y_5, the survivors' sum, and client 5's
    # mask key rebuilt from shares; removing every pairwise mask of client 5 leaves x_5 + PRG(b_5)
    s_private = shamir.combine({a.client_id + 1: a.s_shares[5] for a in answers}, 4, 32)
    s_public = round_.directory.s_public
    best = masked[5].vector.copy()
    for v in range(5):
        seed = agree(s_private, s_public[v], round_.config.context, b"mask", 5, v)
        best = best - prg(seed, SIZE) if pair_sign(5, v) > 0 else best + prg(seed, SIZE)
    differencing = decode(np.sum([m.vector for m in masked.values()], axis=0, dtype=np.uint64))
    for estimate in (decode(best), differencing - survivors_sum):
        error = estimate - round_.updates[5]
        assert np.median(np.abs(error)) > 1e9  # uniform mod 2^64: errors of order 2^63 * 2^-24
        assert abs(np.corrcoef(estimate, round_.updates[5])[0, 1]) < 0.3


def test_attack_b_asking_for_both_secrets_of_a_client_is_refused():
    round_ = ManualRound(5, 3)
    masked = round_.through_masking()
    survivors = round_.server.commit(list(masked.values()))
    signatures = {s.client_id: s.signature for s in round_.signatures(survivors, range(5))}
    both = UnmaskRequest(survivors.survivors, (4,), signatures)  # 4 survived AND "dropped"

    with pytest.raises(ProtocolViolationError, match=r"asked for both .* client\(s\) \[4\]"):
        round_.clients[0].unmask(both, round_.registry)
    with pytest.raises(ProtocolViolationError, match="phase 'aborted'"):
        round_.clients[0].unmask(
            UnmaskRequest(survivors.survivors, (), signatures), round_.registry
        )


def test_attack_b_telling_clients_different_survivor_lists_is_refused():
    # the server tells {0, 1, 2, 3, 4} that client 5 survived (to collect b_5) and {6, 7, 8}
    # that it dropped (to collect its mask key); with t a majority only one view can get t
    # signatures, and a client only answers a request signed by t clients over the list it signed
    round_ = ManualRound(9, 5)
    masked = round_.through_masking()
    round_.server.commit(list(masked.values()))
    with_5 = SurvivorList(tuple(range(9)))
    without_5 = SurvivorList((0, 1, 2, 3, 4, 6, 7, 8))
    sig_with = {s.client_id: s.signature for s in round_.signatures(with_5, range(6))}
    sig_without = {s.client_id: s.signature for s in round_.signatures(without_5, [6, 7, 8])}

    with pytest.raises(TooFewClientsError, match="3 survivors signed"):
        round_.clients[6].unmask(
            UnmaskRequest(without_5.survivors, (5,), sig_without), round_.registry
        )
    with pytest.raises(KeyAuthenticationError, match="survivor list of client 0"):
        round_.clients[7].unmask(
            UnmaskRequest(without_5.survivors, (5,), sig_with | sig_without), round_.registry
        )


# --- attack (c): a server substituting public keys ------------------------------------------


def test_attack_c_substituted_keys_unmask_a_client_under_the_old_protocol():
    x = _updates(3, seed=7)
    victim = old.ClientKeys.generate()
    fake = {i: old.ClientKeys.generate() for i in (1, 2)}  # the server's own key pairs
    relayed = {0: victim.public, **{i: k.public for i, k in fake.items()}}

    masked = old.mask(0, old.encode(x[0]), victim, relayed, b"ctx")
    # the server knows the private half of every "peer" key it relayed, so it rebuilds the masks
    unmasked = masked.copy()
    for keys in fake.values():
        unmasked -= old.mask_stream(old._pair_seed(keys.private, victim.public, b"ctx"), SIZE)

    np.testing.assert_allclose(old.decode(unmasked), x[0], atol=STEP)


@pytest.mark.parametrize("forgery", ["substituted", "unsigned", "server-signed", "replayed"])
def test_attack_c_substituted_or_unsigned_keys_abort_the_round(forgery):
    round_ = ManualRound(3, 2)
    _, directory = round_.advertise()
    c_public, s_public, signatures = (
        dict(directory.c_public),
        dict(directory.s_public),
        dict(directory.signatures),
    )
    server_key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    if forgery == "substituted":
        s_public[1] = server_key
    elif forgery == "unsigned":
        s_public[1], signatures[1] = server_key, b""
    elif forgery == "server-signed":
        s_public[1] = server_key
        message = round_keys_message(round_.config, 1, c_public[1], server_key)
        signatures[1] = sign(generate_identity(), message)
    else:  # keys client 1 really signed, but for round 0
        earlier = RoundConfig("test-run", 0, 3, SIZE, 2)
        c_public[1], s_public[1] = os.urandom(32), server_key
        signatures[1] = sign(
            round_.identities[1], round_keys_message(earlier, 1, c_public[1], s_public[1])
        )
    forged = KeyDirectory(c_public, s_public, signatures)

    with pytest.raises(
        KeyAuthenticationError, match=r"client 0: round keys of client 1: .*aborting"
    ):
        round_.clients[0].share_keys(forged, round_.registry)
    assert round_.clients[0].phase == "aborted"


def test_attack_c_the_server_drops_unverifiable_advertisements():
    identities, registry = _identities(3)
    config = RoundConfig("test-run", 1, 3, SIZE, 2)
    adverts = [SecAggClient(u, config).advertise_keys(identities[u]) for u in range(3)]
    forged = type(adverts[2])(2, adverts[2].c_public, secrets.token_bytes(32), adverts[2].signature)

    directory = SecAggServer(config, registry).key_directory([*adverts[:2], forged])

    assert sorted(directory.c_public) == [0, 1]


# --- attack (d): a lone survivor ------------------------------------------------------------


def test_attack_d_a_lone_survivors_vector_is_its_plaintext_under_the_old_protocol():
    x = _updates(1, seed=8)[0]
    keys = old.ClientKeys.generate()

    masked = old.mask(0, old.encode(x), keys, {0: keys.public}, b"ctx")

    np.testing.assert_allclose(old.decode(masked), x, atol=STEP)
    np.testing.assert_allclose(old.secure_sum({0: x}, b"ctx"), x, atol=STEP)


def test_attack_d_a_lone_survivor_is_refused_by_server_and_client():
    with pytest.raises(ValueError, match="threshold == 1, must be >= 2"):
        RoundConfig("test-run", 1, 3, SIZE, threshold=1)
    round_ = ManualRound(2, 2)
    masked = round_.through_masking()

    with pytest.raises(TooFewClientsError, match="1 clients sent masked inputs, threshold is 2"):
        round_.server.commit([masked[0]])
    with pytest.raises(TooFewClientsError, match="1 survivors, threshold is 2"):
        round_.clients[0].sign_survivors(SurvivorList((0,)), round_.identities[0])
    identities, registry = _identities(2)
    with pytest.raises(TooFewClientsError):
        run_round(
            _updates(2), RoundConfig("r", 1, 2, SIZE, 2), identities, registry, drop={"mask": {1}}
        )


def test_malformed_messages_are_refused_at_the_boundary():
    config = RoundConfig("test-run", 1, 2, SIZE, 2)
    good = MaskedInput(0, np.zeros(SIZE, dtype=np.uint64))
    assert MaskedInput.from_bytes(good.to_bytes()).client_id == 0

    with pytest.raises(ProtocolViolationError, match=r"vector is not a valid np\.ndarray"):
        MaskedInput.from_bytes(MaskedInput(0, np.zeros(SIZE)).to_bytes())  # float64, not uint64
    with pytest.raises(ProtocolViolationError, match="client_id is not a valid int"):
        MaskedInput.from_bytes(MaskedInput("0", good.vector).to_bytes())
    with pytest.raises(ProtocolViolationError, match="expected a masked-input message"):
        MaskedInput.from_bytes(SurvivorList((0, 1)).to_bytes())
    with pytest.raises(ProtocolViolationError, match="after the round committed"):
        SecAggServer(config).late_input(good)


def _split_view(config: RoundConfig) -> np.ndarray:
    """The attack: a server shows clients 0 and 1 the survivors {0, 1} and clients 2 and 3 the
    survivors {2, 3}. Each group gathers t signatures for its own list; the first reveals client
    0's self-mask seed (it "survived"), the second its mask key (it "dropped"), and the server
    removes every mask from client 0's input. Returns client 0's update as the server reads it."""
    identities, registry = _identities(4)
    updates = _updates(4, seed=8)
    clients = {u: SecAggClient(u, config) for u in range(4)}
    server = SecAggServer(config, registry)
    directory = server.key_directory([c.advertise_keys(identities[u]) for u, c in clients.items()])
    inboxes = server.route_shares([c.share_keys(directory, registry) for c in clients.values()])
    masked = {u: c.masked_input(updates[u], inboxes[u]) for u, c in clients.items()}
    views = {(0, 1): (2, 3), (2, 3): (0, 1)}
    revealed = {}
    for survivors, dropped in views.items():
        signatures = {
            u: clients[u].sign_survivors(SurvivorList(survivors), identities[u]).signature
            for u in survivors
        }
        request = UnmaskRequest(survivors, dropped, signatures)
        revealed |= {u: clients[u].unmask(request, registry) for u in survivors}
    t = config.threshold
    seed = shamir.combine({u + 1: revealed[u].b_shares[0] for u in (0, 1)}, t, 32)
    key = shamir.combine({u + 1: revealed[u].s_shares[0] for u in (2, 3)}, t, 32)
    vector = masked[0].vector - prg(seed, SIZE)
    for v in (1, 2, 3):
        pair = prg(agree(key, directory.s_public[v], config.context, b"mask", 0, v), SIZE)
        vector = vector - pair if pair_sign(0, v) > 0 else vector + pair
    assert np.abs(decode(vector, fraction_bits=config.fraction_bits) - updates[0]).max() < STEP
    return updates[0]


def test_a_threshold_below_a_majority_of_the_share_holders_is_refused_by_every_client():
    """With t = 2 of 4 the split view above unmasks client 0's update alone (the assert inside
    ``_split_view`` checks the recovered vector against the update when the round goes on);
    each client now refuses to share its keys in such a round, before anything is masked."""
    weak = RoundConfig("split", 1, 4, SIZE, threshold=2, fraction_bits=FRACTION_BITS)
    with pytest.raises(ProtocolViolationError, match="threshold 2 is not a majority of the 4"):
        _split_view(weak)
    # with t = 3 each group of two is one signature short of the unmasking
    majority = RoundConfig("split", 1, 4, SIZE, threshold=3, fraction_bits=FRACTION_BITS)
    with pytest.raises(TooFewClientsError):
        _split_view(majority)


def test_a_client_masks_a_round_once_and_an_update_once(tmp_path):
    """The record a client keeps before it sends a masked input: a second sum over the same
    round, or over the very same update held for another round, is refused before masking
    (two sums with other survivors would give away the difference)."""
    record = tmp_path / "masked"
    update, other = np.arange(6, dtype=np.int64), np.arange(6, dtype=np.int64) + 1
    mask_once(record, "run/round-1", update, "client 3")

    with pytest.raises(
        SecAggError, match=r"^client 3 masked this round's update once already \(run/round-1\)"
    ):
        mask_once(record, "run/round-1", other, "client 3")
    with pytest.raises(
        SecAggError, match=r"^client 3 masked this very update once already \(run/round-2\)"
    ):
        mask_once(record, "run/round-2", update.copy(), "client 3")
    mask_once(record, "run/round-2", other, "client 3")  # a new round and a new update

    with pytest.raises(SecAggError, match="this round's update once already"):
        mask_once(record, "run/round-2", update + 5, "client 3")
    assert len(record.read_text().split()) == 4  # two marks per masked input, nothing else
