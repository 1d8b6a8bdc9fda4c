import numpy as np
import pytest

from models.mf.linalg import SegmentLayout, pack_symmetric, ridge_solve, unpack_symmetric


@pytest.mark.parametrize("seed", [0, 1])
def test_segment_statistics_and_solves_equal_per_segment_loop(seed):
    rng = np.random.default_rng(seed)
    n_rows, n_keys, n_table, d = 700, 37, 25, 5
    keys = rng.integers(0, n_keys, n_rows) ** 2 % n_keys  # skewed lengths, some keys absent
    others = rng.integers(0, n_table, n_rows)
    table = rng.normal(size=(n_table, d))
    target = rng.normal(size=n_rows)

    layout = SegmentLayout.build(keys, others, n_table)
    packed, rhs = layout.packed_statistics(table, target)
    ridge = rng.uniform(0.5, 2.0, size=layout.keys.size)
    solution = layout.solve(table, target, ridge)

    assert np.array_equal(layout.keys, np.unique(keys))
    grams = unpack_symmetric(packed, d)
    for s, key in enumerate(layout.keys):
        x = table[others[keys == key]]
        t = target[keys == key]
        assert layout.counts[s] == np.sum(keys == key)
        np.testing.assert_allclose(grams[s], x.T @ x, atol=1e-12)
        np.testing.assert_allclose(rhs[s], x.T @ t, atol=1e-12)
        np.testing.assert_allclose(
            solution[s], np.linalg.solve(x.T @ x + ridge[s] * np.eye(d), x.T @ t)
        )


def test_large_layouts_split_into_threaded_chunks_with_the_same_result(monkeypatch):
    import models.mf.linalg as linalg

    rng = np.random.default_rng(0)
    keys, others = rng.integers(0, 300, 20_000), rng.integers(0, 50, 20_000)
    table, target = rng.normal(size=(50, 8)), rng.normal(size=20_000)
    whole = SegmentLayout.build(keys, others, 50).packed_statistics(table, target)
    monkeypatch.setattr(linalg, "_CHUNK_ROWS", 256)  # forces many chunks, run in the pool

    chunked = SegmentLayout.build(keys, others, 50).packed_statistics(table, target)

    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-10)
    np.testing.assert_allclose(chunked[1], whole[1], atol=1e-10)


def test_empty_layout_gives_empty_results():
    layout = SegmentLayout.build(np.zeros(0, int), np.zeros(0, int), 4)
    packed, rhs = layout.packed_statistics(np.ones((4, 3)), np.zeros(0))
    assert packed.shape == (0, 6) and rhs.shape == (0, 3)
    assert layout.keys.size == 0 and layout.counts.size == 0
    assert layout.solve(np.ones((4, 3)), np.zeros(0), np.zeros(0)).shape == (0, 3)


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


def test_weighted_statistics_and_base_equal_per_segment_loop():
    rng = np.random.default_rng(2)
    keys, others = rng.integers(0, 9, 200), rng.integers(0, 15, 200)
    table, target, w = rng.normal(size=(15, 4)), rng.normal(size=200), rng.uniform(0.5, 3.0, 200)
    base = np.eye(4) * 0.7

    layout = SegmentLayout.build(keys, others, 15)
    packed, rhs = layout.packed_statistics(table, target, gram_weights=w)
    solution = layout.solve(
        table, target, np.full(layout.keys.size, 0.2), gram_weights=w, base=base
    )

    grams = unpack_symmetric(packed, 4)
    for s, key in enumerate(layout.keys):
        x, t, ws = table[others[keys == key]], target[keys == key], w[keys == key]
        gram = x.T @ (ws[:, None] * x)
        np.testing.assert_allclose(grams[s], gram, atol=1e-12)
        np.testing.assert_allclose(rhs[s], x.T @ t, atol=1e-12)
        np.testing.assert_allclose(
            solution[s], np.linalg.solve(gram + base + 0.2 * np.eye(4), x.T @ t), atol=1e-10
        )
