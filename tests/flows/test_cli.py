"""The fedrec command line: help, one-line errors, and train/recommend/predict end to end."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from fedrec.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _mlflow_rows(uri: str) -> list[dict]:
    """``fedrec runs --json``'s rows of the runs in MLflow. The session's Prefect server may
    hold other tests' failed flow runs that name no store, and those are listed too."""
    rows = [
        json.loads(x) for x in _run("runs", "--tracking-uri", uri, "--json").stdout.splitlines()
    ]
    return [r for r in rows if r["in_mlflow"]]


def test_help_explains_every_command():
    top = _run("--help")
    train = _run("train", "--help")
    assert top.exit_code == 0 and all(c in top.output for c in ("train", "recommend", "predict"))
    for flag in (
        "--data",
        "--train",
        "--test",
        "--clients",
        "--partition",
        "--rounds",
        "--algorithm",
        "--factors",
        "--seed",
        "--config",
        "--model-name",
        "--json",
        "--tracking-uri",
    ):
        assert flag in train.output, flag
    assert "[default: 10]" in train.output  # defaults come from the config model


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["train", "--rounds", "-1"],
            "rounds (--rounds): Input should be greater than or equal to 1 (got -1)",
        ),
        (
            ["train", "--data", "no/such/file.csv"],
            "data='no/such/file.csv': no such file or folder",
        ),
        (["train", "--partition", "by-key"], "--partition by-key needs --partition-key"),
        (["train", "--train", "x.csv"], "--train and --test go together"),
        (["train", "--clients", "2", "--min-clients", "3"], "min_clients=3 exceeds clients=2"),
        (["train", "--valid-fraction", "0.6", "--test-fraction", "0.5"], "must be < 1"),
    ],
)
def test_bad_train_arguments_give_one_line_and_exit_2(args, expected):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedrec: error: ") and expected in lines[0], (
        result.stderr
    )
    assert "Traceback" not in result.output


def test_config_file_keys_are_checked(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rounds: 3\nfactorz: 8\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config)])
    assert result.exit_code == 2
    assert "factorz: Extra inputs are not permitted" in result.stderr


def test_missing_store_and_unknown_model_are_one_line(tmp_path):
    from mlflow.tracking import MlflowClient

    history = tmp_path / "h.csv"
    history.write_text("user_id,item_id,rating\nu,1,4\n")
    missing = CliRunner().invoke(
        main,
        [
            "recommend",
            "--history",
            str(history),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'none.db'}",
        ],
    )
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates an empty store
    unknown = CliRunner().invoke(
        main,
        [
            "recommend",
            "--model",
            "models:/nothing@champion",
            "--history",
            str(history),
            "--tracking-uri",
            uri,
        ],
    )

    assert missing.exit_code == 2 and missing.stderr.startswith("fedrec: error: no MLflow store at")
    assert not (tmp_path / "none.db").exists()
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == (
        f"fedrec: error: model models:/nothing@champion: no registered model 'nothing' in "
        f"{tmp_path / 'empty.db'} (registered models: none; a model URI is models:/NAME@ALIAS, "
        "models:/NAME/VERSION or runs:/RUN_ID/model)"
    )
    bare = CliRunner().invoke(
        main, ["recommend", "--model", "models:/nothing", "--history", str(history), "--tracking-uri", uri]
    )  # fmt: skip
    assert bare.exit_code == 2 and bare.stderr.strip() == (
        "fedrec: error: model models:/nothing: names no alias or version (a model URI is "
        "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model, with a version a whole "
        "number, e.g. models:/nothing@champion or models:/nothing/1)"
    )
    for uri_given in ("models:/nothing@", "models:/nothing/-1"):
        no_alias = CliRunner().invoke(
            main, ["recommend", "--model", uri_given, "--history", str(history), "--tracking-uri", uri]
        )  # fmt: skip
        assert no_alias.exit_code == 2 and no_alias.stderr.strip().endswith(
            "e.g. models:/nothing@champion or models:/nothing/1)"
        ), no_alias.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_server):
    home = tmp_path_factory.mktemp("cli-home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_HOME", str(home))
        started = time.perf_counter()
        result = CliRunner().invoke(
            main,
            [
                "train",
                "--rounds",
                "2",
                "--clients",
                "3",
                "--factors",
                "4",
                "--tracking-uri",
                uri,
                "--model-name",
                "cli",
                "--keep-workspace",
                "--json",
            ],
            catch_exceptions=False,
        )
    result.wall_seconds = time.perf_counter() - started  # what its own figures cannot exceed
    return result, uri, home


