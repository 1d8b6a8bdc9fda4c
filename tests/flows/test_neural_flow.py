"""The neural family through the real flow: the network the flow registers is the one the
reference loop trains on the same partitions, and it serves through the same interface."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import model_file_kinds, tracking_store

# users whose taste, more than popularity, decides what they meet, and clients that train enough
# for the network to learn it: the most-popular list is the bar a registered model must clear
TINY = {"synthetic_users": 1000, "synthetic_items": 120, "synthetic_interactions": 20_000,
        "synthetic_taste": 6.0, "clients": 3, "rounds": 3, "feedback": "implicit",
        "implicit_model": "neural", "neural_latent": 16, "neural_lr": 1e-2,
        "neural_local_epochs": 5, "skip_if_unchanged": False, "keep_workspace": True}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-neural-home")) as store:
        yield store


@pytest.fixture(scope="module")
def trained(store):
    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], **TINY)
    return config, federated_training(**config.model_dump())


def test_the_flow_registers_the_network_the_reference_loop_trains(store, trained):
    from models.data.partitions import read_manifest, read_partition
    from models.federation.loop import run_family
    from models.neural.family import Neural
    from tasks.tracking import load_recommender

    config, summary = trained
    assert summary["model_name"] == "fedrec-neural" and summary["promoted"]
    metrics = summary["metrics"]  # it learned: clearly above the most-popular list on the same rows
    assert metrics["valid/ndcg_at_10"] > metrics["baseline/valid/ndcg_at_10"] + 0.02
    served = load_recommender(store["uri"], "models:/fedrec-neural@champion")

    manifest = read_manifest(summary["workspace"])
    clients = [read_partition(summary["workspace"], e, manifest.n_items) for e in manifest.clients]
    family = Neural(config.neural_config())
    state, _ = run_family(family, clients, manifest.n_items, rounds=config.rounds,
                          seed=config.seed, eval_splits=())  # fmt: skip
    for name, value in state.params.items():
        np.testing.assert_allclose(served.params[name], value, rtol=1e-5, atol=1e-6)
    assert served.arch == state.arch and served.arch.kind == "dae"

    steps = store["client"].get_metric_history(summary["run_id"], "valid/ndcg_at_10")
    assert sorted(m.step for m in steps) == [1, 2, 3]
    # named after the network, not the two-stage family's retrieval models
    assert store["client"].get_run(summary["run_id"]).info.run_name == "mult-dae-z16-3c-3r"


def test_the_served_network_recommends_unseen_items_with_reasons(store, trained):
    from tasks.tracking import load_recommender

    _, summary = trained
    served = load_recommender(store["uri"], "models:/fedrec-neural@champion")
    history = [str(i) for i in served.item_ids[:6]]
    answer = served.recommend(
        pd.DataFrame({"user_id": ["u", "new"], "history_items": [history, []]}), k=5
    )
    mine = answer[answer.user_id == "u"]
    assert list(mine["rank"]) == [1, 2, 3, 4, 5] and not set(mine.item_id) & set(history)
    assert mine["reason"].str.startswith("because you liked").all()
    assert (
        answer[answer.user_id == "new"]["reason"] == "no known items in history: most popular items"
    ).all()
    kinds = model_file_kinds(
        store["uri"], "fedrec-neural", summary["model_version"], store["home"] / "files"
    )
    assert "npz" in kinds.values()
