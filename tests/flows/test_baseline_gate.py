"""No registry promotes a model worse than the trivial baseline on the same validation rows: the
candidate is registered with that reason and the champion alias is not given to it."""

from __future__ import annotations

import pytest

from fedrec.config import TrainingConfig
from models.promotion import WORSE_THAN_BASELINE
from tests.flows.helpers import tracking_store

SMALL = {"synthetic_users": 300, "synthetic_items": 120, "synthetic_interactions": 9_000,
         "clients": 3, "factors": 3, "skip_if_unchanged": False, "model_name": "gated"}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-gate")) as store:
        yield store


def _run(store, **fields) -> dict:
    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | fields))
    return federated_training(**config.model_dump())


def test_a_candidate_worse_than_the_baseline_is_registered_and_not_promoted(store):
    client = store["client"]
    # one round under a ridge of 1000: every factor and bias shrinks to 0, the global mean alone
    bad = _run(store, rounds=1, reg=1000.0)

    metrics = bad["metrics"]
    assert metrics["valid/rmse"] > metrics["baseline/valid/rmse"]
    assert not bad["promoted"] and bad["reason"].startswith(WORSE_THAN_BASELINE)
    assert f"{metrics['baseline/valid/rmse']:.4f}" in bad["reason"]
    version = client.get_model_version("gated", bad["model_version"])
    assert version.tags["fedrec.promotion_reason"] == bad["reason"]
    # no champion: the first model was not good enough
    assert "champion" not in client.get_registered_model("gated").aliases

    good = _run(store, rounds=2)

    assert good["metrics"]["valid/rmse"] < good["metrics"]["baseline/valid/rmse"]
    assert good["promoted"], good["reason"]
    champion = client.get_model_version_by_alias("gated", "champion")
    assert str(champion.version) == str(good["model_version"])


# implicit feedback whose users meet what they like more than what is popular: a model that
# learns beats the most-popular list, one that has not learned yet does not
IMPLICIT = {"synthetic_users": 1000, "synthetic_items": 120, "synthetic_interactions": 20_000,
            "synthetic_taste": 6.0, "clients": 3, "feedback": "implicit",
            "skip_if_unchanged": False}  # fmt: skip
NEURAL = {"implicit_model": "neural", "neural_latent": 16, "neural_local_epochs": 5}
RANKING = {
    # one round of a step size too small to move the network from its random start, or three
    # that learn
    "neural": (
        NEURAL | {"rounds": 1, "neural_lr": 1e-5},
        NEURAL | {"rounds": 3, "neural_lr": 1e-2},
    ),
    # one round of rank-1 implicit ALS (with item-kNN; without EASE, which would rank instead),
    # or three of rank 8
    "two-stage": (
        {"rounds": 1, "factors": 1, "ease_reg": 0.0},
        {"rounds": 3, "factors": 8, "reg": 5.0},
    ),
}


@pytest.mark.parametrize("family", RANKING)
def test_a_ranking_candidate_worse_than_popularity_is_registered_and_not_promoted(store, family):
    client = store["client"]
    name = f"gated-{family}"
    bad_fields, good_fields = RANKING[family]
    bad = _run(store, **(IMPLICIT | bad_fields | {"model_name": name}))

    metrics = bad["metrics"]
    popular = metrics["baseline/valid/ndcg_at_10"]  # the most-popular list on the same rows
    assert metrics["valid/ndcg_at_10"] < popular and popular > 0.1
    assert "baseline/test/ndcg_at_10" in metrics
    assert not bad["promoted"] and bad["reason"].startswith(WORSE_THAN_BASELINE)
    assert f"{popular:.4f}" in bad["reason"] and "valid/ndcg_at_10" in bad["reason"]
    version = client.get_model_version(name, bad["model_version"])
    assert version.tags["fedrec.promotion_reason"] == bad["reason"]
    assert "champion" not in client.get_registered_model(name).aliases

    good = _run(store, **(IMPLICIT | good_fields | {"model_name": name}))

    assert good["metrics"]["valid/ndcg_at_10"] > good["metrics"]["baseline/valid/ndcg_at_10"]
    assert good["promoted"], good["reason"]
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == str(good["model_version"])
