import numpy as np
import pytest

from models.mf.linalg import SegmentLayout, pack_symmetric, ridge_solve, unpack_symmetric


@pytest.mark.parametrize("seed", [0, 1])
def test_segment_grams_equal_per_segment_loop(seed):
    rng = np.random.default_rng(seed)
    n_rows, n_keys, n_table, d = 700, 37, 25, 5
    keys = rng.integers(0, n_keys, n_rows) ** 2 % n_keys  # skewed lengths, some keys absent
    others = rng.integers(0, n_table, n_rows)
    table = rng.normal(size=(n_table, d))
    target = rng.normal(size=n_rows)

    layout = SegmentLayout.build(keys, others, n_table)
    grams, rhs = layout.grams_and_rhs(table, target)

    assert np.array_equal(layout.keys, np.unique(keys))
    for s, key in enumerate(layout.keys):
        x = table[others[keys == key]]
        assert layout.counts[s] == np.sum(keys == key)
        np.testing.assert_allclose(grams[s], x.T @ x, atol=1e-12)
        np.testing.assert_allclose(rhs[s], x.T @ target[keys == key], atol=1e-12)


def test_empty_layout_gives_empty_results():
    layout = SegmentLayout.build(np.zeros(0, int), np.zeros(0, int), 4)
    grams, rhs = layout.grams_and_rhs(np.ones((4, 3)), np.zeros(0))
    assert grams.shape == (0, 3, 3) and rhs.shape == (0, 3)


def test_ridge_solve_matches_individual_solves():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4, 4))
    grams = a @ a.transpose(0, 2, 1)
    rhs = rng.normal(size=(6, 4))
    ridge = rng.uniform(0.1, 1.0, size=(6, 4))

    solution = ridge_solve(grams, rhs, ridge)

    for s in range(6):
        np.testing.assert_allclose(
            solution[s], np.linalg.solve(grams[s] + np.diag(ridge[s]), rhs[s])
        )


def test_pack_unpack_round_trip_and_size():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 5, 5))
    sym = a + a.transpose(0, 2, 1)
    packed = pack_symmetric(sym)
    assert packed.shape == (3, 15)
    np.testing.assert_array_equal(unpack_symmetric(packed, 5), sym)