def test_train_json_summary(trained):
    import numpy as np
    from mlflow.tracking import MlflowClient

    result, uri, home = trained
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1  # only the summary goes to stdout
    summary = json.loads(result.stdout)
    assert summary["model_version"] == "1" and summary["promoted"] is True
    assert summary["tracking_uri"] == uri and len(summary["run_id"]) == 32
    assert summary["seconds"] > 0 and summary["seconds"] == round(summary["seconds"], 2)
    assert summary["seconds"] <= result.wall_seconds
    assert summary["mlflow_run_url"].endswith(
        f"/runs/{summary['run_id']}?workflowType=machine_learning"
    )
    checked = re.search(r"^fedrec: data and configuration checked \(([\d.]+) s\)$",
                        result.stderr, re.MULTILINE)  # fmt: skip
    assert checked and 0 <= float(checked.group(1)) <= result.wall_seconds, result.stderr
    # the summary reports what the run logged at its last step
    logged = MlflowClient(tracking_uri=uri).get_metric_history(summary["run_id"], "test/rmse")
    assert [m.step for m in logged] == [1, 2]
    assert summary["metrics"]["test/rmse"] == pytest.approx(logged[-1].value, abs=1e-12)
    # and it beats the global-mean predictor on the same clients' test rows, read from the
    # partitions the run wrote (the baseline's RMSE is computed here, not by fedrec)
    workspace = next((home / "workspaces").iterdir())
    assert (workspace / "FINISHED").is_file()  # kept, and nothing to resume
    rows = pd.concat(
        pd.read_parquet(p) for p in sorted((workspace / "clients").glob("client-????.parquet"))
    )
    train, test = rows[rows["split"] == 0], rows[rows["split"] == 2]
    assert len(test) > 0 and len(train) > len(test)
    baseline = float(np.sqrt(np.mean((test["rating"] - train["rating"].mean()) ** 2)))
    assert summary["metrics"]["test/rmse"] < 0.95 * baseline, (summary["metrics"], baseline)


