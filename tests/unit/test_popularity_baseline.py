"""The ranking families' trivial baseline: the most-popular list from the server's per-item
counts, evaluated on the same rows and with the same exclusions as the model, against an NDCG
written out here from a numpy argsort of the counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.client import SPLIT, ClientData
from models.federation.evaluation import (
    popularity_baselines,
    popularity_evaluation,
    popularity_scores,
    summarize_splits,
)
from models.metrics import finalize_metrics
from models.promotion import WORSE_THAN_BASELINE, baseline_metric, decide_promotion

K = 5
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


def _client(n_users: int = 30, n_items: int = 25, seed: int = 0) -> ClientData:
    """Each user has distinct items drawn by popularity, about half in training and a quarter in
    each held-out split; some users hold no test rows."""
    rng = np.random.default_rng(seed)
    popular = 1.0 / np.arange(1, n_items + 1)  # item 0 the most popular (a Zipf law)
    popular /= popular.sum()
    rows = []
    for user in range(n_users):
        items = rng.choice(n_items, size=int(rng.integers(2, 12)), replace=False, p=popular)
        splits = rng.choice(3, size=items.size, p=[0.5, 0.25, 0.25])
        rows += [(user, int(i), 1.0, int(s)) for i, s in zip(items, splits, strict=True)]
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", SPLIT])
    return ClientData(0, np.arange(n_users), n_items, frame)


def _oracle_ndcg(client: ClientData, split: str, counts: np.ndarray, k: int) -> tuple[float, int]:
    """Sum over users with rows in ``split`` of NDCG@k of the items ordered by ``counts`` (ties:
    lower index first), skipping what the user saw in training (and validation, for test)."""
    frame = client.frame
    seen_splits = [0] if split == "valid" else [0, 1]
    order = np.argsort(-counts, kind="stable")
    total, users = 0.0, 0
    for user, rows in frame[frame[SPLIT] == SPLIT_CODES[split]].groupby("user"):
        relevant = set(rows["item"])
        own = frame[(frame["user"] == user) & frame[SPLIT].isin(seen_splits)]
        seen = set(own["item"])
        top = [int(i) for i in order if int(i) not in seen][:k]
        dcg = sum(1.0 / np.log2(rank + 2) for rank, i in enumerate(top) if i in relevant)
        ideal = sum(1.0 / np.log2(rank + 2) for rank in range(min(k, len(relevant))))
        total += dcg / ideal
        users += 1
    return total, users


@pytest.mark.parametrize("split", ["valid", "test"])
def test_the_most_popular_list_scores_the_ndcg_written_out(split):
    client = _client()
    # integer counts with many ties: the order among equal counts must be the lower index first
    counts = np.random.default_rng(1).integers(0, 6, client.n_items).astype(np.float64)

    sums, recommended = popularity_evaluation(client, split, counts, K)

    expected, users = _oracle_ndcg(client, split, counts, K)
    assert users > 0
    assert sums["users"] == users
    assert sums["ndcg"] == pytest.approx(expected, abs=1e-12)
    assert recommended.sum() == K * users  # every user got a full list (enough unseen items)


def test_ties_go_to_the_lower_item_index():
    scores = popularity_scores(np.array([1.0, 3.0, 3.0, 0.0, 1.0]), n_users=2)

    assert scores.shape == (2, 5)
    assert np.argsort(-scores[0], kind="stable").tolist() == [1, 2, 0, 4, 3]
    assert np.unique(scores[1]).size == 5  # no two items score the same


def test_baselines_use_the_models_users_and_skip_training_and_missing_counts():
    client = _client()
    counts = np.arange(client.n_items, dtype=np.float64)[::-1]
    some = np.array([0, 3, 5])

    assert popularity_baselines(client, None, ["valid", "test"], K) == {}
    out = popularity_baselines(client, counts, ["train", "valid", "test"], K, {"valid": some})

    assert set(out) == {"baseline/valid", "baseline/test"}
    relevant = np.diff(client.matrix("valid").indptr)[some] > 0
    assert out["baseline/valid"][0]["users"] == relevant.sum()  # only the users it was given
    assert out["baseline/test"][0] == pytest.approx(
        popularity_evaluation(client, "test", counts, K)[0]
    )


def test_a_ranking_candidate_below_popularity_is_refused_with_the_baseline_reason():
    client = _client()
    counts = np.bincount(client.rows("train").items, minlength=client.n_items).astype(float)
    # a model that ranks the least popular items first is worse than the most-popular list
    reverse = {
        split: popularity_evaluation(client, split, -counts, K) for split in ("valid", "test")
    }
    parts = [reverse | popularity_baselines(client, counts, ("valid", "test"), K)]
    metrics = summarize_splits(parts, K, client.n_items)
    metric = f"test/ndcg_at_{K}"
    assert metrics[baseline_metric(metric)] == pytest.approx(
        finalize_metrics(popularity_evaluation(client, "test", counts, K)[0], k=K)[f"ndcg_at_{K}"]
    )
    assert metrics[metric] < metrics[baseline_metric(metric)]

    decision = decide_promotion(
        metrics,
        None,
        metric=metric,
        worst_client_metric=f"test/client_min/ndcg_at_{K}",
        min_delta=0.0,
        max_client_regression=1.0,
    )

    assert not decision.promote and decision.reason.startswith(WORSE_THAN_BASELINE)


def test_the_ranking_families_evaluate_the_baseline_beside_the_model():
    from models.neural.family import Neural, NeuralConfig
    from models.ranking.family import TwoStage, TwoStageState
    from models.ranking.federated import RankingConfig

    client = _client()
    counts = np.random.default_rng(2).integers(0, 9, client.n_items).astype(np.float64)
    expected = {s: popularity_evaluation(client, s, counts, 10)[0] for s in ("valid", "test")}

    two_stage = TwoStage(RankingConfig(n_factors=3))
    state = two_stage.initial_state(client.n_items, seed=0)
    assert "baseline/valid" not in two_stage.evaluate(client, state, ("valid",))  # no counts yet
    with_counts = TwoStageState(state.factors, popularity=counts)
    neural = Neural(NeuralConfig(hidden=(8,), latent=4))
    network = neural.initial_state(client.n_items, seed=0)
    network = type(network)(network.params, network.arch, popularity=counts)

    for family, family_state in ((two_stage, with_counts), (neural, network)):
        out = family.evaluate(client, family_state, ("valid", "test"))
        for split in ("valid", "test"):
            assert out[f"baseline/{split}"][0] == pytest.approx(expected[split]), family.name
            assert out[split][0]["users"] == out[f"baseline/{split}"][0]["users"]
