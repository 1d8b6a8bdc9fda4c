"""What a private run releases besides the noised training statistics: no per-item top-K
counts, no per-client artifacts, evaluation once at the end, and no warm start from a model
trained without DP."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import flow_log, tracking_store

SMALL = {"synthetic_users": 300, "synthetic_items": 120, "synthetic_interactions": 9_000,
         "clients": 3, "factors": 4, "rounds": 3, "skip_if_unchanged": False}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-private-releases")) as store:
        yield store


def _run(store, **fields: Any) -> dict:
    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | fields))
    return federated_training(**config.model_dump())


def test_a_private_run_releases_no_item_counts_no_per_client_files_and_evaluates_once(
    store, monkeypatch
):
    import tasks.clients as clients

    answers: list = []
    for task_obj in (clients.train_client, clients.evaluate_client):
        original = task_obj.fn

        def spy(original=original, **kwargs: Any) -> Any:
            result = original(**kwargs)
            answers.append(result)
            return result

        monkeypatch.setattr(task_obj, "fn", spy)
    with flow_log(logging.INFO) as records:
        summary = _run(store, model_name="private", dp_epsilon=8.0, dp_budget=8.0)
    # the log shows each released figure of the model with its noise, not the baseline's
    prefix = "the released metrics with their DP noise (one standard deviation): "
    (line,) = [r.getMessage() for r in records if r.getMessage().startswith(prefix)]
    shown = dict(part.split(" ", 1) for part in line.removeprefix(prefix).split(", "))
    metrics = summary["metrics"]
    assert "valid/rmse" in shown and not any(name.startswith("baseline") for name in shown)
    for name, figure in shown.items():
        value, sd = figure.split(" ± ")
        assert float(value) == pytest.approx(metrics[name], abs=1e-4), name
        assert float(sd) == pytest.approx(metrics[name.replace("/", "/dp_sd/", 1)], abs=1e-4)

    evaluations = [a[1] if isinstance(a, tuple) else a for a in answers]
    assert evaluations and all(
        recommended is None for e in evaluations for _, recommended in e.values()
    )
    assert all(a[0].metrics == {} for a in answers if isinstance(a, tuple))
    client = store["client"]
    files = {f.path for f in client.list_artifacts(summary["run_id"])}
    assert "config.json" in files and "learning_curve.png" in files
    assert not files & {"client_metrics.csv", "client_metrics.png", "data_profile.csv"}
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "valid/rmse")]
    assert steps == [3]  # the final model only
    assert [m.step for m in client.get_metric_history(summary["run_id"], "privacy/epsilon")] == [
        1,
        2,
        3,
    ]


@pytest.fixture
def own_store(tmp_path, prefect_server):
    """A store of the test's own: its users have spent nothing in its ledger."""
    with tracking_store(tmp_path) as store:
        yield store


@pytest.mark.parametrize("where", ["set-up", "rounds"])
def test_a_failed_private_runs_error_tag_names_the_error_type_and_quotes_no_row(
    own_store, monkeypatch, where
):
    """The attack: a reader of MLflow reads why a run failed. An error's message can quote a
    user or a row, which DP does not cover: a private run's ``fedrec.error`` tag names the
    type only (a run without DP, the control, tags the message)."""
    from mlflow.entities import ViewType

    import flows.training
    import tasks.clients as clients
    from flows.rounds import QuorumError

    secret = "user alice rated secret-visit"

    def failing(*_: Any, **__: Any) -> Any:
        raise ValueError(secret)

    if where == "set-up":  # after the MLflow run started, before the rounds
        monkeypatch.setattr(flows.training, "shard_clients", failing)
    else:
        monkeypatch.setattr(clients.train_client, "fn", failing)
    store, fields = own_store, {"task_retries": 0, "round_retries": 0}
    raised = ValueError if where == "set-up" else QuorumError  # a client's failure: no quorum
    for name, private in (("plain-fails", {}), ("private-fails", {"dp_epsilon": 8.0})):
        with pytest.raises(raised):
            _run(store, model_name=name, **(fields | private))
    client = store["client"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              run_view_type=ViewType.ALL)  # fmt: skip
    tags = {
        r.data.params["model_name"]: r.data.tags for r in runs if "fedrec.config" in r.data.tags
    }
    assert secret in tags["plain-fails"]["fedrec.error"]  # the weak version leaks it
    assert tags["private-fails"]["fedrec.error"] == (
        f"{raised.__name__} (a private run: the message is in the flow's log)"
    )