def test_a_run_that_fails_on_its_way_exits_1_and_says_so_on_stdout_under_json(
    tmp_path, prefect_server, monkeypatch
):
    """Exit status 2 is for what the user gave; a run whose clients do not answer is a failure
    of the run (1), which a scheduler may retry. A --json reader sees it on stdout too."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store is FEDREC_HOME's
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    faults = tmp_path / "faults.yaml"  # the simulation's failing clients are file-only settings
    faults.write_text("fault_clients: [0, 1]\ntask_retries: 0\n")
    args = ["train", "--config", str(faults), "--rounds", "2", "--clients", "3", "--factors", "4",
            "--min-clients", "2", "--tracking-uri", uri, "--model-name", "quorum"]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--json"])

    assert result.exit_code == 1, (result.exit_code, result.stderr[-2000:])
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("fedrec: error: round 1") and "min_clients" in line, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (failed,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    # the line says how to go on, and a script gets the run's id
    assert line.endswith(f"; fedrec train --resume {failed.info.run_id} continues it")
    assert answer == {"error": line.removeprefix("fedrec: error: "), "exit_status": 1,
                      "run_id": failed.info.run_id}  # fmt: skip
    assert failed.info.status == "FAILED"
    # the MLflow run says why, for its readers: the error the line gives, without the hint
    assert failed.data.tags["fedrec.error"].startswith("QuorumError: round 1")
    assert "min_clients" in failed.data.tags["fedrec.error"]
    assert (Path(failed.data.tags["fedrec.workspace"]) / "manifest.json").is_file()  # kept
    assert client.search_model_versions("name='quorum'") == []
    # `fedrec runs` answers "did it fail, and why" from MLflow, with the way on
    (row,) = _mlflow_rows(uri)
    assert row["status"] == "FAILED" and row["version"] is None
    assert row["error"] == failed.data.tags["fedrec.error"]
    assert row["resume"] == f"fedrec train --resume {failed.info.run_id}"
    listed = _run("runs", "--tracking-uri", uri).stdout.splitlines()
    assert " FAILED " in listed[1], listed
    assert listed[1].endswith(f"{failed.data.tags['fedrec.error']}; fedrec train --resume "
                              f"{failed.info.run_id} continues it")  # fmt: skip

    # the configuration refuses a value; click refuses a flag before the command runs
    for refused in (["--rounds", "-1"], ["--rounds", "many"]):
        bad = CliRunner().invoke(main, ["train", *refused, "--json"])
        assert bad.exit_code == 2
        assert json.loads(bad.stdout) == {
            "error": bad.stderr.strip().removeprefix("fedrec: error: "),
            "exit_status": 2,
        }


def test_an_alias_the_model_lacks_is_refused_with_its_versions(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    _, uri, _ = trained
    history = tmp_path / "history.csv"
    history.write_text("user_id,item_id,rating\nalice,1,5\n")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name='cli'")
    latest = max(int(v.version) for v in versions)

    done = _run("recommend", "--model", "models:/cli@staging", "--history", str(history),
                "--tracking-uri", uri)  # fmt: skip

    assert done.exit_code == 2
    shown = "versions" if len(versions) <= 5 else f"newest 5 of {len(versions)} versions"
    assert f"'cli' has no alias 'staging' in {uri.removeprefix('sqlite:///')} (its {shown}: " in (
        done.stderr
    )
    assert (
        f"the latest is models:/cli/{latest}; `fedrec models --model-name cli` says" in done.stderr
    )


def test_recommend_and_predict_write_csv(trained, tmp_path):
    _, uri, home = trained
    from models.data.partitions import read_item_ids  # the catalogue the model was trained on

    workspace = next((home / "workspaces").iterdir())
    assert (workspace / "FINISHED").is_file()  # kept, and nothing to resume
    items = [str(i) for i in read_item_ids(workspace)[:4]]
    history = tmp_path / "history.csv"
    history.write_text("user_id,item_id,rating\n" + "".join(f"alice,{i},5\n" for i in items[:3]))
    users = tmp_path / "users.csv"
    users.write_text("user_id\nalice\nbob\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"user_id,item_id\nalice,{items[3]}\nalice,no-such-item\n alice ,{items[0]}\n")
    model = ["--model", "models:/cli@champion", "--tracking-uri", uri]

    rec = _run("recommend", *model, "--history", str(history), "--users", str(users), "--k", "5")
    pred = _run("predict", *model, "--history", str(history), "--pairs", str(pairs))
    out = tmp_path / "recs.csv"
    written = _run("recommend", *model, "--history", str(history), "--out", str(out))

    table = pd.read_csv(io.StringIO(rec.stdout), dtype={"user_id": str, "item_id": str})
    assert list(table.columns) == ["user_id", "rank", "item_id", "score", "reason"]
    alice = table[table["user_id"] == "alice"]
    assert list(alice["rank"]) == [1, 2, 3, 4, 5] and not set(alice["item_id"]) & set(items[:3])
    assert alice["score"].between(1, 5).all()  # predicted ratings, on the 1-5 scale
    assert alice["reason"].str.startswith("predicted rating ").all()
    assert alice["reason"].str.contains(" from your ratings of 3 items").all()
    assert len(table[table["user_id"] == "bob"]) == 5
    bob = table[table["user_id"] == "bob"]
    assert (bob["reason"] == "no known items in history: most popular items").all()
    assert bob["score"].isna().all()  # no popularity counts in the rating column
    top = _run("recommend", *model, "--history", str(history), "--users", str(users), "--k", "1")
    assert pd.read_csv(io.StringIO(top.stdout))["rank"].tolist() == [1, 1]  # alice's, bob's
    assert written.stdout == ""
    assert written.stderr.strip() == f"fedrec: wrote 10 row(s) for 1 user(s) to {out.resolve()}"
    assert pd.read_csv(out)["user_id"].astype(str).eq("alice").all()
    scores = pd.read_csv(io.StringIO(pred.stdout), dtype={"user_id": str, "item_id": str})
    assert list(scores.columns) == ["user_id", "item_id", "score"]
    # one row per pair, in order; padded ids read as the history's are; unknown: no score
    assert list(scores["item_id"]) == [items[3], "no-such-item", items[0]]
    assert scores["user_id"].eq("alice").all() and scores["score"].isna().tolist() == [
        False,
        True,
        False,
    ]
    assert scores["score"].dropna().between(1, 5).all()
    notes = [line for line in pred.stderr.splitlines() if line.startswith("fedrec: note: ")]
    assert notes == [
        "fedrec: note: user alice, item no-such-item: no score: not an item this model knows"
    ]
    # what predict says about a history: its unknown items, and a user it knows nothing of
    history.write_text(history.read_text() + "alice,gone,4\ncarol,gone,5\n")
    pairs.write_text(f"user_id,item_id\nalice,{items[3]}\ncarol,{items[3]}\n")
    pred = _run("predict", *model, "--history", str(history), "--pairs", str(pairs))
    assert pd.read_csv(io.StringIO(pred.stdout))["score"].notna().all()
    assert pred.stderr.splitlines() == [
        "fedrec: note: user alice: ignored 1 unknown item(s): gone",
        "fedrec: note: user carol: ignored 1 unknown item(s): gone; no known items in history: "
        "scored by global mean and item bias",
    ]
    # bob has no history: popular items, and a line naming him (a mistyped id would look alike)
    assert "have no history item" not in rec.stderr
    assert rec.stderr.splitlines() == [
        f"fedrec: note: 1 of 2 user(s) of --users (bob) have no row in {history}: they get the "
        "most popular items, as a new user does"
    ]
    # a history file of new users only (its header): each user of --users gets bob's answer
    nobody = tmp_path / "nobody.csv"
    nobody.write_text("user_id,item_id,rating\n")
    cold = _run("recommend", *model, "--history", str(nobody), "--users", str(users), "--k", "5")
    cold_table = pd.read_csv(io.StringIO(cold.stdout), dtype={"user_id": str, "item_id": str})
    assert cold.exit_code == 0 and list(cold_table["user_id"]) == ["alice"] * 5 + ["bob"] * 5
    assert list(cold_table["item_id"]) == list(bob["item_id"]) * 2
    assert f"2 of 2 user(s) of --users (alice, bob) have no row in {nobody}" in cold.stderr
    refused = _run("recommend", *model, "--history", str(nobody))
    assert refused.exit_code != 0 and refused.stderr.strip() == (
        f"fedrec: error: {nobody}: has no data rows; allowed: at least one row, or --users FILE "
        "to ask for users with no history yet"
    )
    rec = _run("recommend", *model, "--history", str(history))
    assert "fedrec: note: 1 of 2 user(s) (carol) have no history item this model knows" in (
        rec.stderr
    )
    # a rating given twice: the later row is the one used, and the user is told
    history.write_text(history.read_text() + f"alice,{items[0]},1\n")
    rec = _run("recommend", *model, "--history", str(history))
    assert (
        f"fedrec: note: {history}: dropped 1 duplicate (user, item) rows, kept the latest of each "
        "(the last in file order)"
    ) in rec.stderr.splitlines()


def test_recommend_and_predict_read_other_column_names(trained, tmp_path):
    _, uri, home = trained
    from models.data.partitions import read_item_ids

    items = [str(i) for i in read_item_ids(next((home / "workspaces").iterdir()))[:4]]
    rows = [("alice", items[0], 5), ("alice", items[1], 2), ("carol", items[2], 4)]
    model = ["--model", "models:/cli@champion", "--tracking-uri", uri]
    outputs = []
    for user, item, rating in (("user_id", "item_id", "rating"), ("who", "movie", "stars")):
        history = tmp_path / f"{user}-history.csv"
        history.write_text(
            f"{user},{item},{rating}\n" + "".join(f"{u},{i},{r}\n" for u, i, r in rows)
        )
        users = tmp_path / f"{user}-users.csv"
        users.write_text(f"{user}\nalice\ncarol\n")
        pairs = tmp_path / f"{user}-pairs.csv"
        pairs.write_text(f"{user},{item}\nalice,{items[3]}\ncarol,{items[0]}\n")
        columns = ["--user-col", user, "--item-col", item, "--rating-col", rating]
        rec = _run("recommend", *model, *columns, "--history", str(history), "--users", str(users))
        pred = _run("predict", *model, *columns, "--history", str(history), "--pairs", str(pairs))
        outputs.append((rec.stdout, pred.stdout))

    assert outputs[0] == outputs[1]  # the same requests under other names: the same answers
    recommended = pd.read_csv(io.StringIO(outputs[1][0]), dtype={"user_id": str, "item_id": str})
    assert set(recommended["user_id"]) == {"alice", "carol"}
    assert recommended["reason"].str.contains(" from your ratings of ").all()  # histories read
    predicted = pd.read_csv(io.StringIO(outputs[1][1]), dtype={"user_id": str, "item_id": str})
    assert list(predicted["item_id"]) == [items[3], items[0]]


def test_recommend_reads_the_local_store_without_prefect_mlflow_or_lightgbm(trained, tmp_path):
    import os
    import subprocess
    import sys

    _, uri, _ = trained
    history = tmp_path / "history.csv"
    history.write_text("user_id,item_id,rating\nalice,1,5\n")
    script = (
        "import sys\n"
        "from fedrec.cli import main\n"
        "try:\n"
        f"    main(['recommend', '--model', 'models:/cli@champion', '--tracking-uri', {uri!r},"
        f" '--history', {str(history)!r}, '--k', '3'])\n"
        "except SystemExit as end:\n"
        "    assert not end.code, end.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'lightgbm', "
        "'sklearn', 'tasks', 'flows'})\n"
        "print('heavy:', heavy, file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )

    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stderr
    assert done.stdout.startswith("user_id,rank,item_id,score")


def test_the_direct_sqlite_read_finds_the_files_mlflow_downloads(trained, tmp_path):
    from fedrec.model_store import _state_from_mlflow, _state_from_sqlite, sqlite_path

    _, uri, _ = trained
    for model_uri in ("models:/cli@champion", "models:/cli/1"):
        direct = _state_from_sqlite(sqlite_path(uri), model_uri)
        via_mlflow = _state_from_mlflow(uri, model_uri, str(tmp_path / model_uri[-1]))

        assert direct is not None
        files = sorted(p.relative_to(direct) for p in direct.rglob("*") if p.is_file())
        assert files == sorted(
            p.relative_to(via_mlflow) for p in via_mlflow.rglob("*") if p.is_file()
        )
        assert all((direct / f).read_bytes() == (via_mlflow / f).read_bytes() for f in files)


def test_the_run_link_opens_mlflow_on_training_runs(trained):
    from mlflow.tracking import MlflowClient

    from fedrec.cli import mlflow_run_url

    result, uri, _ = trained
    run_id = json.loads(result.stdout)["run_id"]
    experiment = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id

    link, _ = mlflow_run_url(uri, run_id)

    assert link.endswith(f"/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning")
    tags = MlflowClient(tracking_uri=uri).get_experiment(experiment).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_serve_reads_the_nightly_deployment_and_checks_overrides_before_serving():
    from fedrec.cli import nightly_deployment

    spec = nightly_deployment()
    assert spec["schedules"][0]["cron"] == "0 2 * * *" and spec["concurrency_limit"]["limit"] == 1
    bad_value = CliRunner().invoke(main, ["serve", "--param", "rounds=-1"])
    bad_form = CliRunner().invoke(main, ["serve", "--param", "rounds"])
    assert (
        bad_value.exit_code == 2
        and "rounds (--rounds): Input should be greater than or equal to 1" in bad_value.stderr
    )
    assert bad_form.exit_code == 2 and "expected KEY=VALUE" in bad_form.stderr
    # a value the configuration reads but the locked deployment would refuse at every run
    for item, said in (("fault_probability=0.5", "fault_probability: a simulation parameter"),
                       ("warm_start='yes'", "warm_start: 'yes' is not of type 'boolean'")):  # fmt: skip
        refused = CliRunner().invoke(main, ["serve", "--param", item])
        assert refused.exit_code == 2 and f"--param: {said}" in refused.stderr, refused.stderr


def test_make_deploys_check_finds_a_running_prefect_server(prefect_server):
    from prefect.settings import get_current_settings

    from fedrec.deployment_check import check_api

    assert check_api() == str(get_current_settings().api.url).rstrip("/")


def test_make_deploys_last_steps_on_a_real_server(prefect_server, capsys):
    """A deployment that is not on the server is one line and leaves the server unchanged; the
    silent-runs automation is created with the window asked for, once however often it runs."""
    from datetime import timedelta

    from prefect import get_client
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.automations import Posture

    from fedrec.lock_parameters import _deployment
    from fedrec.lock_parameters import main as lock_main
    from fedrec.silent_runs import AUTOMATION
    from fedrec.silent_runs import main as silent_main

    assert lock_main(["federated-training/elsewhere"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "fedrec: error: deployment 'federated-training/elsewhere' is not on the Prefect server at "
    ) and line.endswith("(`make deploy` runs prefect deploy, then this)"), line
    assert _deployment("federated-training/elsewhere") is None

    try:
        assert silent_main(["--within", "90"]) == 0
        assert silent_main(["--within", "600"]) == 0
        with get_client(sync_client=True) as client:
            assert len(client.read_automations_by_name(AUTOMATION)) == 1
        made = Automation.read(name=AUTOMATION)  # the last one's window
        assert made.trigger.within == timedelta(seconds=600)
        # a run of the training flow that sent a heartbeat and then, within the window, neither
        # another nor a final state: crashed (one heartbeat in the window keeps it alive)
        ended = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
        trigger = made.trigger
        assert (trigger.posture, trigger.threshold) == (Posture.Proactive, 1)
        assert trigger.after == {"prefect.flow-run.heartbeat"}
        assert trigger.expect == {"prefect.flow-run.heartbeat"} | ended
        assert trigger.for_each == {"prefect.resource.id"}
        assert trigger.match_related.root == {
            "prefect.resource.role": "flow", "prefect.resource.name": "federated-training"
        }  # fmt: skip
        assert made.actions[0].state == StateType.CRASHED
        assert made.actions[0].message.startswith("no heartbeat for 600 s")
        said = capsys.readouterr().out.splitlines()
        assert said[-1].endswith("federated-training runs silent for 600 s become Crashed")
        made.delete()
        with pytest.raises(ValueError):  # Prefect's way to say there is none left
            Automation.read(name=AUTOMATION)
    finally:
        with contextlib.suppress(ValueError):
            Automation.read(name=AUTOMATION).delete()


def test_serve_is_refused_while_the_worker_deployments_schedule_is_active(prefect_server, capsys):
    """Each deployment queues only its own runs: with both schedules active on one server, the
    worker's nightly run and the served one trained at once and registered a version each."""
    from prefect import get_client
    from prefect.schedules import Cron

    from fedrec.lock_parameters import (
        DEPLOYMENT,
        SERVED,
        last_written,
        lock_when_scheduled,
        schedule_active,
    )
    from fedrec.lock_parameters import main as lock_main
    from flows.training import federated_training

    assert not schedule_active(DEPLOYMENT)  # not deployed here
    deployment = federated_training.to_deployment(name="nightly", schedules=[Cron("0 2 * * *")])
    deployment_id = deployment.apply()
    try:
        assert schedule_active(DEPLOYMENT)
        refused = CliRunner().invoke(main, ["serve"])
        assert refused.exit_code == 2, refused.output
        assert (
            "the worker deployment 'federated-training/nightly' on this Prefect server has an "
            "active schedule: its runs and this one's would train at the same time"
        ) in refused.stderr
        with get_client(sync_client=True) as client:
            client.pause_deployment(deployment_id)
        assert not schedule_active(DEPLOYMENT)  # paused: serve may take over
        # the other way round: make deploy's last step warns while fedrec serve is scheduled
        served = federated_training.to_deployment(
            name="nightly-serve", schedules=[Cron("0 2 * * *")]
        )
        served_id = served.apply()
        assert schedule_active(SERVED)
        lock_main([DEPLOYMENT])
        assert (
            "'federated-training/nightly-serve' (fedrec serve) is scheduled on this server too"
            in capsys.readouterr().err
        )
        # serve locks its deployment's parameters after its own write, not an earlier one: a
        # process killed without pausing leaves the deployment scheduled, and a restart writes
        # the derived schema over the old lock
        since = last_written(SERVED)
        assert lock_when_scheduled(SERVED, since, timeout=2) is None  # no write since
        served.apply()  # the restarted process's write
        assert lock_when_scheduled(SERVED, since, timeout=30)
        with get_client(sync_client=True) as client:
            schema = client.read_deployment(served_id).parameter_openapi_schema
        assert schema["additionalProperties"] is False
        with get_client(sync_client=True) as client:
            client.delete_deployment(served_id)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)


