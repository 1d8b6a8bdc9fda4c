"""`fedrec workspaces`: what failed runs keep for --resume, listed and pruned by age."""

from __future__ import annotations

import os
import time

from click.testing import CliRunner

from fedrec.cli import main


def _workspace(root, name, days_old, manifest=True, source="s"):
    folder = root / name
    (folder / "clients").mkdir(parents=True)
    files = [folder / "clients" / "client-0.parquet"]
    files[0].write_bytes(b"x" * 2_000_000)
    if manifest:
        files.append(folder / "manifest.json")
        files[-1].write_text(
            f'{{"fingerprint": "f", "source": "{source}", "n_items": 1, "n_users": 1, '
            '"rating_scale": null, "clients": []}'
        )
    written = time.time() - days_old * 86400
    for path in [*files, folder / "clients", folder]:
        os.utime(path, (written, written))
    return folder


def test_prune_removes_only_workspaces_older_than_asked_and_leaves_other_folders(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    root = tmp_path / "workspaces"
    old = _workspace(root, "run-old", days_old=10)
    new = _workspace(root, "run-new", days_old=2)
    other = _workspace(root, "notes", days_old=30, manifest=False)
    # another program's manifest.json, and a link to a workspace: neither is touched
    foreign = _workspace(root, "package", days_old=30, manifest=False)
    (foreign / "manifest.json").write_text('{"name": "x"}')
    (root / "zlink").symlink_to(old)
    runner = CliRunner()

    listed = runner.invoke(main, ["workspaces"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert (
        lines[0].startswith("run-old")
        and "2.0 MB" in lines[0]
        and "written 10.0 days ago" in (lines[0])
    )
    assert lines[0].endswith("resume: fedrec train --resume run-old")
    assert lines[1].startswith("run-new")
    assert [line.split()[0] for line in lines[2:]] == ["notes", "package", "zlink"]
    assert all("not a run workspace" in line for line in lines[2:])
    assert old.exists() and new.exists()

    pruned = runner.invoke(main, ["workspaces", "--prune"])
    assert pruned.exit_code == 0, pruned.output
    assert not old.exists() and new.exists() and other.exists() and foreign.exists()
    assert pruned.output.splitlines()[0].endswith("removed")
    assert pruned.output.splitlines()[-1] == "removed 1 workspace(s) not written for 7 days, 2.0 MB"

    again = runner.invoke(main, ["workspaces", "--prune", "--older-than", "1"])
    assert again.exit_code == 0, again.output
    assert not new.exists() and other.exists() and (foreign / "manifest.json").exists()
    assert runner.invoke(main, ["workspaces"]).output.startswith(f"no run workspaces in {root}")


def test_a_workspace_kept_after_its_run_succeeded_offers_no_resume(tmp_path, monkeypatch):
    from models.data.partitions import mark_finished

    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    failed = _workspace(tmp_path / "workspaces", "run-failed", days_old=2)
    kept = _workspace(tmp_path / "workspaces", "run-kept", days_old=1)
    mark_finished(kept)

    lines = CliRunner().invoke(main, ["workspaces"]).output.splitlines()

    assert lines[0].startswith("run-failed") and lines[0].endswith(
        f"resume: fedrec train --resume {failed.name}"
    )
    assert lines[1].startswith("run-kept")
    assert lines[1].endswith("finished (kept by --keep-workspace): nothing to resume")


def test_a_workspace_of_real_sites_offers_no_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    _workspace(tmp_path / "workspaces", "run-sites", days_old=1, source="sites:sites.yaml")

    (line,) = CliRunner().invoke(main, ["workspaces"]).output.splitlines()

    assert line.startswith("run-sites") and line.endswith(
        "a run of real sites: not resumed (train again with --sites)"
    )


def test_the_resume_command_names_a_store_that_is_not_the_default_one(tmp_path, monkeypatch):
    """Without it, `fedrec train --resume ID` would look for the run in the default store."""
    from fedrec.model_store import record_store, resume_command

    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("fedrec.USER_TRACKING_URI", None)
    monkeypatch.chdir(tmp_path)
    default = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resume_command("r1", default) == "fedrec train --resume r1"
    assert resume_command("r1", None) == "fedrec train --resume r1"
    assert resume_command("r1", "sqlite:///mlflow.db") == "fedrec train --resume r1"  # the same
    assert resume_command("r1", "sqlite:///other.db") == (
        f"fedrec train --resume r1 --tracking-uri sqlite:///{tmp_path / 'other.db'}"
    )
    assert resume_command("r1", "http://u:pw@mlflow:5000") == (
        "fedrec train --resume r1 --tracking-uri 'http://u:***@mlflow:5000'"
    )
    # the user's MLFLOW_TRACKING_URI, as the process started (MLflow writes the variable too)
    monkeypatch.setattr("fedrec.USER_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default)
    assert resume_command("r1", "http://mlflow:5000") == "fedrec train --resume r1"
    assert resume_command("r1", default) == f"fedrec train --resume r1 --tracking-uri {default}"

    # `fedrec workspaces` gives it from the store the run recorded in its workspace
    monkeypatch.setattr("fedrec.USER_TRACKING_URI", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    elsewhere = _workspace(tmp_path / "workspaces", "run-elsewhere", days_old=2)
    record_store(elsewhere, "http://127.0.0.1:5000")
    here = _workspace(tmp_path / "workspaces", "run-here", days_old=1)
    record_store(here, default)

    lines = CliRunner().invoke(main, ["workspaces"]).output.splitlines()

    assert lines[0].endswith(
        "resume: fedrec train --resume run-elsewhere --tracking-uri http://127.0.0.1:5000"
    )
    assert lines[1].endswith("resume: fedrec train --resume run-here")


def test_a_failed_runs_hint_names_its_store_when_it_is_not_the_default_one(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fedrec import cli
    from fedrec.cli_errors import RunFailed

    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("fedrec.USER_TRACKING_URI", None)
    monkeypatch.setattr(cli, "_resumable_run", lambda config: "r1")
    other = f"sqlite:///{tmp_path / 'other.db'}"

    for uri, hint in ((None, ""), (other, f" --tracking-uri {other}")):
        error = cli._with_resume_hint(RunFailed("interrupted"), SimpleNamespace(tracking_uri=uri))
        assert error.message == f"interrupted; fedrec train --resume r1{hint} continues it"
        assert error.details == {"run_id": "r1"}
    # a secure-aggregation run: its clients refuse to mask a round twice, which the hint says,
    # and a resume they refused is offered no further resume
    secure = SimpleNamespace(tracking_uri=None, secure_aggregation=True)
    error = cli._with_resume_hint(RunFailed("interrupted"), secure)
    assert error.message == (
        "interrupted; fedrec train --resume r1 continues it unless its clients had masked the "
        "round it stopped in (then start a new run)"
    )
    refused = RunFailed("round 13: 0 of 10 clients answered; client-0: SecAggError: client-0 "
                        "masked this round's update once already (...) (a resumed run cannot "
                        "repeat a round its clients masked: start a new run)")  # fmt: skip
    assert cli._with_resume_hint(refused, secure).message == refused.message


def test_older_than_without_prune_is_refused_rather_than_ignored(tmp_path, monkeypatch):
    """The listing showed every workspace whatever --older-than said, without a word."""
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    done = CliRunner().invoke(main, ["workspaces", "--older-than", "3"])
    assert done.exit_code == 2
    assert (
        "--older-than sets the age --prune deletes from; without --prune it would do nothing"
        in (done.stderr)
    )
    assert CliRunner().invoke(main, ["workspaces"]).exit_code == 0  # the default age: listed


def test_remove_deletes_the_named_runs_workspaces_and_refuses_a_name_not_there(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    root = tmp_path / "workspaces"
    one, two, kept = (_workspace(root, f"run-{n}", days_old=0.1) for n in ("a", "b", "c"))
    other = _workspace(root, "notes", days_old=30, manifest=False)
    runner = CliRunner()

    wrong = runner.invoke(main, ["workspaces", "--remove", "run-a", "--remove", "run-x"])
    assert wrong.exit_code == 2
    assert wrong.stderr.strip() == (
        f"fedrec: error: --remove run-x: no run workspace of that name in {root}; there are: "
        "run-a, run-b, run-c"
    )
    assert one.exists()  # nothing removed when one name is wrong
    notes = runner.invoke(main, ["workspaces", "--remove", "notes"])  # not a fedrec workspace
    assert notes.exit_code == 2 and other.exists()
    both = runner.invoke(main, ["workspaces", "--remove", "run-a", "--remove", "run-b"])
    assert both.exit_code == 0, both.output
    assert both.output.splitlines() == ["run-a      2.0 MB  removed", "run-b      2.0 MB  removed"]
    assert not one.exists() and not two.exists() and kept.exists() and other.exists()
    assert runner.invoke(main, ["workspaces", "--remove", "run-c", "--prune"]).exit_code == 2
    assert kept.exists()


def test_a_workspace_whose_run_is_gone_from_its_store_offers_no_resume(tmp_path, monkeypatch):
    """After `mlflow gc` (or a deleted run) the listing offered `fedrec train --resume ID`,
    which then answered 'no such MLflow run'."""
    from mlflow import MlflowClient

    from fedrec.model_store import record_store, run_in_store

    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("fedrec.USER_TRACKING_URI", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("fedrec", (tmp_path / "artifacts").as_uri())
    live, deleted = (client.create_run(experiment).info.run_id for _ in range(2))
    client.delete_run(deleted)
    absent = "0" * 32
    for days, run_id in enumerate((live, deleted, absent), start=1):
        record_store(_workspace(tmp_path / "workspaces", run_id, days_old=days), uri)

    assert [run_in_store(uri, r) for r in (live, deleted, absent)] == [True, False, False]
    assert run_in_store("http://127.0.0.1:1", live) is None  # not a store it reads
    assert run_in_store(f"sqlite:///{tmp_path / 'none.db'}", live) is None
    lines = CliRunner().invoke(main, ["workspaces"]).output.splitlines()

    assert lines[0].startswith(live) and lines[0].endswith(f"resume: fedrec train --resume {live}")
    for line, run_id in zip(lines[1:], (deleted, absent), strict=True):
        assert line.startswith(run_id) and line.endswith(
            "its MLflow run is gone from its store (deleted): nothing to resume; "
            f"fedrec workspaces --remove {run_id} frees it"
        ), line


def test_prune_takes_an_age_below_a_day_and_refuses_a_negative_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    root = tmp_path / "workspaces"
    day_old = _workspace(root, "run-day", days_old=1)
    hours_old = _workspace(root, "run-hours", days_old=0.1)
    runner = CliRunner()

    pruned = runner.invoke(main, ["workspaces", "--prune", "--older-than", "0.5"])
    assert pruned.exit_code == 0, pruned.output
    assert not day_old.exists() and hours_old.exists()
    assert any(line.startswith("run-day") and line.endswith("removed") for line in
               pruned.output.splitlines()), pruned.output  # fmt: skip

    negative = runner.invoke(main, ["workspaces", "--prune", "--older-than", "-1"])
    assert negative.exit_code == 2 and "Invalid value for '--older-than'" in negative.output
    assert hours_old.exists()