def test_a_private_run_does_not_warm_start_from_a_champion_trained_without_dp(own_store):
    store, other_users = own_store, {"synthetic_users": 320}
    plain = _run(store, model_name="shared", **other_users)
    assert plain["promoted"]
    with flow_log(logging.WARNING) as records:
        private = {"dp_epsilon": 8.0, "dp_budget": 8.0, "warm_start": True}
        _run(store, model_name="shared", **(private | other_users))
    refusal = f"no warm start: champion version {plain['model_version']} was not trained with DP"
    assert any(refusal in r.getMessage() for r in records)


def test_a_private_run_logs_its_fingerprint_keyed_so_a_reader_cannot_test_a_guess_of_the_rows(
    own_store,
):
    from mlflow.entities import ViewType

    from models.privacy.ledger import keyed_fingerprint
    from tasks.data import load_interactions
    from tasks.tracking import LEDGER_EXPERIMENT, ledger_secret, ledger_secret_path

    store, private = own_store, {"dp_epsilon": 4.0, "dp_budget": 8.0}
    runs = [_run(store, model_name="keyed", **private) for _ in range(2)]
    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | private))
    rows = load_interactions.fn(config)[0].fingerprint()  # what a reader who knows them computes
    client = store["client"]
    ledger = client.get_experiment_by_name(LEDGER_EXPERIMENT).experiment_id
    tag = "fedrec.dataset_fingerprint"
    logged = [
        *(client.get_run(r["run_id"]).data.tags[tag] for r in runs),
        *(client.get_model_version("keyed", r["model_version"]).tags[tag] for r in runs),
        *(r.data.params["dataset_fingerprint"]
          for r in client.search_runs([ledger], run_view_type=ViewType.ALL)),
    ]  # fmt: skip
    assert rows not in logged  # the reader's guess (the true rows) matches nothing logged
    # one keyed mark for the same rows, run after run: "unchanged since the champion" still works
    secret = ledger_secret(ledger_secret_path(store["uri"]), create=False)
    assert set(logged) == {keyed_fingerprint(rows, secret)}


@pytest.mark.parametrize("champion_at", ["meanwhile", "start"])
def test_a_resumed_private_run_keeps_its_plan_and_evaluates_only_the_champion_it_counted(
    own_store, monkeypatch, champion_at
):
    """The attack on the ledger: a private run planned without a champion stops; a champion
    appears; the resume would evaluate it (one more release) and recalibrate the noise of the
    rounds left, while the ledger and the logged epsilon still say E. A champion there at the
    start, which the plan counted, is evaluated on resume as the run would have evaluated it."""
    import tasks.clients as clients
    from flows.rounds import QuorumError

    store = own_store

    sigmas: list[float] = []
    releases: list[str] = []
    train, evaluate = clients.train_client.fn, clients.evaluate_client.fn

    def stopping(**kwargs: Any) -> Any:
        if kwargs["round_"] == 3:
            raise ConnectionError("the coordinator went away")
        return spying(**kwargs)

    def spying(**kwargs: Any) -> Any:
        sigmas.append(kwargs["family"].config.dp.noise_multiplier)
        return train(**kwargs)

    def evaluating(**kwargs: Any) -> Any:
        releases.append(kwargs["release_name"])
        return evaluate(**kwargs)

    private = {"model_name": "late-champion", "dp_epsilon": 2.0, "dp_budget": 10.0,
               "task_retries": 0, "round_retries": 0}  # fmt: skip
    if champion_at == "start":
        champion = _run(store, model_name="late-champion", rounds=1, task_retries=0)  # no DP
    with monkeypatch.context() as patch:
        patch.setattr(clients.train_client, "fn", stopping)
        with pytest.raises(QuorumError):
            _run(store, **private)
    client = store["client"]
    (stopped,) = [r for e in client.search_experiments() for r in client.search_runs(
        [e.experiment_id], "attributes.status = 'FAILED'") if r.data.params.get("model_name") ==
        "late-champion" or '"late-champion"' in r.data.tags.get("fedrec.config", "")]  # fmt: skip
    planned = sigmas[0]
    if champion_at == "meanwhile":
        champion = _run(store, model_name="late-champion", rounds=1, task_retries=0)  # no DP
    assert champion["promoted"]

    sigmas.clear()
    with monkeypatch.context() as patch:
        patch.setattr(clients.train_client, "fn", spying)
        patch.setattr(clients.evaluate_client, "fn", evaluating)
        summary = _run(store, **private, resume=stopped.info.run_id)

    assert sigmas and set(sigmas) == {planned}  # the rounds left keep the start's noise
    # and the run's record of its plan stays the start's, for a second resume
    tags = client.get_run(summary["run_id"]).data.tags
    assert tags["fedrec.dp_champion_planned"] == str(int(champion_at == "start"))
    if champion_at == "meanwhile":
        assert len(releases) == 3 and len(set(releases)) == 1  # the final evaluation, no other
        assert not summary["promoted"] and "promoted after this private run" in summary["reason"]
    else:  # the final evaluations of the candidate and of the champion, one release each
        assert len(releases) == 6 and len(set(releases)) == 2
        assert summary["champion_metrics"] and "not comparable" not in summary["reason"]
    logged = client.get_metric_history(summary["run_id"], "privacy/noise_multiplier")
    assert logged and all(m.value == pytest.approx(planned) for m in logged)
    assert summary["metrics"]["privacy/epsilon"] <= 2.0 + 1e-9


