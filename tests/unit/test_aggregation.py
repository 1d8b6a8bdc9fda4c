import numpy as np
import pytest

from models.aggregation import (
    aggregate_item_average,
    aggregate_item_sums,
    aggregate_weighted_average,
)


def test_weighted_average_matches_numpy_average():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(4, 3)) for _ in range(3)]
    weights = [5.0, 1.0, 2.0]

    result = aggregate_weighted_average(list(zip(arrays, weights, strict=True)))

    np.testing.assert_allclose(result, np.average(np.stack(arrays), axis=0, weights=weights))


@pytest.mark.parametrize(
    ("contributions", "message"),
    [
        ([], "zero client"),
        ([(np.ones(2), 0.0), (np.ones(2), 0.0)], "sum to 0"),
        ([(np.ones(2), -1.0)], ">= 0"),
    ],
)
def test_weighted_average_rejects_degenerate_weights(contributions, message):
    with pytest.raises(ValueError, match=message):
        aggregate_weighted_average(contributions)


def test_item_sums_match_dense_sum_with_untouched_item():
    a = (np.array([0, 2]), np.array([[1.0, 2.0], [3.0, 4.0]]))
    b = (np.array([2, 3]), np.array([[10.0, 20.0], [30.0, 40.0]]))

    total = aggregate_item_sums([a, b], n_items=5)

    dense = np.zeros((5, 2))
    for items, values in (a, b):
        dense[items] += values
    np.testing.assert_array_equal(total, dense)
    assert np.all(total[[1, 4]] == 0)  # items 1 and 4 were touched by nobody


def test_item_average_matches_numpy_average_per_item():
    rng = np.random.default_rng(1)
    n_items = 6
    contributions = []
    for _ in range(4):
        items = np.sort(rng.choice(n_items - 1, size=3, replace=False))  # item 5 never touched
        contributions.append((items, rng.normal(size=(3, 2)), rng.integers(1, 9, 3).astype(float)))

    average, weight = aggregate_item_average(contributions, n_items)

    for item in range(n_items):
        values = [v[list(i).index(item)] for i, v, _ in contributions if item in i]
        weights = [w[list(i).index(item)] for i, _, w in contributions if item in i]
        if weights:
            np.testing.assert_allclose(average[item], np.average(values, axis=0, weights=weights))
            assert weight[item] == pytest.approx(sum(weights))
        else:
            assert np.all(average[item] == 0) and weight[item] == 0
    assert weight[5] == 0


def test_fractional_weights_average_like_numpy():
    rng = np.random.default_rng(4)
    arrays = [rng.normal(size=3) for _ in range(3)]
    weights = [0.5, 0.25, 0.125]  # shares, not counts: below 1 is a valid weight

    result = aggregate_weighted_average(list(zip(arrays, weights, strict=True)))

    np.testing.assert_allclose(result, np.average(np.stack(arrays), axis=0, weights=weights))


def test_item_average_with_fractional_weights_covers_every_weighted_item():
    average, total = aggregate_item_average(
        [(np.array([0, 2]), np.array([[1.0], [4.0]]), np.array([0.25, 0.5])),
         (np.array([2]), np.array([[10.0]]), np.array([0.5]))],
        n_items=3,
    )  # fmt: skip

    np.testing.assert_allclose(total, [0.25, 0.0, 1.0])
    np.testing.assert_allclose(average[:, 0], [1.0, 0.0, (0.5 * 4 + 0.5 * 10) / 1.0])


def test_item_average_accepts_a_zero_weight_and_refuses_a_negative_one():
    zero = (np.array([0, 1]), np.array([[2.0], [3.0]]), np.array([0.0, 1.0]))
    average, total = aggregate_item_average([zero], n_items=2)

    np.testing.assert_allclose(total, [0.0, 1.0])
    np.testing.assert_allclose(average[:, 0], [0.0, 3.0])  # weight 0: as if not sent
    with pytest.raises(ValueError, match=">= 0"):
        aggregate_item_average([(np.array([0]), np.array([[1.0]]), np.array([-0.5]))], n_items=1)


def test_item_sums_of_a_single_client_are_its_values_in_place():
    total = aggregate_item_sums([(np.array([2, 0]), np.array([[1.0, 2.0], [3.0, 4.0]]))], n_items=3)

    np.testing.assert_array_equal(total, [[3.0, 4.0], [0.0, 0.0], [1.0, 2.0]])
