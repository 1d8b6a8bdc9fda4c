"""The privacy contract on real flows: every payload a client task hands the server is checked
against the protocol's vocabulary and against the client's own rows; secure aggregation gives the
plain model and survives a dropout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlflow
import numpy as np
import pytest

from fedrec.config import TrainingConfig
from models.client import ClientData
from models.protocol import (
    EVALUATION_SUMS,
    GLOBAL_ARRAYS,
    ITEM_ARRAYS,
    UPDATE_METRICS,
    ClientUpdate,
)
from tests.flows.helpers import tracking_store

SMALL = {"synthetic_users": 300, "synthetic_items": 120, "synthetic_interactions": 9_000,
         "clients": 3, "factors": 3, "rounds": 2, "skip_if_unchanged": False}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-privacy")) as store:
        yield store


def _check_update(update: ClientUpdate, client: ClientData) -> None:
    assert set(update.arrays) <= ITEM_ARRAYS | GLOBAL_ARRAYS, set(update.arrays)
    assert set(update.metrics) <= UPDATE_METRICS, set(update.metrics)
    m = update.items.size
    assert np.all(np.diff(update.items) > 0) and update.counts.shape == (m,)
    frame = client.frame
    ratings, timestamps = frame["rating"].to_numpy(), frame.get("timestamp")
    for name, array in update.arrays.items():
        assert array.dtype.kind in "iuf", (name, array.dtype)  # numbers only: no ids, no text
        if name in ITEM_ARRAYS:
            assert array.shape[0] == m, name
        flat = np.sort(array.ravel())
        assert not (flat.size == ratings.size and np.allclose(flat, np.sort(ratings))), name
        if timestamps is not None and array.dtype.kind == "f":
            assert not np.isin(timestamps.to_numpy(), array).any(), name  # no raw timestamps
    # no per-user vectors: nothing is shaped by the client's users
    assert all(a.shape[0] != client.n_users or a.shape[0] == m for a in update.arrays.values())


def _check_evaluations(evaluations: dict, n_items: int) -> None:
    for sums, recommended in evaluations.values():
        assert set(sums) <= EVALUATION_SUMS, set(sums)
        assert recommended is None or recommended.shape == (n_items,)


def _capture(monkeypatch, seen: list) -> None:
    """Wrap every client task's function so its return value is kept for inspection."""
    import tasks.clients as clients
    import tasks.ranking as ranking
    import tasks.secure as secure

    def wrap(task_obj: Any, kind: str) -> None:
        original: Callable = task_obj.fn

        def spy(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            seen.append((kind, args, result))
            return result

        monkeypatch.setattr(task_obj, "fn", spy)

    for name in ("train_client", "evaluate", "rating_sums"):
        wrap(getattr(clients, name), name)
    wrap(secure.mask_client, "mask_client")
    for name in ("train_implicit_client", "train_ranker_client"):
        wrap(getattr(ranking, name), "train_client")
    for name in ("evaluate_implicit_client", "evaluate_ranking_client"):
        wrap(getattr(ranking, name), "evaluate")
    wrap(ranking.knn_client, "knn_client")


def _run(store, **fields) -> dict:
    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | fields))
    return federated_training(**config.model_dump())


IMPLICIT = {"feedback": "implicit", "factors": 4}


@pytest.mark.parametrize(
    "fields",
    [{}, {"algorithm": "fedavg"}, {"secure_aggregation": True},
     IMPLICIT | {"ranker": "lightgbm", "ranker_rounds": 2}, IMPLICIT | {"dp_epsilon": 8.0}],
    ids=["als", "fedavg", "secure-als", "two-stage", "dp-implicit"],
)  # fmt: skip
def test_every_client_payload_keeps_the_contract(store, monkeypatch, request, fields):
    from tasks.clients import open_client

    seen: list = []
    _capture(monkeypatch, seen)
    _run(store, model_name=f"contract-{request.node.callspec.id}", **fields)

    kinds = {kind for kind, _, _ in seen}
    assert kinds >= {"train_client", "evaluate"}
    assert ("rating_sums" in kinds) == (fields.get("feedback") != "implicit")
    # kNN has no DP mechanism: a private run never asks for co-occurrence counts
    assert ("knn_client" in kinds) == (
        fields.get("feedback") == "implicit" and "dp_epsilon" not in fields
    )
    for kind, args, result in seen:
        if kind == "rating_sums":
            assert set(result) == {"rating_sum", "n"}
            continue
        if kind == "mask_client":
            assert set(result.arrays) == {"masked"} and result.arrays["masked"].dtype == np.uint64
            assert result.items.size == 0  # the server does not learn which items were touched
            continue
        workspace, entry, n_items = args[:3]
        client = open_client(workspace, entry, n_items)
        if kind == "knn_client":
            _check_update(result, client)
        elif kind == "train_client":
            payload, evaluations = result
            if fields.get("secure_aggregation"):
                assert isinstance(payload, bytes) and len(payload) == 32  # an X25519 public key
            else:
                _check_update(payload, client)
            _check_evaluations(evaluations, n_items)
        else:
            _check_evaluations(result, n_items)