def _served_items(store, name: str) -> set[str]:
    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    served = mlflow.pyfunc.load_model(f"models:/{name}/latest").unwrap_python_model()
    return {str(i) for i in served.recommender.item_ids}


def test_a_private_model_lists_a_public_catalogue_not_the_items_its_rows_touch(own_store, tmp_path):
    """The attack: a reader of the registry looks for an item only one user rated. A model
    whose item list is the data's own shows it, which no epsilon covers."""
    from models.data.synthetic import generate_synthetic

    store = own_store
    data = generate_synthetic(n_users=300, n_items=120, n_interactions=9_000, seed=3)
    frame = data.frame.assign(
        user_id=data.user_ids[data.frame["user"]].astype(str),
        item_id=[f"i{i}" for i in data.item_ids[data.frame["item"]]],
    )[["user_id", "item_id", "rating"]]
    secret = pd.DataFrame({"user_id": ["alice"], "item_id": ["secret-visit"], "rating": [5.0]})
    path = tmp_path / "ratings.csv"
    pd.concat([frame, secret]).to_csv(path, index=False)
    private = {"data": str(path), "dp_epsilon": 8.0, "dp_budget": 100.0, "rounds": 1}

    catalogue = tmp_path / "items.csv"
    listed = [f"i{i}" for i in range(130)]  # the shop's list: ten items nobody rated yet
    pd.DataFrame({"item_id": listed}).to_csv(catalogue, index=False)
    public = _run(store, model_name="public-list", catalogue=str(catalogue), **private)
    assert _served_items(store, "public-list") == set(listed)
    from flows.training import USER_COUNT

    assert public["dp_not_covered"] == USER_COUNT  # what every private run leaves out
    from tasks.data import load_interactions

    config = TrainingConfig(**(SMALL | private), catalogue=str(catalogue))
    read, _ = load_interactions.fn(config)
    assert read.notes[-1].endswith("130 items; 1 rows of 1 items it lacks are left out")

    # the weak default of a plain file without a public list: said at the start of the run
    with flow_log(logging.WARNING) as records:
        own = _run(store, model_name="own-list", **private)
    assert "secret-visit" in _served_items(store, "own-list")
    assert any("DP does not cover that list" in r.getMessage() for r in records)
    # and at its end, on its MLflow run and on the version, where they are read
    assert own["dp_not_covered"].startswith("the model's item list: every item the rows touch")
    client = store["client"]
    assert client.get_run(own["run_id"]).data.tags["fedrec.dp_not_covered"] == own["dp_not_covered"]
    version = client.get_model_version("own-list", own["model_version"])
    assert version.tags["fedrec.dp_not_covered"] == own["dp_not_covered"]
    assert client.get_model_version("public-list", "1").tags["fedrec.dp_not_covered"] == USER_COUNT
    # and `fedrec models`, which an operator reads the registry with, says both
    from click.testing import CliRunner

    from fedrec.cli import main

    listed = CliRunner().invoke(main, ["models", "--tracking-uri", store["uri"],
                                       "--model-name", "own-list"]).stdout  # fmt: skip
    assert "private, epsilon 8: " in listed
    assert f"not covered by DP: {own['dp_not_covered']}" in listed


def test_a_private_run_on_synthetic_data_lists_every_generated_item(own_store):
    store = own_store
    # 60 users and 400 items: some items no user drew
    _run(store, model_name="synthetic-list", dp_epsilon=8.0, dp_budget=100.0, rounds=1,
         synthetic_users=60, synthetic_items=400, synthetic_interactions=1_500)  # fmt: skip
    from models.data.synthetic import generate_synthetic

    drawn = generate_synthetic(n_users=60, n_items=400, n_interactions=1_500, seed=0)
    assert drawn.n_items < 400  # the rows touch fewer items than exist
    assert _served_items(store, "synthetic-list") == {str(i) for i in range(400)}