def test_a_deployment_reports_to_the_store_in_force_by_its_absolute_path(
    prefect_server, tmp_path, monkeypatch
):
    """A worker runs flows in folders of its own: a relative SQLite path would name another
    file there. A URI with a password is not written to Prefect, whose UI shows job variables."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    from fedrec.lock_parameters import DEPLOYMENT, pin_store
    from flows.training import federated_training

    deployment_id = federated_training.to_deployment(name="nightly").apply()
    try:
        with get_client(sync_client=True) as client:  # an operator's own variable
            client.update_deployment(
                deployment_id, DeploymentUpdate(job_variables={"env": {"KEEP": "1"}})
            )
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
        pinned = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
        assert pin_store(DEPLOYMENT) == pinned
        with get_client(sync_client=True) as client:
            env = client.read_deployment(deployment_id).job_variables["env"]
        assert env == {"KEEP": "1", "MLFLOW_TRACKING_URI": pinned}

        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://fedrec:secret@127.0.0.1:9")
        assert pin_store(DEPLOYMENT) is None
        with get_client(sync_client=True) as client:
            assert client.read_deployment(deployment_id).job_variables["env"] == env
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)


def test_make_deploys_last_step_says_where_runs_report_and_warns_for_the_worker_only(
    prefect_server, tmp_path
):
    """``python -m fedrec.lock_parameters [NAME]``, as ``make deploy`` runs it: exit status 0,
    the store the runs report to (or a warning for one with a password), and the warning about
    fedrec serve's schedule for the worker deployment only."""
    import subprocess
    import sys

    from prefect import get_client
    from prefect.schedules import Cron
    from prefect.settings import get_current_settings

    from flows.training import federated_training

    ids = [federated_training.to_deployment(name="nightly").apply(),
           federated_training.to_deployment(name="other").apply(),
           federated_training.to_deployment(name="nightly-serve",
                                            schedules=[Cron("0 2 * * *")]).apply()]  # fmt: skip
    env = os.environ | {"PREFECT_API_URL": str(get_current_settings().api.url)}

    def deploy(*argv: str, uri: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fedrec.lock_parameters", *argv], capture_output=True,
            text=True, env=env | {"MLFLOW_TRACKING_URI": uri}, cwd=Path(__file__).parents[2],
            timeout=300,
        )  # fmt: skip

    try:
        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
        worker = deploy(uri=store)
        assert worker.returncode == 0, worker.stderr
        assert worker.stdout.splitlines()[1] == (
            f"federated-training/nightly: its runs report to MLflow at {store} (whatever the "
            "worker's environment; set MLFLOW_TRACKING_URI and deploy again to change it)"
        )
        assert worker.stderr.startswith(
            "warning: 'federated-training/nightly-serve' (fedrec serve) is scheduled"
        )
        other = deploy("federated-training/other", uri="http://fedrec:secret@127.0.0.1:9")
        assert other.returncode == 0, other.stderr
        assert other.stdout.startswith("federated-training/other: refuses parameters")
        assert other.stderr.splitlines() == [
            "warning: federated-training/other: MLFLOW_TRACKING_URI holds credentials, so it is "
            "not written to Prefect: every worker needs it set, or its runs register in the "
            "worker's own FEDREC_HOME store"
        ]
    finally:
        with get_client(sync_client=True) as client:
            for deployment_id in ids:
                client.delete_deployment(deployment_id)


