"""Resume works for every family: a run that stops in the middle of a phase continues from its
last checkpoint (no round before it runs again, the phases that only every client answers once
are not asked again) and ends with the model an uninterrupted run gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import tracking_store

TINY = {"synthetic_users": 240, "synthetic_items": 100, "synthetic_interactions": 7_000,
        "clients": 3, "rounds": 3, "feedback": "implicit", "skip_if_unchanged": False,
        "task_retries": 0, "round_retries": 0}  # fmt: skip
FAMILIES = {
    # ALS steps 1-3, item co-occurrences once, re-ranker steps 4-5: stop in step 5
    "two-stage": ({"ranker": "lightgbm", "ranker_rounds": 2, "factors": 6, "candidates": 30,
                   "neighbours": 30}, ("ranker", 5)),
    "neural": ({"implicit_model": "neural", "neural_latent": 8}, ("train", 3)),
}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-resume-families")) as store:
        yield store


def _spy(monkeypatch, seen: list, stop_at: tuple[str, int] | None) -> None:
    """Record (phase, round) of every training task; fail every client at ``stop_at``."""
    import tasks.clients as clients

    original = clients.train_client.fn

    def spy(**kwargs: Any) -> Any:
        seen.append((kwargs["phase"], kwargs["round_"]))
        if (kwargs["phase"], kwargs["round_"]) == stop_at:
            raise ConnectionError("the coordinator went away")
        return original(**kwargs)

    monkeypatch.setattr(clients.train_client, "fn", spy)


def _config(store, name: str, **fields: Any) -> TrainingConfig:
    extra, _ = FAMILIES[name]
    return TrainingConfig(tracking_uri=store["uri"], **(TINY | extra | fields))


@pytest.mark.parametrize("name", FAMILIES)
def test_a_stopped_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(
    store, monkeypatch, name
):
    from flows.rounds import QuorumError
    from flows.training import federated_training

    _, stop_at = FAMILIES[name]
    # the uninterrupted run is the champion when the stopped one starts (no warm start, so it
    # trains the same way), and the resumed run is compared with it; made champion by hand (a
    # model this small may lose to the popularity baseline), as `fedrec rollback` would
    model_name = f"resumed-{name}"
    whole = federated_training(**_config(store, name, model_name=model_name).model_dump())
    store["client"].set_registered_model_alias(model_name, "champion", whole["model_version"])

    seen: list = []
    with monkeypatch.context() as patch:
        _spy(patch, seen, stop_at)
        with pytest.raises(QuorumError):
            federated_training(**_config(store, name, model_name=model_name).model_dump())
    run_id = _stopped_run(store, model_name)
    stopped_flow_run = store["client"].get_run(run_id).data.tags["prefect.flow_run_id"]

    resumed: list = []
    with monkeypatch.context() as patch:
        _spy(patch, resumed, None)
        summary = federated_training(**_config(store, name, resume=run_id).model_dump())

    assert summary["run_id"] == run_id
    assert min(r for _, r in resumed if r > 0) == stop_at[1]  # nothing before the stop again
    assert not any(r == 0 for _, r in resumed)  # nor a round that every client answers once
    keys = ["valid/ndcg_at_10", "test/ndcg_at_10"]
    if name == "two-stage":  # re-ranked: compared on the selection users' rows
        keys.append("select/ndcg_at_10")
    for key in keys:
        assert summary["metrics"][key] == pytest.approx(whole["metrics"][key], abs=1e-9), key
        # the champion, the uninterrupted run's model, evaluated on the same clients
        assert summary["champion_metrics"][key] == pytest.approx(whole["metrics"][key], abs=1e-9)
    assert summary["champion_version"] == whole["model_version"] != summary["model_version"]
    assert not summary["promoted"] and "not comparable" not in summary["reason"]
    # and with the uninterrupted run's learning curve: every step logged once, the one the
    # stopped run checkpointed but died before logging (it is logged with the next step) too
    client = store["client"]
    for key in ("valid/ndcg_at_10", "test/ndcg_at_10"):
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        want = [(m.step, m.value) for m in client.get_metric_history(whole["run_id"], key)]
        assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, len(want) + 1)), key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-9), key

    # the failed flow run that stopped is the resumed MLflow run's, not one without any
    from fedrec.cli import configured_api
    from fedrec.cli_models import prefect_only_rows

    tags = store["client"].get_run(run_id).data.tags
    assert tags["fedrec.earlier_flow_runs"].split() == [stopped_flow_run]
    assert tags["prefect.flow_run_id"] != stopped_flow_run
    alone = prefect_only_rows(store["client"], configured_api(), 200, store["uri"])
    assert stopped_flow_run not in {r["prefect_flow_run_id"] for r in alone}


def test_a_run_stopped_before_its_first_step_was_logged_logs_every_step_when_resumed(
    store, monkeypatch
):
    from flows.rounds import QuorumError
    from flows.training import federated_training

    with monkeypatch.context() as patch:
        _spy(patch, [], ("train", 1))  # every client fails in round 1: nothing logged yet
        with pytest.raises(QuorumError):
            federated_training(**_config(store, "neural", model_name="stopped-first").model_dump())
    run_id = _stopped_run(store, "stopped-first")
    assert store["client"].get_run(run_id).data.metrics == {}

    federated_training(**_config(store, "neural", resume=run_id).model_dump())

    for key in ("valid/ndcg_at_10", "system/clients"):
        steps = [m.step for m in store["client"].get_metric_history(run_id, key)]
        assert steps == list(range(1, TINY["rounds"] + 1)), key


def _stopped_run(store, model_name: str) -> str:
    """The failed run of ``model_name`` (its config is in the run's tags)."""
    client = store["client"]
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            if run.info.status == "FAILED" and f'"model_name":"{model_name}"' in run.data.tags.get(
                "fedrec.config", ""
            ).replace(" ", ""):
                return run.info.run_id
    raise AssertionError(f"no failed run of {model_name}")


def test_a_checkpoint_replaces_the_ones_before_it_and_the_arrays_only_they_held(tmp_path):
    from dataclasses import dataclass

    import numpy as np

    from tasks.server import _SHARED_BYTES, Progress, latest_checkpoint, write_checkpoint

    @dataclass(frozen=True)
    class Arrays:  # the two methods of a family that checkpoints use
        def state_arrays(self, state: dict) -> dict:
            return state

        def load_state(self, arrays: dict) -> dict:
            return arrays

    big = _SHARED_BYTES // 8  # float64 values: at the threshold, stored once in a shared file
    states = [
        {"small": np.full(3, float(i)), "large": np.full(big, float(i // 2)),
         "below": np.full(big - 1, 7.0)}  # one value short of the threshold: in the checkpoint
        for i in range(4)
    ]  # fmt: skip
    for step, state in enumerate(states, start=1):
        write_checkpoint(Arrays(), state, str(tmp_path), Progress(step, 0, step))

    assert sorted(p.name for p in tmp_path.glob("round-*.npz")) == ["round-0004.npz"]
    assert len(list(tmp_path.glob("shared-*.npz"))) == 1  # rounds 1-2's large array is gone
    loaded, progress = latest_checkpoint.fn(family=Arrays(), folder=str(tmp_path))
    assert progress == Progress(4, 0, 4)
    np.testing.assert_array_equal(loaded["small"], states[3]["small"])
    np.testing.assert_array_equal(loaded["large"], states[3]["large"])
    np.testing.assert_array_equal(loaded["below"], states[3]["below"])


def test_a_resumed_runs_duration_leaves_out_the_time_it_spent_ended(store):
    import time

    from fedrec.cli_models import run_rows
    from tasks.tracking import reopen_run

    client, now = store["client"], int(time.time() * 1000)
    experiment = client.create_experiment("paused-runs")
    run = client.create_run(experiment, start_time=now - 100_000, tags={"fedrec.config_hash": "h"})
    run_id = run.info.run_id
    ended = now - 60_000
    client.set_terminated(run_id, "FAILED", end_time=ended)  # ran 40 s, then 60 s ended
    before = time.time() * 1000
    reopen_run(store["uri"], run_id)
    after = time.time() * 1000
    reopened = client.get_run(run_id)
    assert reopened.info.status == "RUNNING"
    paused = float(reopened.data.tags["fedrec.paused_seconds"])
    # the time from its end to the reopening, and nothing else (the tag holds tenths)
    assert (before - ended) / 1000 - 0.05 <= paused <= (after - ended) / 1000 + 0.05
    resumed_at = time.time() * 1000
    client.set_terminated(run_id, "FINISHED", end_time=int(resumed_at) + 5_000)  # 5 s more

    (row,) = run_rows(client, 5, experiment="paused-runs")
    assert row["paused_seconds"] == paused
    assert row["seconds"] == pytest.approx(45, abs=1.0)  # 40 s + 5 s; not the 105 s between


def test_a_reopened_run_keeps_the_flow_runs_that_carried_it_before_once_each(store):
    """``prefect.flow_run_id`` names the flow run that carries the run now; the ones before it
    are listed once each, in order. The same flow run again (Prefect retrying it) and a run
    that no flow run carried add none."""
    from tasks.tracking import reopen_run

    client = store["client"]
    experiment = client.create_experiment("reopened-runs")

    def reopened(run_id: str, flow_run_id: str) -> tuple[str | None, str | None]:
        reopen_run(store["uri"], run_id, flow_run_id)
        tags = client.get_run(run_id).data.tags
        return tags.get("prefect.flow_run_id"), tags.get("fedrec.earlier_flow_runs")

    run_id = client.create_run(experiment, tags={"prefect.flow_run_id": "flow-a"}).info.run_id
    assert reopened(run_id, "flow-a") == ("flow-a", None)
    assert reopened(run_id, "flow-b") == ("flow-b", "flow-a")
    assert reopened(run_id, "flow-c") == ("flow-c", "flow-a flow-b")
    untagged = client.create_run(experiment).info.run_id
    assert reopened(untagged, "flow-x") == ("flow-x", None)


@pytest.mark.parametrize(
    "promoted, with_manifest, said",
    [("true", True, "(promoted to champion); there is nothing to resume; its workspace is removed"),
     ("false", True, "(not promoted); there is nothing to resume; its workspace is removed"),
     (None, False, "(its promotion decision not recorded); there is nothing to resume")],
)  # fmt: skip
def test_a_run_that_registered_its_version_is_not_resumed_and_its_workspace_goes(
    store, tmp_path, promoted, with_manifest, said
):
    """A run that failed after registering: resuming it would register a twin. Its workspace
    is removed when it is a fedrec workspace (a manifest says so), and left otherwise."""
    from models.data.partitions import MANIFEST
    from tasks.tracking import ResumeError, resumable_run

    client = store["client"]
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    if with_manifest:
        (workspace / MANIFEST).write_text("{}")
    experiment = client.get_experiment_by_name("registered-runs")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("registered-runs")
    )
    tags = {"fedrec.config": "{}", "fedrec.workspace": str(workspace)}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    client.set_terminated(run_id, "FAILED")
    name = f"registered-{promoted}"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    if promoted is not None:
        client.set_model_version_tag(name, version.version, "fedrec.promoted", promoted)

    with pytest.raises(ResumeError) as refused:
        resumable_run(store["uri"], run_id)

    assert str(refused.value) == (
        f"--resume {run_id}: the run already registered {name} version 1 {said}"
    )
    assert workspace.exists() is not with_manifest


def _failing_checkpoints(
    patch: pytest.MonkeyPatch, fails: Callable[[int], bool], why: str
) -> list[int]:
    """Make the server's n-th checkpoint write (counted from 1) raise OSError(``why``) when
    ``fails(n)``; returns the list that counts the writes tried."""
    import tasks.server as server

    original, calls = server.write_checkpoint, []

    def write(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if fails(len(calls)):
            raise OSError(why)
        return original(*args, **kwargs)

    patch.setattr(server, "write_checkpoint", write)
    return calls


def test_a_server_step_retried_after_its_checkpoint_failed_logs_its_step_once(store, monkeypatch):
    """The server step logs the previous step's metrics, then checkpoints: when the checkpoint
    fails and the task runs again, the step's metrics are in MLflow once, not once per attempt."""
    from flows.training import federated_training

    # the third checkpoint (after step 2 was logged) fails once
    calls = _failing_checkpoints(monkeypatch, lambda n: n == 3, "the disk went away for a moment")
    summary = federated_training(**_config(store, "neural", model_name="retried-step").model_dump())

    assert len(calls) > TINY["rounds"]  # the failed attempt and its retry both wrote
    for key in ("valid/ndcg_at_10", "system/clients"):
        steps = [m.step for m in store["client"].get_metric_history(summary["run_id"], key)]
        assert steps == list(range(1, TINY["rounds"] + 1)), key


def test_a_run_resumed_after_its_checkpoint_failed_does_not_log_again_the_step_it_had_logged(
    store, monkeypatch
):
    """A server step that logged step 2 but never wrote the checkpoint after step 3 fails the
    run; the resumed run starts after step 2's checkpoint, evaluates that state again, and
    leaves its metrics as the stopped run logged them."""
    from flows.training import federated_training

    with monkeypatch.context() as patch:
        # the checkpoint after step 3 fails, in every attempt of its task
        _failing_checkpoints(patch, lambda n: n >= 3, "the disk is full")
        with pytest.raises(OSError, match="the disk is full"):
            federated_training(**_config(store, "neural", model_name="stopped-ckpt").model_dump())
    run_id = _stopped_run(store, "stopped-ckpt")
    logged = store["client"].get_metric_history(run_id, "valid/ndcg_at_10")
    assert [m.step for m in logged] == [1, 2]

    federated_training(**_config(store, "neural", resume=run_id).model_dump())

    history = store["client"].get_metric_history(run_id, "valid/ndcg_at_10")
    assert [m.step for m in history] == list(range(1, TINY["rounds"] + 1))
    assert [(m.timestamp, m.value) for m in history[:2]] == [(m.timestamp, m.value) for m in logged]
