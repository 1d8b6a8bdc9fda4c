"""The training flow against a real Prefect test server and a real MLflow SQLite store/registry."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.config import TrainingConfig
from models.data.errors import DataValidationError
from tests.flows.helpers import flow_log, tracking_store

ROUNDS = 3
SMALL = {
    "synthetic_users": 400,
    "synthetic_items": 250,
    "synthetic_interactions": 16_000,
    "clients": 3,
}
PER_ROUND = ("train/rmse", "valid/rmse", "valid/ndcg_at_10", "test/rmse", "test/ndcg_at_10", "valid/client_min/rmse", "valid/client_max/rmse",
             "system/bytes_uploaded", "system/round_seconds", "system/clients")  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    """One registry for the module. Tests that add versions of "flowtest" compare with the
    registry as they find it, so they pass in any order."""
    with tracking_store(tmp_path_factory.mktemp("fedrec-home")) as store:
        yield store


@pytest.fixture(scope="module")
def first_run(store):
    """The first version of "flowtest" (every test that registers one depends on this), with the
    champion alias as it stood right after the run."""
    from flows.training import federated_training

    config = TrainingConfig(
        rounds=ROUNDS, factors=8, tracking_uri=store["uri"], model_name="flowtest", **SMALL
    )
    summary = federated_training(**config.model_dump())
    champion = store["client"].get_model_version_by_alias("flowtest", "champion")
    return summary | {"champion_then": champion}


def test_the_round_table_in_prefect_is_the_runs_metric_history(store, first_run):
    """The flow run's table artifact (the rounds as the Prefect UI shows them) has one row per
    round, numbered as MLflow's steps, with MLflow's values: no row for the untrained model."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    client = store["client"]
    run = client.get_run(first_run["run_id"])
    flow_run = UUID(run.data.tags["prefect.flow_run_id"])
    wanted = ArtifactFilter(
        key=ArtifactFilterKey(any_=["fedrec-rounds"]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run]),
    )
    with get_client(sync_client=True) as prefect:
        (table,) = prefect.read_artifacts(artifact_filter=wanted)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
    for key in ("train/rmse", "valid/rmse", "valid/ndcg_at_10"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [row[key] for row in rows] == [round(m.value, 5) for m in history]
        # each round's row is stamped when the run logged it (ms since the epoch, as MLflow's
        # charts against time and the run's own start and end read it)
        assert all(run.info.start_time <= m.timestamp <= run.info.end_time for m in history), key


def test_the_summary_in_prefect_names_the_version_and_lists_the_final_metrics(store, first_run):
    """The flow run's markdown artifact: the MLflow run, the registered version, the promotion
    decision and every final metric to four decimals, but the per-client 10th percentiles."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    run = store["client"].get_run(first_run["run_id"])
    wanted = ArtifactFilter(
        key=ArtifactFilterKey(any_=["fedrec-summary"]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run.data.tags["prefect.flow_run_id"])]),
    )
    with get_client(sync_client=True) as prefect:
        (summary,) = prefect.read_artifacts(artifact_filter=wanted)
    lines = summary.data.splitlines()
    assert f"- MLflow run: `{first_run['run_id']}` ({store['uri']})" in lines
    assert f"- model: `flowtest` version {first_run['model_version']}" in lines
    assert any(line.startswith("- promoted to champion: **True**: ") for line in lines), lines
    metrics = first_run["metrics"]
    assert any("client_p10" in key for key in metrics)  # logged, left out of the summary
    rows = [line for line in lines[lines.index("|---|---|") + 1 :] if line.startswith("| ")]
    assert rows == [
        f"| {key} | {value:.4f} |"
        for key, value in sorted(metrics.items())
        if "client_p10" not in key
    ]


def _versions(store, name: str) -> set[int]:
    return {int(v.version) for v in store["client"].search_model_versions(f"name='{name}'")}


def test_first_run_logs_every_round_registers_and_becomes_champion(store, first_run):
    client = store["client"]
    run = client.get_run(first_run["run_id"])

    for key in PER_ROUND:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, ROUNDS + 1)), key
    seconds = [m.value for m in client.get_metric_history(run.info.run_id, "system/round_seconds")]
    assert all(s > 0 for s in seconds)
    assert sum(seconds) <= (run.info.end_time - run.info.start_time) / 1000
    assert run.data.params["rounds"] == str(ROUNDS) and run.data.params["factors"] == "8"
    assert run.data.tags["prefect.flow_run_id"]
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "config.json",
        "data_profile.csv",
        "learning_curve.png",
        "client_metrics.png",
        "client_metrics.csv",
    } <= artifacts

    assert first_run["model_version"] == "1" and first_run["promoted"] is True
    champion = first_run["champion_then"]
    assert str(champion.version) == "1"
    assert champion.tags["fedrec.promoted"] == "true"
    assert (
        champion.tags["fedrec.dataset_fingerprint"] == run.data.tags["fedrec.dataset_fingerprint"]
    )
    assert {
        "fedrec.config_hash",
        "fedrec.algorithm",
        "fedrec.code_version",
        "metric.valid/rmse",
    } <= set(champion.tags)
    # only the metrics the promotion rule reads are version tags; the run keeps them all
    assert {t for t in champion.tags if t.startswith("metric.")} <= {
        "metric.valid/rmse",
        "metric.valid/client_max/rmse",
        "metric.baseline/valid/rmse",
    }
    final = json.loads(
        Path(client.download_artifacts(run.info.run_id, "final_metrics.json")).read_text()
    )
    assert final["test/rmse"] == pytest.approx(
        client.get_metric_history(run.info.run_id, "test/rmse")[-1].value, abs=1e-12
    )
    # MLflow 3's UI opens the experiment on its training runs
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["fedrec.code_version"]
    # learning happened: the last round beats the first on validation RMSE
    curve = [m.value for m in client.get_metric_history(run.info.run_id, "valid/rmse")]
    assert curve[-1] < curve[0]
    # the run succeeded, so its clients' copies of their rows and its checkpoints are gone, and
    # the run names no workspace
    assert "fedrec.workspace" not in run.data.tags
    assert first_run["workspace"] is None
    assert not list((store["home"] / "workspaces").iterdir())


def test_a_workspace_that_holds_other_files_is_refused_and_left_as_it_was(store, tmp_path):
    from flows.training import federated_training

    folder = tmp_path / "my-data"
    folder.mkdir()
    (folder / "ratings.csv").write_text("user_id,item_id,rating\n1,2,5\n")
    client = store["client"]
    runs = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))

    with pytest.raises(ValueError, match=r"my-data'.* not a fedrec workspace .*a new or empty"):
        federated_training(rounds=1, workspace=str(folder), tracking_uri=store["uri"],
                           model_name="flowtest", **SMALL)  # fmt: skip

    assert [p.name for p in folder.iterdir()] == ["ratings.csv"]
    assert runs == len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    # an empty folder is a workspace to fill; kept on request after the run succeeds
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = federated_training(rounds=1, workspace=str(empty), keep_workspace=True,
                                 tracking_uri=store["uri"], model_name="ws-kept", **SMALL)  # fmt: skip
    assert summary["workspace"] == str(empty) and (empty / "manifest.json").is_file()
    kept = client.get_run(summary["run_id"]).data.tags
    assert kept["fedrec.workspace"] == str(empty)


def test_worse_second_run_is_registered_but_not_promoted(store, first_run, caplog):
    from flows.training import federated_training

    client = store["client"]
    before = _versions(store, "flowtest")
    champion = client.get_model_version_by_alias("flowtest", "champion")
    worse = TrainingConfig(
        rounds=1, factors=2, tracking_uri=store["uri"], model_name="flowtest", **SMALL
    )
    summary = federated_training(**worse.model_dump())

    assert summary["model_version"] == str(max(before) + 1) and summary["promoted"] is False
    assert client.get_model_version_by_alias("flowtest", "champion").version == champion.version
    # every client answered both evaluations: nothing to say about the rows compared
    assert not [r for r in caplog.records if "answered both evaluations" in r.getMessage()]
    tags = client.get_model_version("flowtest", summary["model_version"]).tags
    assert tags["fedrec.promoted"] == "false"
    reason = tags["fedrec.promotion_reason"]
    assert (
        reason.startswith("valid/rmse ") and " vs champion " in reason and ": worse by " in reason
    )
    assert summary["reason"] == reason
    assert tags["fedrec.compared_with_version"] == str(champion.version)
    assert "fedrec.epsilon" not in tags  # only a private version says what it spent
    # the registry's description says what the version is and why it is not the champion
    description = client.get_model_version("flowtest", summary["model_version"]).description
    rmse = summary["metrics"]["valid/rmse"]
    assert description == (
        f"als (explicit feedback), 1 round; data: {tags['fedrec.source']}; not private; "
        f"valid/rmse {rmse:.4f}; not promoted: {reason}"
    )
    assert "; promoted to champion when registered: no champion yet" in (
        client.get_model_version("flowtest", first_run["model_version"]).description
    )
    assert "; promoted to champion when registered: " in (  # this one, or a later test's
        client.get_model_version("flowtest", champion.version).description
    )
    assert client.get_registered_model("flowtest").description.startswith("Trained by fedrec")
    # both were measured by the same federated evaluation on the same clients: the champion's
    # numbers now are the ones its own run recorded (rounded to 6 decimals in the tag)
    recorded = json.loads(champion.tags["fedrec.metrics_json"])
    assert summary["champion_metrics"]["valid/rmse"] == pytest.approx(
        recorded["valid/rmse"], abs=1e-6
    )


def test_a_run_that_compares_on_another_metric_than_the_champion_was_promoted_on_says_so(
    store, first_run
):
    from flows.training import federated_training

    client = store["client"]
    champion = client.get_model_version_by_alias("flowtest", "champion")
    assert champion.tags["fedrec.promotion_metric"] == "valid/rmse"  # the explicit default
    # never promoted (min_delta): the champion stays the one the other tests expect
    with flow_log(logging.WARNING) as records:
        summary = federated_training(rounds=1, factors=2, seed=11, promotion_metric="valid/mae", min_delta=1e6,
                                     tracking_uri=store["uri"], model_name="flowtest", **SMALL)  # fmt: skip

    warned = [r.getMessage() for r in records if "was promoted on valid/rmse" in r.getMessage()]
    assert warned and "this run compares on valid/mae" in warned[0], warned
    version = client.get_model_version("flowtest", summary["model_version"])
    assert version.tags["fedrec.promotion_metric"] == "valid/mae" and not summary["promoted"]


def test_a_run_with_nothing_held_out_says_it_cannot_be_judged(store, tmp_path, recwarn):
    from flows.training import federated_training

    tiny = tmp_path / "tiny.csv"
    tiny.write_text("user_id,item_id,rating\nu1,1,4\nu1,2,5\nu2,1,3\n")
    with flow_log(logging.WARNING) as records:
        summary = federated_training(data=str(tiny), clients=2, rounds=1, factors=2,
                                     tracking_uri=store["uri"], model_name="tiny")  # fmt: skip

    assert not summary["promoted"] and "candidate has no valid/rmse" in summary["reason"]
    messages = [r.getMessage() for r in records]
    assert any("no valid/rmse was measured" in m for m in messages), messages
    assert not [w for w in recwarn if "No artists" in str(w.message)]  # the empty plot's legend


def test_champion_pyfunc_recommends_k_unseen_distinct_items(store, first_run):
    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pyfunc.load_model("models:/flowtest@champion")
    catalogue = model.unwrap_python_model().recommender.item_ids
    history = list(catalogue[:5])
    requests = pd.DataFrame(
        {
            "user_id": ["u1", "cold"],
            "history_items": [[*history, "not-an-item"], []],
            "history_ratings": [[5.0, 4.0, 1.0, 2.0, 5.0, 3.0], []],
        }
    )

    out = model.predict(requests, params={"k": 7})

    warm = out[out["user_id"] == "u1"]
    assert list(warm["rank"]) == list(range(1, 8))
    assert warm["item_id"].nunique() == 7 and not set(warm["item_id"]) & set(history)
    assert set(warm["item_id"]) <= set(catalogue)
    assert np.all(np.diff(warm["score"].to_numpy()) <= 0)
    assert "ignored 1 unknown item(s): not-an-item" in warm["reason"].iloc[0]
    cold = out[out["user_id"] == "cold"]
    assert (
        len(cold) == 7 and "no known items in history: most popular items" in cold["reason"].iloc[0]
    )
    # whole numbers as ratings, and integer ids, as a JSON client sends them: the same answer
    as_numbers = pd.DataFrame({"user_id": ["u1"], "history_items": [[int(i) for i in history]],
                               "history_ratings": [[5, 4, 1, 2, 5]]})  # fmt: skip
    as_text = as_numbers.assign(
        history_items=[history], history_ratings=[[5.0, 4.0, 1.0, 2.0, 5.0]]
    )
    pd.testing.assert_frame_equal(
        model.predict(as_numbers, params={"k": 7}), model.predict(as_text, params={"k": 7})
    )
    # an integer user id, as training accepts them: answered under its text
    by_number = model.predict(as_text.assign(user_id=[9_223_372_036_854_775_807]), params={"k": 7})
    expected = model.predict(as_text.assign(user_id=["9223372036854775807"]), params={"k": 7})
    pd.testing.assert_frame_equal(by_number, expected)
    # a request it cannot answer as asked: MLflow's INVALID_PARAMETER_VALUE (HTTP 400 when
    # served), its message the one line naming the row, user, column and value
    from mlflow.exceptions import MlflowException

    for bad, params, message in [
        (as_numbers.assign(history_ratings=[["5", 4, 1, 2, 5]]), None,
         r"^request row 0 \(user 'u1'\): rating '5' in history_ratings is not a number"),
        (as_numbers.assign(history_ratings=[[5.0, 4.0]]), None,
         r"history_ratings 2 ratings for 5 history item\(s\)"),
        (as_numbers, {"k": 0}, r"^k 0 is not a positive integer"),
        # what MLflow's column types refused before fedrec saw it, in words naming no row
        (as_numbers.assign(history_items=["50"]), None,
         r"^request row 0 \(user 'u1'\): history_items '50' is not a list; allowed: a list"),
        (as_numbers.drop(columns="history_ratings"), None,
         r"^request row 0 \(user 'u1'\): 5 history item\(s\) but 0 rating\(s\) in "
         r"history_ratings: this model predicts ratings from the user's own"),
    ]:  # fmt: skip
        with pytest.raises(MlflowException, match=message) as refused:
            model.predict(bad, params=params)
        assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    # no score is None, not NaN: what MLflow's server sends must be JSON
    assert cold["score"].isna().all()
    json.dumps(out.to_dict(orient="records"), allow_nan=False)
    # the logged example is a request this model answers: it predicts from the user's ratings,
    # which the model checks itself (above), as it checks every column's cells
    example = model.input_example
    assert list(example["history_ratings"].iloc[0]) == [5.0, 5.0, 5.0]
    assert len(model.predict(example)) == 10
    inputs = {c.name: (c.required, str(c.type)) for c in model.metadata.get_input_schema().inputs}
    assert inputs == {
        "user_id": (False, "Any"),
        "history_items": (False, "Any"),
        "history_ratings": (False, "Any"),
        "items": (False, "Any"),
    }
    # a misspelt column is refused by the model's one line, not by MLflow's schema page
    for columns, missing in [({"userId": ["u1"], "history_items": [["1"]]}, "user_id"),
                             ({"user_id": ["u1"], "items_seen": [["1"]]}, "history_items")]:  # fmt: skip
        with pytest.raises(MlflowException) as refused:
            model.predict(pd.DataFrame(columns), params=params)
        assert str(refused.value.message).startswith(f"requests have no {missing} column; allowed")
        assert "\n" not in refused.value.message


def test_bad_input_writes_no_model_version_and_keeps_the_champion(
    store, first_run, tmp_path, monkeypatch
):
    from flows.training import federated_training

    bad = tmp_path / "ratings.csv"
    bad.write_text("user_id,item_id,rating\n1,10,4\n2,11,7\n")
    client = store["client"]
    before = {v.version for v in client.search_model_versions("name='flowtest'")}
    champion = client.get_model_version_by_alias("flowtest", "champion").version
    loggers = ("prefect.task_runs", "prefect.flow_runs")
    for name in loggers:
        logger = logging.getLogger(name)
        kept = [f for f in logger.filters if type(f).__name__ != "_NoErrorRecords"]  # the CLI's
        monkeypatch.setattr(logger, "filters", kept)
    # what a deployment's worker logs and the UI shows
    with (
        flow_log(logging.ERROR, loggers) as records,
        pytest.raises(
            DataValidationError, match=r"ratings.csv, row 2 \(line 3\), column 'rating': value 7.0"
        ),
    ):
        federated_training(
            data=str(bad), tracking_uri=store["uri"], model_name="flowtest", clients=2
        )

    assert {v.version for v in client.search_model_versions("name='flowtest'")} == before
    assert client.get_model_version_by_alias("flowtest", "champion").version == champion
    # the task's and the flow's error lines name the row, without a traceback under them
    named = [r for r in records if "value 7.0" in r.getMessage()]
    assert {r.name for r in named} == {"prefect.task_runs", "prefect.flow_runs"}, records
    assert not [r for r in records if r.exc_info or r.exc_text], records


def test_an_unexpected_error_keeps_its_traceback_in_the_log():
    from fedrec.cli_errors import NoInputTracebacks

    def record(err: Exception) -> logging.LogRecord:
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed: %r",
                                 (err,), (type(err), err, None))  # fmt: skip

    bug, bad = record(KeyError("x")), record(DataValidationError("no rows", file="r.csv"))
    assert NoInputTracebacks().filter(bug) and NoInputTracebacks().filter(bad)  # both kept
    assert bug.exc_info is not None and bad.exc_info is None
    assert "r.csv: no rows" in bad.getMessage()


def test_invalid_parameters_fail_before_any_run_or_version(store, first_run):
    from prefect.exceptions import ParameterTypeError

    from flows.training import federated_training

    client = store["client"]
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    versions_before = len(client.search_model_versions("name='flowtest'"))

    with pytest.raises(ParameterTypeError, match="rounds"):
        federated_training(rounds=-1, tracking_uri=store["uri"], model_name="flowtest")
    with pytest.raises(ParameterTypeError, match="algorithm"):
        federated_training(algorithm="svd", tracking_uri=store["uri"], model_name="flowtest")
    with pytest.raises(ValueError, match="no such file or folder"):
        federated_training(data="missing.csv", tracking_uri=store["uri"], model_name="flowtest")

    assert (
        len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
        == runs_before
    )
    assert len(client.search_model_versions("name='flowtest'")) == versions_before


def test_unchanged_data_and_config_register_nothing(store):
    from flows.training import federated_training

    config = TrainingConfig(
        rounds=1, factors=2, tracking_uri=store["uri"], model_name="unchanged", **SMALL
    )
    first = federated_training(**config.model_dump())
    versions = _versions(store, "unchanged")

    summary = federated_training(**config.model_dump())

    assert first["promoted"] is True and versions == {int(first["model_version"])}
    assert summary["skipped"] is True and summary["champion_version"] == first["model_version"]
    assert f"unchanged since champion version {first['model_version']}" in summary["reason"]
    assert _versions(store, "unchanged") == versions
    # the figures of the version these data and config gave, for a sweep reading --json
    assert summary["same_as_version"] == first["model_version"]
    assert summary["metrics"]["valid/rmse"] == pytest.approx(
        first["metrics"]["valid/rmse"], rel=1e-5
    )


def test_a_config_that_lost_to_the_champion_on_these_data_is_not_trained_again(store):
    from flows.training import federated_training

    base = {"rounds": 2, "factors": 2, "tracking_uri": store["uri"], "model_name": "loser", **SMALL}
    champion = federated_training(**TrainingConfig(**base).model_dump())
    worse = TrainingConfig(**(base | {"reg": 500.0}))  # all but the biases shrunk to nothing
    lost = federated_training(**worse.model_dump())
    assert champion["promoted"] and not lost["promoted"]
    versions = _versions(store, "loser")

    again = federated_training(**worse.model_dump())  # the nightly run, data unchanged

    assert again["skipped"] is True and _versions(store, "loser") == versions
    assert again["same_as_version"] == lost["model_version"]
    assert again["metrics"]["valid/rmse"] == pytest.approx(lost["metrics"]["valid/rmse"], rel=1e-5)
    assert again["reason"].startswith(
        f"version {lost['model_version']} was trained on these data with this config and not "
        f"promoted against champion version {champion['model_version']}"
    )


def test_warm_start_from_the_champion_starts_where_it_left_off(store, first_run):
    from flows.training import federated_training

    # one round from the champion's items lands near the champion; one round from scratch, with
    # the same champion there but no warm start asked, does not
    warm = TrainingConfig(
        rounds=1,
        factors=8,
        warm_start=True,
        tracking_uri=store["uri"],
        model_name="flowtest",
        **SMALL,
    )
    cold = warm.model_copy(update={"warm_start": False})

    warm_summary = federated_training(**warm.model_dump())
    cold_summary = federated_training(**cold.model_dump())

    assert warm_summary["metrics"]["valid/rmse"] < cold_summary["metrics"]["valid/rmse"] - 0.02
    assert warm_summary["metrics"]["valid/rmse"] < first_run["metrics"]["valid/rmse"] + 0.01
    # the registry and the runs say where each started, and what became of each run
    client = store["client"]
    for summary, started in ((warm_summary, warm_summary["champion_metrics"] is not None),
                             (cold_summary, False)):  # fmt: skip
        version = client.get_model_version("flowtest", summary["model_version"])
        tags = client.get_run(summary["run_id"]).data.tags
        lineage = version.tags.get("fedrec.warm_started_from")
        assert lineage == tags.get("fedrec.warm_started_from")
        assert (lineage is not None) == started
        assert tags["fedrec.model_version"] == f"flowtest/{summary['model_version']}"
        assert tags["fedrec.promoted"] == str(summary["promoted"]).lower()
    champion_then = client.get_model_version("flowtest", warm_summary["model_version"])
    assert (
        champion_then.tags["fedrec.warm_started_from"]
        == (champion_then.tags["fedrec.compared_with_version"])
    )


def test_a_warm_start_from_a_champion_of_another_size_says_so_and_starts_cold(store):
    from flows.training import federated_training

    one_round = {"rounds": 1, "tracking_uri": store["uri"], "model_name": "warmsize", **SMALL}
    champion = federated_training(**TrainingConfig(factors=8, **one_round).model_dump())
    smaller = TrainingConfig(factors=4, warm_start=True, **one_round)
    with flow_log(logging.INFO) as records:
        warm = federated_training(**smaller.model_dump())
    cold = federated_training(**smaller.model_copy(update={"warm_start": False}).model_dump())

    messages = [r.getMessage() for r in records]
    refused = (
        f"no warm start: champion version {champion['model_version']} does not fit this run's "
        "explicit model"
    )
    assert any(m.startswith(refused) for m in messages), messages
    assert not any(m.startswith("warm start from champion") for m in messages)
    # the run trained from its own initial factors, as the run that asked for no warm start did
    assert warm["metrics"]["valid/rmse"] == pytest.approx(cold["metrics"]["valid/rmse"], abs=1e-9)


def test_explicit_train_and_test_files_keep_their_split(store, tmp_path):
    from flows.training import federated_training
    from models.data.synthetic import generate_synthetic

    data = generate_synthetic(n_users=300, n_items=200, n_interactions=9_000, seed=5)
    frame = data.frame.assign(
        user_id=data.user_ids[data.frame["user"]], item_id=data.item_ids[data.frame["item"]]
    )
    rows = frame[["user_id", "item_id", "rating", "timestamp"]]
    is_test = np.random.default_rng(0).random(len(rows)) < 0.2
    only_in_test = [str(i) for i in rows.item_id.unique()[:2]]  # no training row: not learned
    is_test |= rows.item_id.astype(str).isin(only_in_test).to_numpy()
    rows[~is_test].to_csv(tmp_path / "train.csv", index=False)
    rows[is_test].to_csv(tmp_path / "test.csv", index=False)

    summary = federated_training(
        train=str(tmp_path / "train.csv"), test=str(tmp_path / "test.csv"), rounds=2, clients=3, factors=4,
        tracking_uri=store["uri"], model_name="explicit",
    )  # fmt: skip

    profile = pd.read_csv(store["client"].download_artifacts(summary["run_id"], "data_profile.csv"))
    assert profile["test_rows"].sum() == is_test.sum()  # the test file, exactly
    assert profile["valid_rows"].sum() > 0  # validation carved from the training file
    assert profile["train_rows"].sum() + profile["valid_rows"].sum() == (~is_test).sum()
    assert {"valid/rmse", "test/rmse"} <= set(summary["metrics"]) and summary["promoted"] is True
    # the test-only items are in the model's catalogue, never recommended nor scored: what it
    # holds of them are the random parameters they started from
    from tasks.tracking import load_recommender

    served = load_recommender(store["uri"], f"models:/explicit/{summary['model_version']}")
    assert set(only_in_test) <= set(served.item_ids.astype(str))
    assert set(served.known_items) == set(rows[~is_test].item_id.astype(str))
    everything = served.recommend(
        pd.DataFrame({"user_id": ["u"], "history_items": [[str(rows[~is_test].item_id.iloc[0])]],
                      "history_ratings": [[5.0]], }),
        k=len(served.item_ids),
    )  # fmt: skip
    assert not set(only_in_test) & set(everything.item_id)
    assert len(everything) == len(served.known_items) - 1


def test_sampled_rounds_still_evaluate_every_client(store):
    from flows.training import federated_training

    config = TrainingConfig(rounds=3, factors=4, client_fraction=0.5, clients=4, tracking_uri=store["uri"], model_name="sampled",
                            **{k: v for k, v in SMALL.items() if k != "clients"})  # fmt: skip
    summary = federated_training(**config.model_dump())

    client = store["client"]
    for key in ("valid/rmse", "train/rmse", "system/clients"):
        history = client.get_metric_history(summary["run_id"], key)
        assert [m.step for m in history] == [1, 2, 3], key
    assert {m.value for m in client.get_metric_history(summary["run_id"], "system/clients")} == {
        2.0
    }  # 50% of 4 train
    profile = pd.read_csv(client.download_artifacts(summary["run_id"], "client_metrics.csv"))
    assert len(profile) == 4  # but all 4 are evaluated


def test_no_file_of_the_registered_model_is_a_pickle(store, first_run, tmp_path):
    from tests.flows.helpers import model_file_kinds

    kinds = model_file_kinds(store["uri"], "flowtest", first_run["model_version"], tmp_path)

    assert kinds["MLmodel"] == "text" and "npz" in kinds.values(), kinds  # state: arrays in .npz


def test_a_plain_round_costs_the_server_one_task_run(store, monkeypatch):
    """Each sampled round's fold, the previous step's record and the checkpoint run in one server
    task; ``aggregate`` is left to the rounds every client answers once (the global mean)."""
    from flows.training import federated_training
    from tasks import server

    steps, phases = [], []
    step_fn, aggregate_fn = server.server_step.fn, server.aggregate.fn

    def server_step(**kwargs):
        steps.append(kwargs["progress"].step)
        return step_fn(**kwargs)

    def aggregate(**kwargs):
        phases.append(kwargs["phase"])
        return aggregate_fn(**kwargs)

    monkeypatch.setattr(server.server_step, "fn", server_step)
    monkeypatch.setattr(server.aggregate, "fn", aggregate)
    config = TrainingConfig(rounds=4, factors=4, tracking_uri=store["uri"], model_name="onetask",
                            **SMALL)  # fmt: skip
    summary = federated_training(**config.model_dump())

    assert steps == [1, 2, 3, 4]
    assert phases == ["mean"]
    history = store["client"].get_metric_history(summary["run_id"], "valid/rmse")
    assert [m.step for m in history] == [1, 2, 3, 4]


def test_a_run_on_other_data_than_the_champions_says_so(store):
    from flows.training import federated_training

    tiny = {"rounds": 1, "clients": 2, "factors": 2, "tracking_uri": store["uri"],
            "model_name": "sources", "synthetic_items": 150, "synthetic_interactions": 6_000}  # fmt: skip
    first = federated_training(**TrainingConfig(synthetic_users=200, **tiny).model_dump())
    with flow_log(logging.INFO) as records:  # the item ids are the same 0..149: no warm start
        second = federated_training(
            **TrainingConfig(synthetic_users=220, warm_start=True, **tiny).model_dump()
        )

    tags = store["client"].get_model_version("sources", first["model_version"]).tags
    assert (
        tags["fedrec.source"].startswith("synthetic(") and "n_users=200," in tags["fedrec.source"]
    )
    warned = [r for r in records if "this run's data is" in r.getMessage()]
    assert [r.levelno for r in warned] == [logging.WARNING]  # its items may be other items
    said = [r.getMessage() for r in warned]
    assert len(said) == 1 and "was trained on synthetic(" in said[0] and "n_users=200" in said[0]
    replaced = "(it replaces a champion trained on other data, synthetic("
    assert (replaced in second["reason"]) is second["promoted"], second["reason"]
    assert "n_users=220" in said[0].split("this run's data is")[1]
    messages = [r.getMessage() for r in records]
    refused = f"no warm start: champion version {first['model_version']} was trained on synthetic("
    assert any(m.startswith(refused) for m in messages)
    assert not any(m.startswith("warm start from champion") for m in messages)


def test_a_scale_taken_from_the_data_is_the_served_models_and_sets_the_relevance(store, tmp_path):
    from flows.training import federated_training
    from models.data.synthetic import generate_synthetic
    from tasks.tracking import load_recommender

    data = generate_synthetic(n_users=300, n_items=200, n_interactions=9_000, seed=5)
    frame = data.frame.assign(
        user_id=data.user_ids[data.frame["user"]], item_id=data.item_ids[data.frame["item"]]
    )
    halves = frame.assign(rating=frame["rating"] / 2)  # 0.5 .. 2.5: a top below the default 4
    halves[["user_id", "item_id", "rating"]].to_csv(tmp_path / "halves.csv", index=False)

    summary = federated_training(data=str(tmp_path / "halves.csv"), rating_scale=None, rounds=2,  # "data"
                                 clients=3, factors=4, tracking_uri=store["uri"],
                                 model_name="halves")  # fmt: skip

    served = load_recommender(store["uri"], "models:/halves@champion")
    assert served.rating_scale == (0.5, 2.5)  # predictions are clipped to the data's scale
    history = pd.DataFrame({"user_id": ["u"], "history_items": [[str(served.item_ids[0])]],
                            "history_ratings": [[2.5]]})  # fmt: skip
    scores = served.recommend(history, k=20)["score"]
    assert scores.between(0.5, 2.5).all()
    with pytest.raises(ValueError, match=r"rating 4.0 in history_ratings; allowed: .*\[0.5, 2.5\]"):
        served.recommend(history.assign(history_ratings=[[4.0]]))
    # ranking metrics count ratings >= 2 (three quarters up 0.5..2.5): they exist and are not 0
    assert summary["metrics"]["test/recall_at_10"] > 0


def test_a_flow_run_whose_tracking_server_does_not_answer_fails_at_once(
    prefect_server, monkeypatch
):
    """A deployment's run reaches the flow without the command line's check: it makes the same
    one before any task, instead of every task going through MLflow's minutes of retries."""
    # without the check, the first task would fail in seconds with MLflow's own error
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from fedrec.local_server import free_port
    from fedrec.model_store import TrackingStoreError
    from flows.training import federated_training

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TrackingStoreError, match="the MLflow server does not answer"):
        federated_training(**TrainingConfig(tracking_uri=uri, **SMALL).model_dump())


