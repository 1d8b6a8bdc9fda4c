"""Federated evaluation's catalogue coverage, by hand: the share of items at least one client
put in some user's top-K list, however many times."""

import numpy as np
import pytest

from models.federation.evaluation import summarize_evaluation
from models.metrics import RANKING_KEYS


def _sums(ndcg: float) -> dict[str, float]:
    return {key: 0.0 for key in RANKING_KEYS} | {"users": 1.0, "ndcg": ndcg}


def test_coverage_counts_each_item_recommended_at_least_once_over_all_clients():
    # items 0 and 3 once each, item 1 twice (over two clients), items 2, 4 and 5 never
    parts = [
        (_sums(0.5), np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])),
        (_sums(0.25), np.array([0.0, 1.0, 0.0, 1.0, 0.0, 0.0])),
    ]

    metrics = summarize_evaluation(parts, top_k=2, n_items=6, prefix="valid")

    assert metrics["valid/coverage_at_2"] == pytest.approx(3 / 6)
    assert metrics["valid/ndcg_at_2"] == pytest.approx(0.75 / 2)


def test_without_item_counts_there_is_no_coverage():
    parts = [(_sums(0.5), None)]

    metrics = summarize_evaluation(parts, top_k=2, n_items=6, prefix="valid", spread=False)

    assert "valid/coverage_at_2" not in metrics and metrics["valid/ndcg_at_2"] == 0.5
