"""Edges of the robust rules: the bounds of their settings, updates smaller than 1, the screen
against a sign-flipping minority, and which items ``norm_clip`` leaves alone.

Each test states its oracle: numpy's per-item mean, norms worked out by hand, or the honest value
the attackers try to move.
"""

import numpy as np
import pytest

from models.robust import (
    aggregate_robust,
    choose_attackers,
    clip_norms,
    tolerated,
    trimmed_mean,
)


def _one_item(values: list[float]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One contribution per value, each touching item 0 with a 2-vector ``[v, 0]``."""
    return [(np.array([0]), np.array([[v, 0.0]]), np.ones(1)) for v in values]


def test_the_trim_is_a_share_in_0_to_one_half_and_a_zero_trim_is_the_plain_mean():
    assert tolerated(10, 0.0) == 0
    assert tolerated(10, 0.2) == 2 and tolerated(11, 0.2) == 3  # ceil(2.2)
    for bad in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match="must be in"):
            tolerated(10, bad)
    # nothing dropped: each touched item gets numpy's mean of its clients' values
    rng = np.random.default_rng(3)
    parts = [
        (np.array([0, 2]), rng.normal(size=(2, 3)), np.ones(2)),
        (np.array([0]), rng.normal(size=(1, 3)), np.ones(1)),
        (np.array([0, 1, 2]), rng.normal(size=(3, 3)), np.ones(3)),
    ]
    out = trimmed_mean(parts, 4, 0.0)
    np.testing.assert_allclose(out[0], np.mean([parts[0][1][0], parts[1][1][0], parts[2][1][0]], 0))
    np.testing.assert_allclose(out[1], parts[2][1][1])
    np.testing.assert_allclose(out[2], np.mean([parts[0][1][1], parts[2][1][2]], axis=0))
    np.testing.assert_allclose(out[3], 0.0)  # nobody touched it


def test_clipping_refuses_a_factor_that_is_not_positive_and_accepts_one_below_1():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="must be > 0"):
            clip_norms(_one_item([1.0, 2.0]), bad)
    clipped, bound = clip_norms(_one_item([1.0, 2.0, 3.0]), 0.5)
    assert bound == pytest.approx(1.0)  # half the median norm, 2
    np.testing.assert_allclose([np.linalg.norm(v) for _, v, _ in clipped], [1.0, 1.0, 1.0])
    assert clip_norms([], 2.0) == ([], 0.0)


def test_clipping_scales_down_updates_smaller_than_1_and_never_scales_one_up():
    """Norms 0.1, 0.2, 0.3, 0.9 and 0 at factor 1: the median is 0.2, so 0.3 and 0.9 are cut to
    0.2; the others keep their values (none is lifted to the bound), the zero update included."""
    parts = _one_item([0.1, 0.2, 0.3, 0.9, 0.0])
    clipped, bound = clip_norms(parts, 1.0)
    assert bound == pytest.approx(0.2)
    np.testing.assert_allclose(
        [v[0, 0] for _, v, _ in clipped], [0.1, 0.2, 0.2, 0.2, 0.0], rtol=1e-12
    )


def test_the_screen_leaves_out_a_sign_flipping_minority_whose_values_cancel_the_median():
    """Eight clients send +1 and two send -1 on the same items. The -1 rows are the farthest
    from the coordinate-wise median (+1): a squared distance of 4 against 0. A screen that added
    the median instead of subtracting it would rank them closest and keep them."""
    honest = [(np.arange(3), np.ones((3, 2)), np.ones(3)) for _ in range(8)]
    flipped = [(np.arange(3), -np.ones((3, 2)), np.ones(3)) for _ in range(2)]
    update, weight = aggregate_robust(
        honest + flipped, 3, "screened_mean", trim=0.2, clip_factor=2.0, min_clients=3
    )
    np.testing.assert_allclose(update, 1.0)
    np.testing.assert_allclose(weight, 8.0)  # the kept clients' weights only
    mean, _ = aggregate_robust(
        honest + flipped, 3, "mean", trim=0.2, clip_factor=2.0, min_clients=3
    )
    np.testing.assert_allclose(mean, 0.6)  # (8 - 2) / 10: what the screen prevents


def test_norm_clipping_leaves_alone_the_items_fewer_than_min_clients_touched():
    """Item 0 is touched by two clients, item 1 by four: with ``min_clients=3`` item 0's weight is
    0 (the server step keeps its parameters) and item 1's is the sum of its clients' weights."""
    parts = [
        (np.array([0, 1]), np.array([[1.0], [1.0]]), np.array([2.0, 3.0])),
        (np.array([0, 1]), np.array([[1.0], [1.0]]), np.array([1.0, 1.0])),
        (np.array([1]), np.array([[1.0]]), np.array([4.0])),
        (np.array([1]), np.array([[1.0]]), np.array([5.0])),
    ]
    update, weight = aggregate_robust(
        parts, 3, "norm_clip", trim=0.2, clip_factor=2.0, min_clients=3
    )
    np.testing.assert_allclose(weight, [0.0, 13.0, 0.0])
    np.testing.assert_allclose(update[1], 1.0)  # no update is above twice the median norm


def test_the_attack_fraction_is_a_share_of_the_clients():
    assert choose_attackers(4, 1.0, seed=0) == (0, 1, 2, 3)
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="must be in"):
            choose_attackers(10, bad, seed=0)
