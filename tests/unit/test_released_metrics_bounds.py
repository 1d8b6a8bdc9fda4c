"""The evaluation release at its edges: one user's worst rows reach the documented bounds at any
clip, the smallest valid settings are accepted, and a noisy sum is floored at exactly 0."""

from __future__ import annotations

import numpy as np
import pytest

from models.privacy.released_metrics import MetricRelease, bounded_error_sums


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