def test_secure_aggregation_gives_the_plain_model_and_survives_a_dropout(store):
    plain = _run(store, model_name="plain")
    secure = _run(store, model_name="secure", secure_aggregation=True)
    dropout = _run(store, model_name="dropout", secure_aggregation=True,
                   fault_dropout_clients=(1,), min_clients=2)  # fmt: skip

    mlflow.set_tracking_uri(store["uri"])

    def served(name: str):
        return (
            mlflow.pyfunc.load_model(f"models:/{name}@champion").unwrap_python_model().recommender
        )

    np.testing.assert_allclose(
        served("secure").params.factors, served("plain").params.factors, atol=1e-5
    )
    # the cold-start list comes from the decoded sum of counts: the same popularity
    np.testing.assert_allclose(served("secure").popularity, served("plain").popularity)
    assert secure["metrics"]["test_rmse"] == pytest.approx(plain["metrics"]["test_rmse"], abs=1e-5)
    answered = [m.value for m in store["client"].get_metric_history(dropout["run_id"], "clients")]
    assert answered == [2.0, 2.0]  # client 1 vanished after the keys; the survivors re-keyed


def test_dp_run_logs_epsilon_and_the_ledger_refuses_past_the_budget(store):
    import json

    summary = _run(store, model_name="private", dp_epsilon=8.0, dp_budget=10.0)

    client = store["client"]
    spent = [(m.step, m.value) for m in client.get_metric_history(summary["run_id"], "epsilon")]
    assert [s for s, _ in spent] == [1, 2] and spent[0][1] < spent[1][1] <= 8.0 + 1e-9
    assert spent[1][1] > 7.5  # the noise is calibrated to use the budget asked for
    version = client.get_model_version("private", summary["model_version"])
    assert version.tags["fedrec.epsilon"] == "8.0"
    ledger = json.loads(client.get_registered_model("private").tags["fedrec.epsilon_ledger"])
    assert list(ledger.values()) == [8.0]

    with pytest.raises(
        ValueError, match=r"privacy budget: .* has spent epsilon 8 of 10; this run needs 8 more"
    ):
        _run(store, model_name="private", dp_epsilon=8.0, dp_budget=10.0, rounds=3)
    assert len(client.search_model_versions("name='private'")) == 1


def test_dp_implicit_run_spends_its_epsilon_and_serves_implicit_als_alone(store):
    summary = _run(store, model_name="private-ranking", dp_epsilon=4.0, rounds=3, **IMPLICIT)

    client = store["client"]
    spent = [m.value for m in client.get_metric_history(summary["run_id"], "epsilon")]
    assert len(spent) == 3 and spent == sorted(spent) and 3.8 < spent[-1] <= 4.0 + 1e-9
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pyfunc.load_model("models:/private-ranking@champion").unwrap_python_model()
    retrieval = model.recommender.retrieval
    assert retrieval.similarity is None and model.recommender.ranker is None
    assert np.isfinite(retrieval.item_factors).all()
    version = client.get_model_version("private-ranking", summary["model_version"])
    assert version.tags["fedrec.epsilon"] == "4.0"
    with pytest.raises(ValueError, match="differential privacy covers implicit ALS only"):
        TrainingConfig(feedback="implicit", ranker="lightgbm", dp_epsilon=4.0)
