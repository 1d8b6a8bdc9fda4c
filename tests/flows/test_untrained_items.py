"""Items of the catalogue that no client had a training row of (here: items found only in the
test file) are served as unknown by the implicit families, as by MF: never recommended, never
scored, ignored in a history. What a model holds of them is what it started from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.flows.helpers import tracking_store

FAMILIES = {
    "two-stage": {"ranker": "lightgbm", "ranker_rounds": 2, "factors": 8, "candidates": 40},
    "neural": {"implicit_model": "neural", "neural_latent": 16},
}


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    from models.data.synthetic import generate_synthetic

    folder = tmp_path_factory.mktemp("untrained")
    data = generate_synthetic(n_users=300, n_items=200, n_interactions=9_000, seed=5)
    rows = pd.DataFrame({"user_id": data.user_ids[data.frame["user"]].astype(str),
                         "item_id": data.item_ids[data.frame["item"]].astype(str)})  # fmt: skip
    is_test = np.random.default_rng(0).random(len(rows)) < 0.2
    only_in_test = rows.item_id.unique()[:3].tolist()
    is_test |= rows.item_id.isin(only_in_test).to_numpy()
    rows[~is_test].to_csv(folder / "train.csv", index=False)
    rows[is_test].to_csv(folder / "test.csv", index=False)
    return folder, rows[~is_test], only_in_test


@pytest.mark.parametrize("family", FAMILIES)
def test_items_without_training_rows_are_never_served(family, split_files, prefect_server):
    from flows.training import federated_training
    from tasks.tracking import load_recommender

    folder, train, only_in_test = split_files
    with tracking_store(folder / family) as store:
        summary = federated_training(
            train=str(folder / "train.csv"), test=str(folder / "test.csv"), feedback="implicit",
            rounds=2, clients=3, tracking_uri=store["uri"], model_name=family,
            **FAMILIES[family],
        )  # fmt: skip
        served = load_recommender(store["uri"], f"models:/{family}/{summary['model_version']}")

    assert set(only_in_test) <= set(served.item_ids)  # in the catalogue the test file made
    assert set(served.known_items) == set(train.item_id)  # served: what training had rows of
    liked = train.item_id.iloc[0]
    everything = served.recommend(
        pd.DataFrame({"user_id": ["fan", "new", "asks"],
                      "history_items": [[liked], [], [liked, only_in_test[0]]],
                      "items": [None, None, [only_in_test[1], train.item_id.iloc[1]]]}),
        k=len(served.item_ids),
    )  # fmt: skip
    for user in ("fan", "new"):  # neither a personal list nor the most-popular one holds them
        listed = everything[everything.user_id == user].item_id
        assert len(listed) and not set(only_in_test) & set(listed), user
    assert len(everything[everything.user_id == "new"]) == len(train.item_id.unique())
    asked = everything[everything.user_id == "asks"].set_index("item_id")
    assert not np.isfinite(asked.score.get(only_in_test[1], np.nan))  # not scored
    assert np.isfinite(asked.score[train.item_id.iloc[1]])
    # an untrained item in a history changes nothing: it is ignored, and said to be
    assert "ignored 1 unknown item(s)" in asked.reason[train.item_id.iloc[1]]
    alone = served.recommend(
        pd.DataFrame({"user_id": ["a", "b"], "history_items": [[liked], [liked, only_in_test[0]]]}),
        k=5,
    )
    a, b = (alone[alone.user_id == u] for u in ("a", "b"))
    assert a.item_id.tolist() == b.item_id.tolist()
    np.testing.assert_allclose(a.score.to_numpy(float), b.score.to_numpy(float))
