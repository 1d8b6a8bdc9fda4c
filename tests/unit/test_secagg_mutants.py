"""Secure aggregation's edges that the protocol tests do not reach: the documented ranges of the
fixed-point encoding and of Shamir secrets, the server's checks of what clients send and of its own
state through bytes, and the round's cost accounting. Oracles are written out by hand (the field
arithmetic of a share, the encoding's bound) or come from the protocol's own invariants (a client
that never sent anything sent 0 bytes)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from models.privacy import secagg as old
from models.privacy import shamir
from models.privacy.fixed_point import FixedPointOverflowError, decode, encode
from models.privacy.identity import generate_identity
from models.privacy.secagg_plus import (
    MaskedInput,
    ProtocolViolationError,
    RoundConfig,
    SurvivorList,
    TooFewClientsError,
    UnmaskRequest,
    default_threshold,
)
from models.privacy.secagg_plus_client import SecAggClient
from models.privacy.secagg_plus_driver import run_round
from models.privacy.secagg_plus_server import SecAggServer
from models.privacy.wire import pack

SIZE = 50


def _identities(n: int):
    identities = {u: generate_identity() for u in range(n)}
    return identities, {u: k.public_key() for u, k in identities.items()}


def _updates(n: int, size: int = SIZE, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.normal(0, 3.0, size) for u in range(n)}


class _Round:
    """The protocol driven by hand up to the commitment, so a test can send what it likes."""

    def __init__(self, n: int = 4, threshold: int = 3) -> None:
        self.identities, self.registry = _identities(n)
        self.config = RoundConfig("mutants", 1, n, SIZE, threshold)
        self.updates = _updates(n)
        self.server = SecAggServer(self.config, self.registry)
        self.clients = {u: SecAggClient(u, self.config) for u in range(n)}

    def masked(self) -> dict[int, MaskedInput]:
        adverts = [c.advertise_keys(self.identities[u]) for u, c in self.clients.items()]
        directory = self.server.key_directory(adverts)
        shares = [c.share_keys(directory, self.registry) for c in self.clients.values()]
        inboxes = self.server.route_shares(shares)
        return {u: c.masked_input(self.updates[u], inboxes[u]) for u, c in self.clients.items()}


# --- fixed point ------------------------------------------------------------------------------


def test_one_client_may_encode_up_to_the_last_value_below_two_to_the_63():
    step = 2.0**-24
    largest = (2.0**63 - 1024) * step  # the largest float below 2^63 (spacing 1024 there)

    encoded = encode(np.array([largest, -largest, 0.75]), n_clients=1)

    np.testing.assert_array_equal(decode(encoded), [largest, -largest, 0.75])
    with pytest.raises(FixedPointOverflowError, match="overflows the sum of 1 clients"):
        encode(np.array([2.0**63 * step]), n_clients=1)  # exactly 2^63: would wrap


@pytest.mark.parametrize(("n_clients", "bits"), [(1, 24), (7, 0), (3, 62)])
def test_the_overflow_message_states_the_bound_and_not_the_value(n_clients, bits):
    limit = 2.0**63 / (n_clients * 2.0**bits)

    with pytest.raises(FixedPointOverflowError) as err:
        encode(np.array([1.5 * limit]), n_clients=n_clients, fraction_bits=bits)

    # the bound, never the value: the message may reach the server, which must see the
    # update masked (an exact site's rating sum was readable in its refusal)
    assert f"{1.5 * limit:.6g}" not in str(err.value)
    assert f"max |x| < {limit:.6g}" in str(err.value)


@pytest.mark.parametrize("bits", [0, 62])
def test_fraction_bits_at_both_ends_of_the_documented_range_encode(bits):
    values = np.array([1.0, -1.0, 0.0])  # integers (0 bits) below 2^63 / 2^62 = 2 (62 bits)

    np.testing.assert_array_equal(
        decode(encode(values, n_clients=1, fraction_bits=bits), fraction_bits=bits), values
    )


@pytest.mark.parametrize("bits", [-1, 63])
def test_fraction_bits_outside_the_documented_range_are_refused(bits):
    with pytest.raises(ValueError, match=r"must be in \[0, 62\]"):
        encode(np.array([1.0]), n_clients=1, fraction_bits=bits)


def test_the_old_encoding_refuses_values_past_two_to_the_62():
    step = 2.0**-24
    fits = (2.0**62 - 512) * step  # the largest float below 2^62 (spacing 512 there)

    np.testing.assert_array_equal(old.decode(old.encode(np.array([fits, -fits]))), [fits, -fits])
    with pytest.raises(ValueError, match=r"\(\|x\| < 2\^38\)"):  # 62 - 24 fraction bits
        old.encode(np.array([2.0**62 * step]))


# --- Shamir -----------------------------------------------------------------------------------


def test_a_64_byte_secret_is_shared_and_a_65_byte_one_refused():
    secret = b"\xff" * 64  # the largest 64-byte secret

    shares = shamir.split(secret, [1, 2, 3], threshold=2)

    assert shamir.combine({2: shares[2], 3: shares[3]}, 2, 64) == secret
    with pytest.raises(ValueError, match="65 bytes, at most 64"):
        shamir.split(b"\x01" * 65, [1, 2, 3], threshold=2)


def test_thresholds_at_both_ends_of_the_documented_range_share():
    secret = b"seed" * 8

    one = shamir.split(secret, [1, 2, 3], threshold=1)  # a constant polynomial: every share is it
    every = shamir.split(secret, [1, 2, 3], threshold=3)

    assert all(shamir.combine({x: y}, 1, 32) == secret for x, y in one.items())
    assert shamir.combine(every, 3, 32) == secret
    with pytest.raises(ValueError, match=r"must be in \[1, 3\]"):
        shamir.split(secret, [1, 2, 3], threshold=0)


def test_shares_of_a_value_just_past_the_length_are_refused_as_inconsistent():
    # f(x) = 2^256 + 5x over GF(p), written out: f(0) = 2^256 does not fit in 32 bytes
    def share(x: int) -> bytes:
        return ((2**256 + 5 * x) % shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")

    with pytest.raises(ValueError, match="does not fit in 32 bytes"):
        shamir.combine({1: share(1), 4: share(4)}, 2, 32)
    assert shamir.combine({1: share(1), 4: share(4)}, 2, 33) == (2**256).to_bytes(33, "big")


# --- the round's configuration and the server's checks ----------------------------------------


def test_a_round_may_need_every_one_of_its_clients():
    config = RoundConfig("all", 1, 3, SIZE, threshold=3)
    identities, registry = _identities(3)
    updates = _updates(3)

    result = run_round(updates, config, identities, registry)

    expected = np.sum([encode(updates[u], n_clients=3) for u in range(3)], axis=0, dtype=np.uint64)
    np.testing.assert_array_equal(result.encoded_total, expected)
    with pytest.raises(ValueError, match="below threshold"):
        RoundConfig("too-few", 1, 2, SIZE, threshold=3)


def test_a_vector_of_one_value_is_summed():
    identities, registry = _identities(3)
    config = RoundConfig("one-value", 1, 3, 1, threshold=2)

    result = run_round(
        {0: np.array([1.5]), 1: np.array([-0.25]), 2: np.array([2.0])}, config, identities, registry
    )

    np.testing.assert_array_equal(result.total, [3.25])


def test_the_default_threshold_is_the_smallest_strict_majority_and_at_least_two():
    for n in range(2, 40):
        majority = next(t for t in range(1, n + 1) if 2 * t > n)
        assert default_threshold(n) == max(2, majority), n


def test_a_state_of_the_other_party_is_refused():
    round_ = _Round()
    round_.masked()
    server_state = round_.server.to_bytes()  # phase "masked", also a client phase
    client_state = round_.clients[0].to_bytes()

    with pytest.raises(ValueError, match="not a secure-aggregation client state"):
        SecAggClient.from_bytes(server_state)
    with pytest.raises(ValueError, match="not a secure-aggregation server state"):
        SecAggServer.from_bytes(client_state, round_.registry)


def test_the_server_refuses_a_masked_input_from_a_stranger_or_sent_twice():
    round_ = _Round()
    inputs = round_.masked()
    stranger = MaskedInput(9, inputs[0].vector)
    with pytest.raises(ProtocolViolationError, match="unexpected masked input from client 9"):
        round_.server.commit([*inputs.values(), stranger])

    round_ = _Round()
    inputs = round_.masked()
    with pytest.raises(ProtocolViolationError, match="unexpected masked input from client 1"):
        round_.server.commit([inputs[0], inputs[1], inputs[1], inputs[2]])


@pytest.mark.parametrize("bad", ["short", "float"])
def test_the_server_refuses_a_masked_vector_of_another_shape_or_type(bad):
    round_ = _Round()
    inputs = round_.masked()
    vector = inputs[2].vector
    vector = vector[:-1] if bad == "short" else vector.astype(np.float64)
    inputs[2] = MaskedInput(2, vector)

    with pytest.raises(ProtocolViolationError, match="masked input of client 2 is"):
        round_.server.commit(list(inputs.values()))


def test_the_server_drops_a_survivor_signature_by_another_identity():
    round_ = _Round()
    survivors = round_.server.commit(list(round_.masked().values()))
    signatures = [
        round_.clients[u].sign_survivors(survivors, round_.identities[u]) for u in (0, 1, 2)
    ]
    forged = round_.clients[3].sign_survivors(survivors, round_.identities[0])  # 0's key, not 3's

    request = round_.server.unmask_request([*signatures, forged])

    assert sorted(request.signatures) == [0, 1, 2]
    assert 3 in round_.server.rejected


def test_the_servers_state_through_bytes_at_every_phase_gives_the_same_sum():
    round_ = _Round()
    masked = round_.masked()
    server = SecAggServer.from_bytes(round_.server.to_bytes(), round_.registry)  # masked phase
    survivors = server.commit(list(masked.values()))
    server = SecAggServer.from_bytes(server.to_bytes(), round_.registry)  # committed
    signatures = [
        round_.clients[u].sign_survivors(survivors, round_.identities[u]) for u in range(4)
    ]
    request = server.unmask_request(signatures)
    server = SecAggServer.from_bytes(server.to_bytes(), round_.registry)  # unmask
    answers = [round_.clients[u].unmask(request, round_.registry) for u in range(4)]

    total = server.aggregate(answers)

    expected = [encode(round_.updates[u], n_clients=4) for u in range(4)]
    np.testing.assert_array_equal(total, np.sum(expected, axis=0, dtype=np.uint64))


# --- cost accounting ------------------------------------------------------------------------


def test_the_rounds_cost_is_measured_and_a_client_that_left_first_cost_nothing():
    identities, registry = _identities(5)
    config = RoundConfig("cost", 1, 5, SIZE, threshold=3)

    started = time.perf_counter()
    result = run_round(_updates(5), config, identities, registry, drop={"advertise": {4}})
    wall = time.perf_counter() - started

    cost = result.cost
    assert cost.bytes_up[4] == cost.bytes_down[4] == 0 and cost.client_seconds[4] == 0.0
    for u in range(4):
        assert cost.bytes_up[u] >= 8 * SIZE  # at least its masked uint64 vector went up
        assert cost.bytes_down[u] > 0
        assert 0.0 < cost.client_seconds[u] <= wall
    assert 0.0 < cost.server_seconds <= wall
    assert cost.server_seconds + sum(cost.client_seconds.values()) <= wall


def test_a_longer_vector_costs_eight_more_bytes_up_per_value():
    identities, registry = _identities(3)

    def bytes_up(size: int) -> dict[int, int]:
        config = RoundConfig("cost", 1, 3, size, threshold=2)
        return run_round(_updates(3, size), config, identities, registry).cost.bytes_up

    short, long = bytes_up(10), bytes_up(1010)

    for u in range(3):
        assert long[u] - short[u] >= 8 * 1000


# --- what a client accepts from a dishonest server --------------------------------------------


def _lowered_server(n: int = 3):
    """Clients configured with threshold n, and a server that runs the same round with 2."""
    identities, registry = _identities(n)
    honest = RoundConfig("dishonest", 1, n, SIZE, threshold=n)
    lowered = RoundConfig("dishonest", 1, n, SIZE, threshold=2)
    clients = {u: SecAggClient(u, honest) for u in range(n)}
    return identities, registry, clients, SecAggServer(lowered, registry)


def test_a_client_refuses_to_mask_when_fewer_clients_shared_than_its_threshold():
    identities, registry, clients, server = _lowered_server()
    directory = server.key_directory([c.advertise_keys(identities[u]) for u, c in clients.items()])
    shares = [clients[u].share_keys(directory, registry) for u in (0, 1)]  # 2's shares lost
    inboxes = server.route_shares(shares)

    with pytest.raises(TooFewClientsError, match="client 0: 2 clients shared keys, threshold is 3"):
        clients[0].masked_input(np.zeros(SIZE), inboxes[0])
    # with every client's shares the same client goes on
    identities, registry, clients, server = _lowered_server()
    directory = server.key_directory([c.advertise_keys(identities[u]) for u, c in clients.items()])
    inboxes = server.route_shares([c.share_keys(directory, registry) for c in clients.values()])
    assert clients[0].masked_input(np.zeros(SIZE), inboxes[0]).client_id == 0


@pytest.mark.parametrize(
    ("kind", "fields", "bad"),
    [
        ("survivor-list", {"survivors": [1, "a"]}, "survivors"),
        (
            "unmask-request",
            {"survivors": [0, 1], "dropped": [], "signatures": {0: b"s", 1: "t"}},
            "signatures",
        ),
        (
            "unmask-request",
            {"survivors": [0, 1], "dropped": [], "signatures": [[0, b"s"]]},
            "signatures",
        ),
    ],
)
def test_a_message_field_of_the_wrong_type_is_refused(kind, fields, bad):
    message = {"survivor-list": SurvivorList, "unmask-request": UnmaskRequest}[kind]

    with pytest.raises(ProtocolViolationError, match=f"{bad} is not a valid"):
        message.from_bytes(pack({"kind": kind, **fields}))


# --- the round's configuration ----------------------------------------------------------------


@pytest.mark.parametrize("degree", [2, 4])
def test_even_degrees_from_two_are_accepted(degree):
    assert RoundConfig("ring", 1, 10, SIZE, threshold=2, degree=degree).degree == degree


@pytest.mark.parametrize("degree", [0, 1, 3, 5])
def test_odd_degrees_and_degrees_below_two_are_refused(degree):
    with pytest.raises(ValueError, match="must be an even number >= 2"):
        RoundConfig("ring", 1, 10, SIZE, threshold=2, degree=degree)


def test_the_threshold_may_reach_but_not_pass_the_degree_plus_one_share_holders():
    assert RoundConfig("ring", 1, 10, SIZE, threshold=3, degree=2).threshold == 3

    with pytest.raises(ValueError, match=r"threshold == 4 exceeds degree \+ 1 == 3 share holders"):
        RoundConfig("ring", 1, 10, SIZE, threshold=4, degree=2)
