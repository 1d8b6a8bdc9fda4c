"""The implicit-feedback flow (implicit ALS + item-kNN + federated LightGBM re-ranker) against a
real Prefect test server, a real MLflow registry and `mlflow models serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import tracking_store

ALS_ROUNDS, RANKER_ROUNDS = 3, 3
SMALL = {"synthetic_users": 400, "synthetic_items": 200, "synthetic_interactions": 16_000,
         "clients": 3, "factors": 8, "reg": 5.0, "candidates": 40, "neighbours": 40}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-ranking-home")) as store:
        yield store


def _config(store, **overrides) -> TrainingConfig:
    base = {"feedback": "implicit", "ranker": "lightgbm", "rounds": ALS_ROUNDS, "ranker_rounds": RANKER_ROUNDS,
            "tracking_uri": store["uri"], "model_name": "ranktest"}  # fmt: skip
    return TrainingConfig(**(base | SMALL | overrides))


@pytest.fixture(scope="module")
def first_run(store):
    from flows.training import federated_training

    config = _config(store)
    return config, federated_training(**config.model_dump())


def test_steps_continue_across_stages_and_the_reranker_lifts_ndcg(store, first_run):
    _, summary = first_run
    client = store["client"]
    run_id = summary["run_id"]

    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in ("valid_ndcg_at_10", "test_ndcg_at_10", "test_recall_at_10", "bytes_uploaded")
    }

    steps = list(range(1, ALS_ROUNDS + RANKER_ROUNDS + 1))
    for key, points in history.items():
        assert [s for s, _ in points] == steps, key
    test = dict(history["test_ndcg_at_10"])
    assert test[ALS_ROUNDS + RANKER_ROUNDS] > test[ALS_ROUNDS]  # re-ranked beats retrieval
    assert all(value > 0 for _, value in history["bytes_uploaded"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"feature_importance.png", "feature_importance.csv", "learning_curve.png"} <= artifacts
    version = client.get_model_version_by_alias("ranktest", "champion")
    assert summary["promoted"] and str(version.version) == summary["model_version"] == "1"
    assert (
        version.tags["fedrec.feedback"] == "implicit"
        and version.tags["fedrec.ranker"] == "lightgbm"
    )


def test_flow_model_equals_the_plain_loop_on_the_same_clients(store, first_run):
    """The flow runs the same client and server functions as the in-process reference loop:
    the registered model must be that loop's model, item factors and trees alike."""
    import mlflow

    from models.data.partitions import read_item_features
    from models.ranking.federated import run_two_stage
    from tasks.data import load_interactions, plan_clients

    config, summary = first_run
    data, split = load_interactions.fn(config)
    clients = plan_clients(data, split, config)
    catalogue = read_item_features(summary["workspace"])
    reference = run_two_stage(
        clients, data.n_items, config.ranking_config(), rounds=config.rounds, seed=config.seed,
        item_ids=data.item_ids, item_features=catalogue, eval_splits=(),
    ).recommender  # fmt: skip

    mlflow.set_tracking_uri(store["uri"])
    served = mlflow.pyfunc.load_model("models:/ranktest@champion").unwrap_python_model().recommender
    np.testing.assert_allclose(
        served.retrieval.item_factors, reference.retrieval.item_factors, atol=1e-10
    )
    np.testing.assert_allclose(
        served.retrieval.similarity.toarray(), reference.retrieval.similarity.toarray()
    )
    requests = pd.DataFrame(
        {
            "user_id": ["a", "b"],
            "history_items": [[str(i) for i in data.item_ids[:12]], [str(data.item_ids[50])]],
        }
    )
    pd.testing.assert_frame_equal(
        served.recommend(requests, k=5), reference.recommend(requests, k=5)
    )