def test_the_same_rows_under_another_file_name_are_unchanged_data_and_a_new_export_warm_starts(
    store, tmp_path
):
    """A nightly export under a dated name: the same rows are not trained again, and new rows
    start from the champion (both are the caller's files, whose items it names alike)."""
    from flows.training import federated_training
    from models.data.synthetic import generate_synthetic

    data = generate_synthetic(n_users=200, n_items=60, n_interactions=6_000)
    frame = data.frame
    rows = [f"u{data.user_ids[u]},i{data.item_ids[i]},{r:g}"
            for u, i, r in zip(frame["user"], frame["item"], frame["rating"], strict=True)]  # fmt: skip
    first, copy, later = (tmp_path / f"export-{d}.csv" for d in ("01", "01-copy", "02"))
    first.write_text("user_id,item_id,rating\n" + "\n".join(rows) + "\n")
    copy.write_bytes(first.read_bytes())
    later.write_text(first.read_text() + "new1,i1,4\nnew1,i2,5\nnew2,i3,2\n")
    tiny = {"rounds": 2, "clients": 2, "factors": 2, "tracking_uri": store["uri"],
            "model_name": "exports"}  # fmt: skip

    champion = federated_training(**TrainingConfig(data=str(first), **tiny).model_dump())
    again = federated_training(**TrainingConfig(data=str(copy), **tiny).model_dump())
    with flow_log(logging.INFO) as records:
        federated_training(**TrainingConfig(data=str(later), warm_start=True, **tiny).model_dump())

    assert champion["promoted"], champion["reason"]
    assert again["skipped"] is True and again["champion_version"] == champion["model_version"]
    messages = [r.getMessage() for r in records]
    started = f"warm start from champion version {champion['model_version']}: 60 of 60 items"
    assert any(m.startswith(started) for m in messages), messages
    warned = [r for r in records if r.getMessage().startswith("the warm start takes champion")]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert str(first) in warned[0].getMessage() and str(later) in warned[0].getMessage()