def test_a_reader_that_stops_early_ends_recommend_quietly(trained, tmp_path):
    """`fedrec recommend ... | head -1`: the pipe closes while rows are still being written."""
    import subprocess
    import sys

    _, uri, home = trained
    from models.data.partitions import read_item_ids

    item = str(read_item_ids(next((home / "workspaces").iterdir()))[0])
    history = tmp_path / "history.csv"
    history.write_text(
        "user_id,item_id,rating\n" + "".join(f"u{n},{item},4\n" for n in range(3000))
    )
    cli = Path(sys.executable).parent / "fedrec"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "FEDREC_HOME": str(home)}  # fmt: skip
    reader = subprocess.Popen(
        [str(cli), "recommend", "--model", "models:/cli@champion", "--tracking-uri", uri,
         "--history", str(history), "--k", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert reader.stdout.readline().startswith(b"user_id,rank,item_id")
    reader.stdout.close()  # like head: the rest is never read
    stderr = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 141
    assert "error" not in stderr and "Traceback" not in stderr, stderr


def test_a_run_of_real_sites_and_a_store_that_is_not_there_are_not_resumed(tmp_path):
    from mlflow import MlflowClient

    from fedrec.cli_models import run_rows
    from tasks.tracking import ResumeError, resumable_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "manifest.json").write_text("{}")
    run = client.create_run(client.create_experiment("fedrec"), tags={
        "fedrec.workspace": str(workspace), "fedrec.config": "{}", "fedrec.config_hash": "0",
        "fedrec.sites": "shop-a,shop-b",
    })  # fmt: skip
    client.set_terminated(run.info.run_id, status="FAILED")

    with pytest.raises(ResumeError, match=r"a run of real sites .* is not resumed; train again"):
        resumable_run(uri, run.info.run_id)
    with pytest.raises(ResumeError, match=r"no MLflow store at .*elsewhere.db; give the run's"):
        resumable_run(f"sqlite:///{tmp_path / 'elsewhere.db'}", run.info.run_id)
    assert not (tmp_path / "elsewhere.db").exists()  # looked for, not made
    rows = run_rows(client, limit=5)
    assert [(r["status"], r["resume"]) for r in rows] == [("FAILED", None)]


def test_no_resume_hint_for_a_run_that_registered_its_model_before_failing(tmp_path):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from fedrec.cli import _resumable_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "manifest.json").write_text("{}")
    run = client.create_run(
        client.create_experiment("fedrec"), tags={"fedrec.workspace": str(workspace)}
    )
    client.set_terminated(run.info.run_id, status="FAILED")
    config = SimpleNamespace(sites=None, tracking_uri=uri, resume=run.info.run_id)

    assert _resumable_run(config) == run.info.run_id  # failed before registering: resumable
    client.create_registered_model("m")
    client.create_model_version("m", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    assert _resumable_run(config) is None  # a resume would register it twice


def test_models_lists_versions_with_the_champion_and_why(trained, tmp_path):
    _, uri, _ = trained
    from mlflow import MlflowClient

    listed = _run("models", "--tracking-uri", uri, "--model-name", "cli")
    as_json = _run("models", "--tracking-uri", uri, "--model-name", "cli", "--json")

    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        "cli", "champion"
    )
    lines = listed.stdout.splitlines()
    assert lines[0] == f"cli: champion version {version.version} (models:/cli@champion)"
    row = next(line for line in lines if line.strip().startswith(f"{version.version}*"))
    assert "valid/rmse" in row and version.tags["fedrec.promotion_reason"] in row
    (record,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    champion = next(v for v in record["versions"] if v["champion"])
    assert champion["version"] == str(version.version) and champion["promoted"] is True
    assert champion["value"] == float(version.tags["metric.valid/rmse"])  # numbers, as train's
    unknown = CliRunner().invoke(main, ["models", "--tracking-uri", uri, "--model-name", "nope"])
    assert unknown.exit_code == 2 and "registered: " in unknown.stderr and "cli" in unknown.stderr


def test_runs_lists_the_training_runs_with_what_they_registered(trained):
    from mlflow import MlflowClient

    _, uri, _ = trained
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("cli", "champion")

    records = _mlflow_rows(uri)
    listed = _run("runs", "--tracking-uri", uri).stdout.splitlines()

    assert {r["experiment"] for r in records} == {"fedrec"}
    only = _run("runs", "--tracking-uri", uri, "--experiment", "fedrec", "--json").stdout
    assert [json.loads(x)["run_id"] for x in only.splitlines()] == [r["run_id"] for r in records]
    unknown = CliRunner().invoke(main, ["runs", "--tracking-uri", uri, "--experiment", "nope"])
    there = ", ".join(sorted(e.name for e in client.search_experiments()))
    assert "Default, " in there and "fedrec" in there  # every experiment of the store, by name
    assert unknown.exit_code == 2
    assert f"no such MLflow experiment; there are: {there}\n" in unknown.stderr
    elsewhere = _run("runs", "--tracking-uri", uri, "--experiment", "Default").stdout
    assert elsewhere.strip() == (
        f"no training runs in experiment Default of {uri}; the newest is in experiment fedrec"
    )
    trained_here = [r for r in records if r["run_id"] == version.run_id]
    assert len(trained_here) == 1
    (row,) = trained_here
    assert row["status"] == "FINISHED" and row["model"] == "cli"
    assert row["version"] == str(version.version) and row["promoted"] is True
    assert row["reason"] == version.tags["fedrec.promotion_reason"] and row["seconds"] > 0
    assert row["error"] is None and row["resume"] is None
    # the run's final figures, as the version records them (to the tag's 6 digits)
    assert row["metrics"]["valid/rmse"] == pytest.approx(
        float(version.tags["metric.valid/rmse"]), rel=1e-5
    )
    assert any(
        line.endswith(f"cli version {version.version} promoted: "
                      f"{version.tags['fedrec.promotion_reason']}")
        for line in listed[1:]
    ), listed  # fmt: skip


def _registry_of_m(tmp_path: Path, versions: int):
    """A SQLite store whose registered model ``m`` has ``versions`` versions (1 oldest) of one
    run and no champion; returns its URI and an MLflow client on it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("fedrec"))
    client.create_registered_model("m")
    for _ in range(versions):
        client.create_model_version("m", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return uri, client


def test_models_names_a_champion_older_than_the_versions_it_lists(tmp_path):
    """A champion that keeps winning is older than the newest versions: the alias still names
    it, and its row follows the newest ones."""
    uri, client = _registry_of_m(tmp_path, versions=3)
    client.set_registered_model_alias("m", "champion", "1")

    listed = _run("models", "--tracking-uri", uri, "--limit", "1")
    (record,) = [json.loads(x) for x in _run("models", "--tracking-uri", uri, "--limit", "1",
                                             "--json").stdout.splitlines()]  # fmt: skip

    lines = listed.stdout.splitlines()
    assert lines[0] == "m: champion version 1 (models:/m@champion)"
    assert [line.split()[0] for line in lines[2:]] == ["3", "1*"]
    assert record["champion"] == "1"
    assert [(v["version"], v["champion"]) for v in record["versions"]] == [
        ("3", False),
        ("1", True),
    ]


def test_models_lists_the_newest_ten_versions_and_the_champion_once(tmp_path):
    """Without --limit the ten newest versions; a champion among them is listed once, in its
    place; a model without a champion lists its versions alone."""
    uri, client = _registry_of_m(tmp_path, versions=12)
    # a version registered before the promotion metric had a tag of its own: its one metric
    for key, value in {"metric.valid/client_1/rmse": "0.8", "metric.valid/rmse": "0.9"}.items():
        client.set_model_version_tag("m", "12", key, value)

    def listed() -> dict:
        (record,) = [json.loads(x) for x in _run("models", "--tracking-uri", uri,
                                                 "--json").stdout.splitlines()]  # fmt: skip
        return record

    without = listed()
    client.set_registered_model_alias("m", "champion", "5")
    among = listed()
    text = _run("models", "--tracking-uri", uri).stdout.splitlines()

    newest = [str(v) for v in range(12, 2, -1)]
    assert without["champion"] is None
    assert (without["versions"][0]["metric"], without["versions"][0]["value"]) == (
        "valid/rmse",
        0.9,
    )
    assert [(v["version"], v["champion"]) for v in without["versions"]] == [
        (v, False) for v in newest
    ]
    assert among["champion"] == "5"
    assert [(v["version"], v["champion"]) for v in among["versions"]] == [
        (v, v == "5") for v in newest
    ]
    assert text[0] == "m: champion version 5 (models:/m@champion)"
    assert [line.split()[0] for line in text[2:]] == [v + "*" * (v == "5") for v in newest]
    # each registered at the minute (UTC) MLflow recorded
    made = {str(v.version): v.creation_timestamp for v in client.search_model_versions("name='m'")}
    assert [v["registered"] for v in among["versions"]] == [
        datetime.datetime.fromtimestamp(made[v] / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M")
        for v in newest
    ]


def test_runs_lists_the_newest_ten_without_a_prefect_server(tmp_path):
    """Without --limit the ten newest training runs; with no Prefect API configured and no
    local server, the runs MLflow has are all there is to list (a user's first look)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("fedrec")
    ids = []
    for n in range(12):
        run = client.create_run(experiment, start_time=1_700_000_000_000 + n * 60_000,
                                tags={"fedrec.config_hash": f"c{n}"}
                                # time the run spent ended between its resumes: not counted
                                | ({"fedrec.paused_seconds": "7.5"} if n == 11 else {}),
                                run_name=f"nightly-{n}" + "-resumed-after-a-crash" * (n == 11))  # fmt: skip
        took = 30_040 + 100_000 * n  # milliseconds: listed to a tenth of a second
        client.set_terminated(run.info.run_id, end_time=1_700_000_000_000 + n * 60_000 + took)
        ids.append(run.info.run_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"FEDREC_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect")}

    done = subprocess.run([sys.executable, "-m", "fedrec.cli", "runs", "--tracking-uri", uri,
                           "--json"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip

    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["run_id"] for r in rows] == ids[::-1][:10]
    assert [r["name"] for r in rows] == ["nightly-11-resumed-after-a-crash"] + [
        f"nightly-{n}" for n in range(10, 1, -1)
    ]
    # 2023-11-14 22:13:20 UTC and 11 minutes
    assert (rows[0]["started"], rows[0]["started_at"]) == (
        "2023-11-14 22:24", "2023-11-14T22:24:20.000+00:00"
    )  # fmt: skip
    assert [r["seconds"] for r in rows] == [1122.5] + [30.0 + 100 * n for n in range(10, 1, -1)]
    assert [r["paused_seconds"] for r in rows] == [7.5] + [0.0] * 9
    assert {(r["status"], r["in_mlflow"]) for r in rows} == {("FINISHED", True)}
    assert "Prefect API" not in done.stderr

    newest = subprocess.run([sys.executable, "-m", "fedrec.cli", "runs", "--tracking-uri", uri,
                             "--limit", "1", "--experiment", "fedrec"],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert newest.returncode == 0, newest.stderr
    header, row = newest.stdout.splitlines()
    assert header.startswith("started (UTC)     took     status    run")
    # a name longer than its 25 characters is cut, and the outcome keeps its place
    assert row == ("2023-11-14 22:24  1122 s   FINISHED  nightly-11-resumed-after- "
                   "registered nothing"), row  # fmt: skip


def test_a_stop_between_registration_and_promotion_is_recorded_as_not_promoted(
    tmp_path, prefect_server, monkeypatch
):
    """Ctrl-C after the version was registered and before its promotion decision: the version
    stayed undecided until the model's next training, and the error line said only
    'interrupted' (the run cannot be resumed: it registered its version)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    import flows.training

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.training, "record_promotion", stopped)
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, [
        "train", "--rounds", "1", "--clients", "2", "--factors", "2", "--synthetic-users", "300",
        "--synthetic-items", "100", "--synthetic-interactions", "4000", "--tracking-uri", uri,
        "--model-name", "cut",
    ])  # fmt: skip

    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "fedrec: error: interrupted; cut version 1 was registered, but the stop came before its "
        "promotion decision: it is recorded as not promoted, and the champion is unchanged "
        "(train again to compare anew)"
    )
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name='cut'")
    assert version.tags["fedrec.promoted"] == "false"
    assert version.tags["fedrec.promotion_reason"].startswith("orphan: its training (run ")
    with pytest.raises(MlflowException, match="alias"):
        client.get_model_version_by_alias("cut", "champion")