def test_a_challenger_is_compared_with_the_champion_on_the_same_rows(store, first_run):
    from flows.training import federated_training

    config = _config(store, ranker_rounds=1, skip_if_unchanged=False)
    summary = federated_training(**config.model_dump())

    assert summary["model_version"] == "2"
    assert summary["champion_metrics"]["test_ndcg_at_10"] > 0
    assert ("promoted" if summary["promoted"] else "not promoted") and summary["reason"]
    expected = (
        summary["metrics"]["test_ndcg_at_10"] > summary["champion_metrics"]["test_ndcg_at_10"]
    )
    assert summary["promoted"] == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_invocations(store, first_run):
    port = _free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": store["uri"],
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/ranktest@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"model server did not start: {server.stderr.read().decode()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        workspace = Path(first_run[1]["workspace"])
        items = pd.read_parquet(workspace / "items.parquet")["item_id"].astype(str).tolist()
        body = {"dataframe_records": [{"user_id": "fan", "history_items": items[:8], "age": 30, "gender": "F"},
                                      {"user_id": "newcomer", "history_items": []}],
                "params": {"k": 4}}  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        answer = pd.DataFrame(
            json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    assert list(answer.columns) == ["user_id", "rank", "item_id", "score", "reason"]
    fan = answer[answer.user_id == "fan"]
    assert fan["rank"].tolist() == [1, 2, 3, 4] and not set(fan.item_id) & set(items[:8])
    assert fan["score"].is_monotonic_decreasing and (fan["reason"].str.len() > 0).all()
    newcomer = answer[answer.user_id == "newcomer"]
    assert (newcomer["reason"] == "no known history: most popular items").all()


def test_cli_trains_two_stage_from_split_files_and_recommends_with_reasons(
    tmp_path, prefect_server
):
    """`fedrec train --feedback implicit --ranker lightgbm --train/--valid/--test` on implicit CSVs
    (no rating column), then `fedrec recommend` prints user_id,rank,item_id,score,reason."""
    import io

    from click.testing import CliRunner

    from fedrec.cli import main
    from models.data.synthetic import generate_synthetic

    data = generate_synthetic(
        n_users=300, n_items=150, n_interactions=9000, seed=5, side_features=False
    )
    frame = pd.DataFrame({"user_id": data.user_ids[data.frame["user"]].astype(str),
                          "item_id": data.item_ids[data.frame["item"]].astype(str)})  # fmt: skip
    part = np.random.default_rng(0).choice(3, size=len(frame), p=[0.8, 0.1, 0.1])
    paths = {}
    for code, name in enumerate(("train", "valid", "test")):
        paths[name] = tmp_path / f"clicks_{name}.csv"
        frame[part == code].to_csv(paths[name], index=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_HOME", str(tmp_path / "home"))
        trained = CliRunner().invoke(main, [
            "train", "--feedback", "implicit", "--ranker", "lightgbm", "--train", str(paths["train"]),
            "--valid", str(paths["valid"]), "--test", str(paths["test"]), "--clients", "3", "--rounds", "2",
            "--ranker-rounds", "2", "--factors", "8", "--tracking-uri", uri, "--json"],
            catch_exceptions=False)  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["model_name"] == "fedrec-ranking" and summary["promoted"] is True
    assert 0 < summary["metrics"]["test_ndcg_at_10"] <= 1

    history = tmp_path / "history.csv"
    liked = frame[frame.user_id == frame.user_id.iloc[0]].item_id.tolist()[:6]
    history.write_text("user_id,item_id\n" + "".join(f"fan,{i}\n" for i in liked))
    users = tmp_path / "users.csv"
    users.write_text("user_id\nfan\nstranger\n")
    result = CliRunner().invoke(main, ["recommend", "--model", "models:/fedrec-ranking@champion", "--tracking-uri",
                                       uri, "--history", str(history), "--users", str(users), "--k", "3"],
                                catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    table = pd.read_csv(io.StringIO(result.stdout), dtype=str)
    assert list(table.columns) == ["user_id", "rank", "item_id", "score", "reason"]
    fan = table[table.user_id == "fan"]
    assert len(fan) == 3 and not set(fan.item_id) & set(liked) and fan.reason.notna().all()
    assert (
        table[table.user_id == "stranger"].reason == "no known history: most popular items"
    ).all()