def test_split_files_under_other_names_are_unchanged_and_a_row_moved_between_them_is_not(
    store, tmp_path
):
    """Split files count by their rows and which file each row is in, not by their paths."""
    from flows.training import federated_training
    from models.data.synthetic import generate_synthetic

    data = generate_synthetic(n_users=120, n_items=40, n_interactions=2_000)
    frame = data.frame
    rows = [f"u{data.user_ids[u]},i{data.item_ids[i]},{r:g}"
            for u, i, r in zip(frame["user"], frame["item"], frame["rating"], strict=True)]  # fmt: skip
    header = "user_id,item_id,rating\n"

    def write(name: str, train: list[str], test: list[str]) -> dict[str, str]:
        (tmp_path / f"{name}-train.csv").write_text(header + "\n".join(train) + "\n")
        (tmp_path / f"{name}-test.csv").write_text(header + "\n".join(test) + "\n")
        return {"train": str(tmp_path / f"{name}-train.csv"),
                "test": str(tmp_path / f"{name}-test.csv")}  # fmt: skip

    cut = len(rows) * 9 // 10
    tiny = {"rounds": 2, "clients": 2, "factors": 2, "tracking_uri": store["uri"],
            "model_name": "split-files"}  # fmt: skip

    def train(files: dict[str, str]) -> dict:
        return federated_training(**TrainingConfig(**files, **tiny).model_dump())

    champion = train(write("day1", rows[:cut], rows[cut:]))
    renamed = train(write("day2", rows[:cut], rows[cut:]))
    moved = train(write("day3", rows[: cut - 1], rows[cut - 1 :]))  # one row now held out

    assert champion["promoted"], champion["reason"]
    assert renamed["skipped"] is True and renamed["champion_version"] == champion["model_version"]
    assert not moved.get("skipped") and moved["model_version"] != champion["model_version"]


