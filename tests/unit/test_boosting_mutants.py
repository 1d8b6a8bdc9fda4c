"""The re-ranker's LightGBM helpers at their edges: the settings' bounds, a silent fit, the cache
key of an ensemble's prefix, weighted gains, a round of one query group and the pooled reference.

Oracles: LightGBM's own boosters (their predictions and gains), and the bounds LightGBM itself
enforces.
"""

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from models.ranking.boosting import (
    RankerConfig,
    TreeEnsemble,
    boost_client,
    round_weights,
    train_centralized,
)
from models.ranking.features import CATEGORICAL, FEATURES


@pytest.fixture(scope="module")
def ranking_rows():
    rng = np.random.default_rng(4)
    features = pd.DataFrame(rng.normal(size=(200, len(FEATURES))), columns=list(FEATURES))
    features[list(CATEGORICAL)] = rng.integers(0, 3, (200, len(CATEGORICAL)))
    labels = (features["ease_score"] + 0.2 * rng.normal(size=200) > 0.5).astype(float).to_numpy()
    return features, labels, np.full(20, 10)


def test_the_smallest_settings_are_accepted_and_one_below_them_refused():
    RankerConfig(rounds=1, trees_per_round=1, min_data_in_leaf=1, num_threads=1, num_leaves=2)
    RankerConfig(learning_rate=1.0, subsample=1.0)
    for name in ("rounds", "trees_per_round", "min_data_in_leaf", "num_threads"):
        with pytest.raises(ValueError, match=f"ranker {name}=0 must be >= 1"):
            RankerConfig(**{name: 0})
    with pytest.raises(ValueError, match="num_leaves=1 must be >= 2"):
        RankerConfig(num_leaves=1)
    for name in ("learning_rate", "subsample"):
        for bad in (0.0, 1.5):
            with pytest.raises(ValueError, match=rf"ranker {name}={bad} must be in \(0, 1\]"):
                RankerConfig(**{name: bad})


def test_lightgbm_refuses_one_leaf_as_the_configuration_does(ranking_rows):
    features, labels, groups = ranking_rows
    data = lgb.Dataset(features.to_numpy(), label=labels, group=groups)
    params = {**RankerConfig().lgb_params(0), "num_leaves": 1}
    with pytest.raises(lgb.basic.LightGBMError, match="num_leaves"):
        lgb.train(params, data, num_boost_round=1)


def test_bagging_runs_only_when_it_leaves_rows_out():
    assert RankerConfig(subsample=0.8).lgb_params(0)["bagging_freq"] == 1
    assert RankerConfig(subsample=1.0).lgb_params(0)["bagging_freq"] == 0


def test_a_client_fit_prints_nothing(ranking_rows, capfd):
    features, labels, groups = ranking_rows
    config = RankerConfig(trees_per_round=2, min_data_in_leaf=5)
    capfd.readouterr()
    boost_client(features, labels, groups, np.zeros(len(labels)), config, seed=1)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_the_prefix_key_names_the_last_member_of_the_prefix(ranking_rows):
    features, labels, groups = ranking_rows
    config = RankerConfig(trees_per_round=2, min_data_in_leaf=5)
    a, b, c = (boost_client(features, labels, groups, np.zeros(200), config, s) for s in (1, 2, 3))
    first, second = TreeEnsemble(((a, 1.0), (b, 1.0))), TreeEnsemble(((a, 1.0), (c, 1.0)))
    assert first.prefix_key(1) == second.prefix_key(1)
    assert first.prefix_key(2) != second.prefix_key(2)  # same length, another last member
    assert TreeEnsemble(((b, 1.0), (a, 1.0))).prefix_key(2) != first.prefix_key(2)
    assert first.prefix_key(0) == (0, 0)


def test_gains_are_each_boosters_gains_weighted_like_its_scores(ranking_rows):
    features, labels, groups = ranking_rows
    config = RankerConfig(trees_per_round=3, min_data_in_leaf=5)
    texts = [boost_client(features, labels, groups, np.zeros(200), config, s) for s in (1, 2)]
    ensemble = TreeEnsemble(((texts[0], 0.75), (texts[1], 0.25)))
    expected = sum(
        w * lgb.Booster(model_str=t).feature_importance(importance_type="gain")
        for t, w in ((texts[0], 0.75), (texts[1], 0.25))
    )
    gains = ensemble.feature_importance()
    np.testing.assert_allclose(gains[list(FEATURES)].to_numpy(), expected, rtol=1e-12)
    assert list(gains) == sorted(gains, reverse=True)


def test_a_round_of_one_query_group_gives_it_the_whole_weight():
    np.testing.assert_allclose(round_weights([1, 0]), [1.0, 0.0])
    with pytest.raises(ValueError, match="no client had a query group"):
        round_weights([0, 0])


def test_the_pooled_reference_scores_as_its_one_booster(ranking_rows):
    features, labels, groups = ranking_rows
    config = RankerConfig(rounds=2, trees_per_round=2, min_data_in_leaf=5)
    pooled = train_centralized(features, labels, groups, config)
    ((text, _),) = pooled.members
    booster = lgb.Booster(model_str=text)
    assert booster.num_trees() == 4  # rounds x trees per round
    np.testing.assert_allclose(
        pooled.predict(features),
        booster.predict(features[list(FEATURES)].to_numpy(), raw_score=True),
        rtol=1e-12,
    )
