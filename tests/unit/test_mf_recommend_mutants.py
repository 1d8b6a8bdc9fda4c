"""The served MF model's scores and top-k lists against plain Python: every predicted rating is
``mu + b_u + b_i + p_u . q_i``, and ``top_k`` equals a full sort for every ``k``."""

import numpy as np
import pytest

from models.mf.als import UserParams
from models.mf.params import ItemParams
from models.mf.recommend import score_all, top_k


def test_every_score_is_the_mean_plus_both_biases_plus_the_dot_product():
    rng = np.random.default_rng(11)
    users = UserParams(rng.normal(size=(3, 4)), rng.normal(size=3))
    items = ItemParams(rng.normal(size=(5, 4)), rng.normal(size=5), 3.6)
    scores = score_all(users, items)
    for u in range(3):
        for i in range(5):
            expected = (
                3.6
                + users.bias[u]
                + items.bias[i]
                + sum(users.factors[u, f] * items.factors[i, f] for f in range(4))
            )
            assert scores[u, i] == pytest.approx(expected, abs=1e-12)


def test_top_k_is_the_head_of_a_full_sort_of_the_items_not_excluded_for_every_k():
    rng = np.random.default_rng(12)
    scores = rng.permutation(40).astype(float)  # distinct: one right answer
    exclude = rng.random(40) < 0.3
    allowed = sorted((i for i in range(40) if not exclude[i]), key=lambda i: -scores[i])
    for k in range(0, 45):
        best, values = top_k(scores, exclude, k)
        assert list(best) == allowed[:k], k
        np.testing.assert_array_equal(values, scores[allowed[:k]])
    best, values = top_k(scores, np.ones(40, bool), 5)
    assert best.size == 0 and values.size == 0