def test_the_synthetic_demo_does_not_replace_a_champion_of_real_data(store, tmp_path):
    """`make demo` after a run on one's own data, under the default model name: the served
    model would silently become the demo's, whose item ids mean other items."""
    from flows.training import federated_training
    from models.data.synthetic import generate_synthetic

    real = tmp_path / "ratings.csv"
    frame = generate_synthetic(n_users=200, n_items=150, n_interactions=6_000, seed=3).frame
    frame.rename(columns={"user": "user_id", "item": "item_id"}).to_csv(real, index=False)
    tiny = {"rounds": 1, "clients": 2, "factors": 2, "tracking_uri": store["uri"],
            "model_name": "shop-or-demo"}  # fmt: skip
    first = federated_training(**TrainingConfig(data=str(real), **tiny).model_dump())
    demo = federated_training(**TrainingConfig(synthetic_users=200, synthetic_items=150,
                                               synthetic_interactions=6_000, **tiny).model_dump())  # fmt: skip

    assert first["promoted"] and not demo["promoted"]
    assert demo["reason"].endswith(
        f"but the champion, version {first['model_version']}, was trained on real data "
        f"({real}) and this version on the built-in synthetic data (--model-name keeps a demo "
        "apart)"
    )
    champion = store["client"].get_model_version_by_alias("shop-or-demo", "champion")
    assert str(champion.version) == first["model_version"]
