"""What the training flow's module gives its callers without running it: the flow on the
asked-for task runner, and a run's final state message (its outcome in one line of at most 500
characters, which is what whoever polls the Prefect API reads)."""

from __future__ import annotations

import os

from flows.training import federated_training, outcome, training_flow


def _skipped(reason: str) -> dict:
    return {"skipped": True, "reason": reason, "model_name": "m"}


def test_an_outcome_names_the_version_and_the_verdict_with_its_reason():
    summary = {"model_name": "m", "model_version": "3", "promoted": False, "reason": "r"}
    assert outcome(summary) == "model m version 3: not promoted (r)"
    assert outcome(summary | {"promoted": True}) == "model m version 3: promoted to champion (r)"
    assert outcome(_skipped("nothing to train")) == "nothing to train (model m)"


def test_an_outcome_of_500_characters_is_whole_and_a_longer_one_ends_in_an_ellipsis():
    whole = "x" * (500 - len(" (model m)"))
    assert outcome(_skipped(whole)) == f"{whole} (model m)"  # exactly 500
    longer = outcome(_skipped(whole + "y"))  # 501
    assert longer == f"{whole}y (model m)"[:497] + "..." and len(longer) == 500


def test_the_thread_runner_takes_the_asked_for_workers_and_defaults_to_the_flows_own():
    assert training_flow() is federated_training
    assert training_flow("thread", max_workers=None) is federated_training
    assert training_flow("thread", max_workers=3).task_runner._max_workers == 3
    # by default one client task per core, up to 8 (a small machine still runs them in parallel)
    cores = os.cpu_count() or 1
    assert federated_training.task_runner._max_workers == min(8, cores)
    if cores > 1:
        assert federated_training.task_runner._max_workers > 1


def test_the_dask_runner_starts_single_threaded_worker_processes_or_joins_a_scheduler():
    from prefect_dask import DaskTaskRunner

    local = training_flow("dask").task_runner
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                    "dashboard_address": None}  # fmt: skip
    assert training_flow("dask", max_workers=3).task_runner.cluster_kwargs["n_workers"] == 3
    joined = training_flow("dask", dask_address="tcp://127.0.0.1:8786").task_runner
    assert joined.address == "tcp://127.0.0.1:8786"
