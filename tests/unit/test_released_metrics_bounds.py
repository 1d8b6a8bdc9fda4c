"""The evaluation release at its edges: one user's worst rows reach the documented bounds at any
clip, the smallest valid settings are accepted, a noisy sum is floored at exactly 0, a sum that
is not a number is released as a 0 would be, and the stated noise of each metric is its first
order deviation, down to denominators below 1 and at 0."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import finalize_metrics
from models.privacy.released_metrics import MetricRelease, bounded_error_sums, released_noise


@pytest.mark.parametrize("clip", [0.5, 3.0])
def test_one_users_worst_rows_reach_each_error_bound(clip):
    release = MetricRelease(noise_multiplier=1.0, max_rows=4, error_clip=clip)
    actual = np.array([1.0, 5.0, 1.0, 5.0])
    predicted = np.array([50.0, -50.0, 9.0, -9.0])  # every error far past the clip

    sums = bounded_error_sums(predicted, actual, clip)

    # by hand: 4 rows, each error clipped to +-clip
    assert sums == {"sse": 4 * clip * clip, "sae": 4 * clip, "n": 4.0}
    assert {k: release.bound(k) for k in sums} == pytest.approx(sums)


def test_the_smallest_valid_settings_are_accepted():
    release = MetricRelease(noise_multiplier=0.1, max_rows=1, error_clip=0.5)

    assert release.bound("n") == 1.0 and release.bound("sae") == 0.5


def test_a_noisy_sum_is_floored_at_exactly_zero():
    zeros = dict.fromkeys(("sse", "sae", "n", "ndcg", "recall", "hit", "users"), 0.0)
    release = MetricRelease(noise_multiplier=1.0)

    published = release.publish(
        {"valid": (zeros, None), "test": (zeros, None)}, np.random.default_rng(3)
    )

    values = [v for sums, _ in published.values() for v in sums.values()]
    assert min(values) == 0.0  # the sums whose noise was negative
    assert max(values) > 0.0 and len(values) == 14


def test_a_sum_that_is_not_a_number_is_released_as_a_zero_would_be():
    release = MetricRelease(noise_multiplier=0.01)
    sums = {"sse": 0.0, "sae": 0.0, "n": 0.0}

    for seed in range(5):
        as_zero = release.publish({"valid": (sums, None)}, np.random.default_rng(seed))
        as_nan = release.publish(
            {"valid": ({**sums, "sse": math.nan}, None)}, np.random.default_rng(seed)
        )
        assert as_nan == as_zero


def _first_order_deviations(
    clients: list[dict[str, dict[str, float]]], release: MetricRelease, k: int
) -> dict[str, float]:
    """The delta method by finite differences of the metrics a reader computes
    (:func:`finalize_metrics` over the summed sums), each sum's variance the clients' summed
    squared deviations (a client's upload, every split's sums, is one release)."""
    out: dict[str, float] = {}
    for split in clients[0]:
        total = {key: sum(c[split][key] for c in clients) for key in clients[0][split]}
        variance = {
            key: sum(
                release.deviations([(s, name) for s in c for name in c[s]])[(split, key)] ** 2
                for c in clients
            )
            for key in total
        }
        slopes: dict[str, dict[str, float]] = {name: {} for name in finalize_metrics(total, k=k)}
        for key, value in total.items():
            h = 1e-6 * max(value, 1e-3)
            up = finalize_metrics({**total, key: value + h}, k=k)
            down = finalize_metrics({**total, key: value - h}, k=k)
            for name, slope in slopes.items():
                slope[key] = (up[name] - down[name]) / (2 * h)
        for name, slope in slopes.items():
            out[f"{split}/{name}"] = math.sqrt(sum(slope[s] ** 2 * variance[s] for s in slope))
    return out


def test_the_stated_noise_is_the_first_order_deviation_of_each_metric_a_reader_computes():
    """Small sums, where the denominator's own noise counts: a split whose row and user counts
    are below 1 still gets its figures, and one whose counts are 0 gets none (as it gets no
    metrics)."""
    release = MetricRelease(noise_multiplier=0.3)
    ranking = {"precision": 1.0, "recall": 3.0, "ndcg": 2.5, "hit": 4.0, "map": 1.5}
    clients = [
        {
            "valid": {"sse": 0.3, "sae": 0.8, "n": 4.0, "users": 6.0, **ranking},
            "test": {"sse": 0.1, "sae": 0.05, "n": 0.25, "users": 0.25,
                     **{key: v / 40 for key, v in ranking.items()}},
            "empty": {"sse": 0.0, "sae": 0.0, "n": 0.0, "users": 0.0, **dict.fromkeys(ranking, 0.0)},
        }
        for _ in range(2)
    ]  # fmt: skip
    oracle = _first_order_deviations(clients, release, 10)

    stated = released_noise(
        [{split: (sums, None) for split, sums in c.items()} for c in clients], release, 10
    )

    assert set(stated) == set(oracle) and len(oracle) == 14
    assert not any(name.startswith("empty/") for name in stated)
    for name, value in oracle.items():
        assert stated[name] == pytest.approx(value, rel=1e-5), name
