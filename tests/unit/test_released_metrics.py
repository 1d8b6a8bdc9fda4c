"""The final evaluation of a private run as a DP release: each user's contribution is bounded,
every upload carries noise of the documented scale from OS entropy, and the accountant composes
the release with the training rounds exactly as dp-accounting does on its own."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from models.client import SPLIT, TEST, TRAIN, VALID, ClientData
from models.data.schema import ITEM, RATING, USER
from models.mf.family import ExplicitMF
from models.mf.federated import GlobalState, MFConfig
from models.mf.params import ItemParams
from models.privacy.dp import calibrate, epsilon
from models.privacy.released_metrics import (
    PRIMARY_WEIGHT,
    MetricRelease,
    bounded_error_sums,
    evaluation_ratios,
)


def _client(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, split: np.ndarray):
    frame = pd.DataFrame({USER: users, ITEM: items, RATING: ratings, SPLIT: split})
    return ClientData(0, np.arange(users.max() + 1), 50, frame)


def _state(n_items: int = 50, k: int = 2, seed: int = 0) -> GlobalState:
    rng = np.random.default_rng(seed)
    return GlobalState(ItemParams(rng.normal(0, 1, (n_items, k)), rng.normal(0, 1, n_items), 3.0))


def test_the_bounds_and_weights_give_sensitivity_one_and_the_documented_deviations():
    release = MetricRelease(noise_multiplier=2.0, max_rows=10, error_clip=2.0)
    assert release.bound("sse") == 40.0 and release.bound("sae") == 20.0
    assert release.bound("n") == 10.0 and release.bound("ndcg") == release.bound("users") == 1.0
    keys = [("valid", "sse"), ("valid", "sae"), ("valid", "n"), ("baseline/valid", "sse")]
    deviations = release.deviations(keys)
    # weights 4, 1, 4, 4 (sae is secondary): norm sqrt(49) = 7
    assert deviations[("valid", "sse")] == pytest.approx(2.0 * 40.0 * 7 / PRIMARY_WEIGHT)
    assert deviations[("valid", "sae")] == pytest.approx(2.0 * 20.0 * 7)
    assert deviations[("valid", "n")] == pytest.approx(2.0 * 10.0 * 7 / 4)
    assert release.sensitivity(keys) == pytest.approx(1.0)


def test_a_sum_without_a_per_user_bound_is_refused():
    with pytest.raises(ValueError, match="'covered' has no per-user bound"):
        MetricRelease(1.0).bound("covered")


@pytest.mark.parametrize("field", ["noise_multiplier", "max_rows", "error_clip"])
def test_a_release_refuses_non_positive_parameters(field):
    with pytest.raises(ValueError, match=f"{field}=0 must be"):
        MetricRelease(**({"noise_multiplier": 1.0} | {field: 0}))


def test_errors_are_clipped_row_by_row():
    sums = bounded_error_sums(np.array([5.0, 3.0, 1.0]), np.array([1.0, 2.5, 1.0]), 2.0)
    assert sums == {"sse": 4.0 + 0.25, "sae": 2.5, "n": 3.0}


def test_one_users_bounded_evaluation_stays_within_the_bounds():
    # one user with many held-out rows and errors far outside the clip: alone on a client, its
    # sums are its whole contribution
    rng = np.random.default_rng(3)
    n = 60
    items = rng.permutation(50)[: n % 50].tolist() + list(range(n - n % 50))
    items = np.array(items[:n]) % 50
    split = np.array([TRAIN] * 10 + [VALID] * 25 + [TEST] * 25)
    ratings = np.where(np.arange(n) % 2 == 0, 1.0, 5.0)
    client = _client(np.zeros(n, np.int64), items, ratings, split)
    release = MetricRelease(1.0, max_rows=7, error_clip=1.5)
    family = ExplicitMF(MFConfig(n_factors=2, clip_to=(1.0, 5.0)), released=release)
    exact = ExplicitMF(MFConfig(n_factors=2, clip_to=(1.0, 5.0)))
    state = _state()

    bounded = family.evaluate(client, state, ("valid", "test"))
    unbounded = exact.evaluate(client, state, ("valid", "test"))

    for split in ("valid", "test", "baseline/valid", "baseline/test"):
        sums = bounded[split][0]
        for key, value in sums.items():
            assert 0.0 <= value <= release.bound(key) + 1e-9, (split, key, value)
        assert sums["n"] == 7.0  # capped at max_rows
    assert unbounded["valid"][0]["n"] == 25.0
    assert unbounded["baseline/valid"][0]["sse"] > 7 * 1.5**2  # the bound is not vacuous here


def test_the_exact_evaluation_is_unchanged_without_a_release():
    rng = np.random.default_rng(4)
    users, items = rng.integers(0, 8, 200), rng.integers(0, 50, 200)
    ratings = rng.integers(1, 6, 200).astype(float)
    split = rng.choice([TRAIN, VALID, TEST], 200, p=[0.6, 0.2, 0.2])
    client = _client(users, items, ratings, split)
    family = ExplicitMF(MFConfig(n_factors=2, clip_to=(1.0, 5.0)))
    sums = family.evaluate(client, _state(), ("valid",))["valid"][0]
    assert sums["n"] == float((split == VALID).sum())


def test_an_upload_carries_noise_of_the_documented_scale_from_os_entropy():
    release = MetricRelease(noise_multiplier=1.5, max_rows=10, error_clip=2.0)
    big = 1e6  # far from the floor at 0
    evaluations = {
        "train": ({"sse": 5.0, "sae": 3.0, "n": 4.0}, None),
        "valid": ({"sse": big, "sae": big, "n": big}, np.ones(5)),
    }
    uploads = [release.publish(evaluations, np.random.default_rng(s)) for s in range(4000)]

    assert all(set(u) == {"valid"} for u in uploads)  # no training split
    assert all(u["valid"][1] is None for u in uploads)  # no per-item counts
    expected = release.deviations([("valid", "n"), ("valid", "sae"), ("valid", "sse")])
    for key in ("sse", "sae", "n"):
        values = np.array([u["valid"][0][key] for u in uploads])
        assert np.mean(values) == pytest.approx(big, abs=4 * expected[("valid", key)] / 60)
        assert np.std(values) == pytest.approx(expected[("valid", key)], rel=0.05)


def test_noisy_sums_are_floored_at_zero_and_two_uploads_differ():
    from models.federation.sampling import fresh_rng

    release = MetricRelease(2.0)
    # At zero, each noisy sum is floored with probability 1/2: over 20 uploads (60 sums) the
    # chance that none or all are floored is 2 * 2**-60.
    at_zero = {"valid": ({"sse": 0.0, "sae": 0.0, "n": 0.0}, None)}
    values = [
        v for _ in range(20) for v in release.publish(at_zero, fresh_rng())["valid"][0].values()
    ]
    assert min(values) == 0.0 and max(values) > 0.0
    # Far from the floor, two uploads from fresh OS entropy differ in every sum.
    far = {"valid": ({"sse": 1e6, "sae": 1e6, "n": 1e6}, None)}
    first, second = (release.publish(far, fresh_rng())["valid"][0] for _ in range(2))
    assert all(first[key] != second[key] for key in first)


def test_training_noise_is_calibrated_so_rounds_and_evaluations_meet_the_target():
    import dp_accounting
    from dp_accounting import pld, rdp

    delta, rounds, q = 1 / 6040, 3, 0.5
    ratios = evaluation_ratios(champion=True)
    assert ratios == (4.0, 4.0)
    sigma = calibrate(8.0, q, rounds, delta, relative=ratios)
    extra = [4.0 * sigma, 4.0 * sigma]
    # an independent composition: the sampled rounds, then two unsampled evaluation releases
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                rounds,
            ),
            dp_accounting.GaussianDpEvent(4.0 * sigma),
            dp_accounting.GaussianDpEvent(4.0 * sigma),
        ]
    )
    by_pld = pld.PLDAccountant(value_discretization_interval=1e-2)
    by_pld.compose(event)
    by_rdp = rdp.RdpAccountant([*range(2, 65), 80, 96, 128, 192, 256, 512, 1024])
    by_rdp.compose(event)
    expected = min(by_pld.get_epsilon(delta), by_rdp.get_epsilon(delta))
    assert epsilon(sigma, q, rounds, delta, extra=extra) == pytest.approx(expected, rel=1e-9)
    assert 7.99 < expected <= 8.0 + 1e-9
    # the evaluations cost the training noise: more of it than for the rounds alone
    assert sigma > calibrate(8.0, q, rounds, delta) * 1.01


def test_the_evaluations_share_of_the_budget_is_the_same_at_every_epsilon():
    # unsampled rounds and releases compose by their 1/sigma^2: with one release at 4x the
    # training's noise, the training's multiplier is sqrt(1 + 1/16) that of the rounds alone
    delta = 1 / 6040
    for target in (1.0, 8.0):
        alone = calibrate(target, 1.0, 1, delta)
        with_evaluation = calibrate(target, 1.0, 1, delta, relative=evaluation_ratios(False))
        assert with_evaluation / alone == pytest.approx(math.sqrt(1 + 1 / 16), rel=2e-3)


def test_a_single_release_is_counted_as_dp_accounting_counts_one_gaussian():
    # one unsampled release of multiplier 2: PLD's (tight) epsilon, not zero, not RDP's looser one
    delta = 1e-5
    spent = epsilon(1.0, 1.0, 0, delta, extra=(2.0,))
    assert 1.9 < spent < 2.1
    assert math.isclose(epsilon(1.0, 1.0, 0, delta), 0.0)


def test_a_client_asked_again_sends_the_release_it_kept_not_a_second_one(tmp_path):
    # the client task's own function (no Prefect): the first answer is noised from OS entropy and
    # kept beside the partition; asked again under the same name it sends the same numbers
    from models.data.partitions import build_clients, write_partitions
    from models.data.sharding import assign_clients, split_rows
    from models.data.synthetic import generate_synthetic
    from tasks.clients import evaluate_client

    data = generate_synthetic(n_users=60, n_items=50, n_interactions=1500, seed=5)
    rng = np.random.default_rng(0)
    owner = assign_clients(data, n_clients=2, strategy="iid", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.2, test_fraction=0.1)
    manifest = write_partitions(data, build_clients(data, owner, split), tmp_path / "ws")
    release = MetricRelease(1.0)
    family = ExplicitMF(MFConfig(n_factors=2, clip_to=data.rating_scale), released=release)
    entry, state = manifest.clients[0], _state(data.n_items)

    def ask(name: str) -> dict:
        return evaluate_client.fn(workspace=str(tmp_path / "ws"), entry=entry,
                                  n_items=data.n_items, family=family, state=state,
                                  splits=("train", "valid"), release=release,
                                  release_name=name)  # fmt: skip

    first, again, other = ask("round-3"), ask("round-3"), ask("champion")
    assert first == again  # the kept release, not fresh noise
    assert other != first  # another release draws its own noise
    assert set(first) == {"valid", "baseline/valid"}
    with pytest.raises(ValueError, match="does not bound its evaluation"):
        evaluate_client.fn(workspace=str(tmp_path / "ws"), entry=entry, n_items=data.n_items,
                           family=replace(family, released=None), state=state, splits=("valid",),
                           release=release, release_name="x")  # fmt: skip


def test_the_stated_noise_of_a_released_metric_matches_the_spread_of_many_releases():
    """Three clients release the same true sums 4,000 times; every metric computed from each set
    of noisy uploads spreads as :func:`released_noise` says, to within 10%."""
    from models.metrics import finalize_metrics
    from models.privacy.released_metrics import released_noise

    release = MetricRelease(noise_multiplier=0.5)
    true = [
        {
            "valid": ({"sse": 900.0 + 50 * c, "sae": 700.0, "n": 1000.0 + 40 * c, "users": 300.0,
                       "ndcg": 90.0, "recall": 60.0, "precision": 30.0, "hit": 150.0,
                       "map": 40.0}, None),
        }
        for c in range(3)
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    seen: dict[str, list[float]] = {}
    for _ in range(4000):
        uploads = [release.publish(client, rng) for client in true]
        total: dict[str, float] = {}
        for upload in uploads:
            for key, value in upload["valid"][0].items():
                total[key] = total.get(key, 0.0) + value
        for name, value in finalize_metrics(total, k=10).items():
            seen.setdefault(f"valid/{name}", []).append(value)

    stated = released_noise([release.publish(client, rng) for client in true], release, 10)

    assert set(stated) == set(seen) == {
        "valid/rmse", "valid/mae", "valid/precision_at_10", "valid/recall_at_10",
        "valid/ndcg_at_10", "valid/hit_at_10", "valid/map_at_10",
    }  # fmt: skip
    for name, values in seen.items():
        assert stated[name] == pytest.approx(np.std(values), rel=0.1), name
    # a noisy sse floored at 0 reads as RMSE 0.0: its deviation is still stated, and large
    floored = [{"valid": ({**sums, "sse": 0.0}, None)} for (sums, _) in (c["valid"] for c in true)]
    assert released_noise(floored, release, 10)["valid/rmse"] > 5 * stated["valid/rmse"]
