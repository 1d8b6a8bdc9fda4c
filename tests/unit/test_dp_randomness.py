"""A private run's randomness cannot be replayed from anything logged, and its accounting is the
sampling that runs. The seed and every client's row count are in MLflow; a stream derived from
them lets a reader regenerate a client's noise and see its exact statistics."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from models.client import ClientData
from models.cohorts import sampled_cohort
from models.data.partitions import build_clients
from models.data.schema import USER
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.federation.loop import run_family
from models.federation.sampling import client_rng, round_rng
from models.mf.family import ExplicitMF
from models.mf.federated import MFConfig
from models.privacy.dp import UserLevelDP, calibrate, epsilon
from models.protocol import ClientUpdate

SEED, ROUND, SIGMA = 42, 3, 1.2


@pytest.fixture(scope="module")
def federation():
    data = generate_synthetic(n_users=120, n_items=60, n_interactions=3000, seed=2)
    rng = np.random.default_rng(0)
    owner = assign_clients(data, n_clients=3, strategy="iid", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.1)
    return data, build_clients(data, owner, split)


def _private(data) -> ExplicitMF:
    dp = UserLevelDP(SIGMA, max_items=30)
    return ExplicitMF(MFConfig(n_factors=3, dp=dp, clip_to=data.rating_scale))


def _without_first_user(client: ClientData) -> ClientData:
    return replace(client, frame=client.frame[client.frame[USER] != 0].reset_index(drop=True))


def _upload(family: ExplicitMF, client: ClientData, state, rng) -> ClientUpdate:
    return family.client_round(client, state, "train", rng, ())[0]


def replay_membership(upload: ClientUpdate, candidates: dict, family, state) -> str | None:
    """The attack of a reader of MLflow: with the logged seed, recompute the upload each candidate
    dataset would give; the one that reproduces it exactly is the client's data."""
    for name, candidate in candidates.items():
        guess = _upload(family, candidate, state, client_rng(SEED, ROUND, candidate.client_id))
        if all(np.array_equal(guess.arrays[k], upload.arrays[k]) for k in upload.arrays):
            return name
    return None


def test_a_seed_derived_stream_gives_membership_away_and_os_entropy_does_not(federation):
    data, clients = federation
    family = _private(data)
    state = family.initial_state(data.n_items, SEED)
    client = clients[0]
    candidates = {"with user 0": client, "without user 0": _without_first_user(client)}

    # the weak stream (seeded by what is logged): the replay identifies the data exactly
    weak = _upload(family, client, state, client_rng(SEED, ROUND, client.client_id))
    assert replay_membership(weak, candidates, family, state) == "with user 0"

    # the stream a private client uses: nothing logged reproduces it
    ours = _upload(family, client, state, round_rng(SEED, ROUND, client.client_id, private=True))
    assert replay_membership(ours, candidates, family, state) is None
    replayed = _upload(family, client, state, client_rng(SEED, ROUND, client.client_id))
    # what subtracting the replayed noise leaves: nothing for the weak stream, noise for ours
    assert np.array_equal(weak.arrays["rhs"], replayed.arrays["rhs"])
    residual = ours.arrays["rhs"] - replayed.arrays["rhs"]
    std = family.config.dp.noise_std(family.config.dp.sensitivity)
    assert np.std(residual) > 0.3 * std


def test_a_private_upload_carries_no_training_metrics(federation):
    data, clients = federation
    family = _private(data)
    state = family.initial_state(data.n_items, SEED)
    update = _upload(family, clients[1], state, round_rng(SEED, 1, 1, private=True))
    assert update.metrics == {}
    assert "mean" not in [p.name for p in family.phases(3)]  # nor the global mean's sums


def test_the_same_private_run_twice_differs_and_the_same_plain_run_twice_does_not(federation):
    data, clients = federation
    private = _private(data)
    plain = ExplicitMF(replace(private.config, dp=None))
    runs = {
        name: [run_family(f, clients, data.n_items, rounds=2, seed=SEED, eval_splits=())[0]
               for _ in range(2)]
        for name, f in (("private", private), ("plain", plain))
    }  # fmt: skip
    a, b = runs["plain"]
    np.testing.assert_array_equal(a.params.factors, b.params.factors)
    a, b = runs["private"]
    assert np.abs(a.params.factors - b.params.factors).max() > 1e-3


def test_private_cohorts_draw_their_users_coins_from_os_entropy(federation):
    _, clients = federation
    client = clients[0]
    seeded = [sampled_cohort(client, 0.5, SEED, ROUND)[0].frame for _ in range(2)]
    assert seeded[0].equals(seeded[1])  # the seeded coins are reproducible
    fresh = [
        sampled_cohort(client, 0.5, SEED, ROUND, round_rng(0, 0, 0, private=True))[0].frame
        for _ in range(2)
    ]
    assert not fresh[0].equals(fresh[1])


@pytest.mark.parametrize("q", [0.25, 1.0])
def test_the_accountant_matches_an_independent_dp_accounting_computation(q):
    import dp_accounting
    from dp_accounting import pld, rdp

    # the documented accountant, built here from dp-accounting alone: the smaller of the PLD bound
    # (pessimistic, grid 1e-2) and the RDP bound (integer orders 2..64 and a few above)
    rounds, delta = 12, 1e-5
    sigma = calibrate(8.0, q, rounds, delta)
    event = dp_accounting.GaussianDpEvent(sigma)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    by_pld = pld.PLDAccountant(value_discretization_interval=1e-2)
    by_pld.compose(event, rounds)
    by_rdp = rdp.RdpAccountant([*range(2, 65), 80, 96, 128, 192, 256, 512, 1024])
    by_rdp.compose(event, rounds)
    expected = min(by_pld.get_epsilon(delta), by_rdp.get_epsilon(delta))
    assert epsilon(sigma, q, rounds, delta) == pytest.approx(expected, rel=1e-9)
    assert 7.9 < epsilon(sigma, q, rounds, delta) <= 8.0 + 1e-9
    # PLD is the tighter bound here: RDP alone would spend more than the target at this noise
    assert by_rdp.get_epsilon(delta) > 8.0


@pytest.mark.parametrize("devices", [None, 0.5])
def test_a_private_client_task_draws_from_os_entropy_and_resends_its_kept_answer(
    federation, tmp_path, devices
):
    from models.data.partitions import write_partitions
    from tasks.clients import train_client

    data, clients = federation
    family = _private(data)
    state = family.initial_state(data.n_items, SEED)
    answers = {}
    for name in ("a", "b"):  # two workspaces holding the same partitions, asked the same
        entry = write_partitions(data, clients, tmp_path / name).clients[0]
        asked = {"workspace": str(tmp_path / name), "entry": entry, "n_items": data.n_items,
                 "family": family, "state": state, "phase": "train", "round_": ROUND,
                 "seed": SEED, "devices": devices}  # fmt: skip
        first, _ = train_client.fn(**asked)
        again, _ = train_client.fn(**asked)  # a retry: the kept answer, not a second release
        assert first.arrays and all(
            np.array_equal(first.arrays[k], again.arrays[k]) for k in first.arrays
        )
        answers[name] = first
    # every input the server chose is the same: a stream derived from the logged seed, round and
    # client would give both the same noise (and sampled users)
    a, b = answers["a"], answers["b"]
    assert any(
        a.arrays[k].shape != b.arrays[k].shape or not np.array_equal(a.arrays[k], b.arrays[k])
        for k in a.arrays
    )
