"""Scale on real flows: every user a client (cohorts of 1 and of 500 give the same model), and the
Dask task runner on a 2-process local cluster gives the thread runner's model."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import flow_task_runs, tracking_store

TINY = {"synthetic_users": 80, "synthetic_items": 40, "synthetic_interactions": 1_200,
        "factors": 3, "rounds": 2, "skip_if_unchanged": False}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-scale")) as store:
        yield store


def _run(store, task_runner: str = "thread", **fields) -> dict:
    from flows.training import training_flow

    config = TrainingConfig(tracking_uri=store["uri"], task_runner=task_runner, **(TINY | fields))
    return training_flow(config.task_runner, config.dask_address)(**config.model_dump())


def _served(store, name: str):
    mlflow.set_tracking_uri(store["uri"])
    # the version just registered, promoted or not (tiny models may lose to the trivial baseline)
    return mlflow.pyfunc.load_model(f"models:/{name}/latest").unwrap_python_model().recommender


def _metric(store, run_id: str, key: str) -> list[float]:
    return [m.value for m in store["client"].get_metric_history(run_id, key)]


def test_per_user_clients_give_the_same_model_in_cohorts_of_1_and_500(store):
    per_user = {"partition": "per-user", "client_fraction": 0.5}
    runs = {size: _run(store, model_name=f"per-user-{size}", cohort_size=size, **per_user)
            for size in (1, 500)}  # fmt: skip
    one, five_hundred = (_served(store, f"per-user-{size}") for size in (1, 500))
    np.testing.assert_allclose(one.params.factors, five_hundred.params.factors, atol=1e-9)
    np.testing.assert_allclose(one.params.bias, five_hundred.params.bias, atol=1e-9)
    clients = [_metric(store, runs[s]["run_id"], "system/clients") for s in (1, 500)]
    assert clients[0] == clients[1] and all(20 < c < 60 for c in clients[0])  # ~half of 80 users
    assert _metric(store, runs[1]["run_id"], "system/client_tasks") == [80.0, 80.0]
    assert _metric(store, runs[500]["run_id"], "system/client_tasks") == [1.0, 1.0]


def test_the_dask_runner_on_two_worker_processes_gives_the_thread_runners_model(
    store, tmp_path, monkeypatch
):
    import os

    import dask

    from tests.flows.dask_probe import PROBE_DIR, finished_tasks

    monkeypatch.setenv(PROBE_DIR, str(tmp_path))  # the workers' record of what they ran
    before = os.environ.get("PREFECT_API_URL")
    try:
        with dask.config.set({"distributed.worker.preload": ["tests.flows.dask_probe"]}):
            dask_run = _run(store, "dask", model_name="on-dask", clients=3)
    finally:  # the local cluster points its workers at this session's API
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
    _run(store, model_name="on-threads", clients=3)
    np.testing.assert_allclose(
        _served(store, "on-dask").params.factors, _served(store, "on-threads").params.factors,
        atol=1e-10,
    )  # fmt: skip
    assert dask_run["metrics"]["system/clients"] == 3.0
    # the client tasks ran in the cluster's worker processes, not in this process's threads:
    # 3 clients x 2 rounds trained there (plus evaluations), in processes other than this one
    ran = finished_tasks(tmp_path)
    assert ran and os.getpid() not in ran and len(ran) <= 2, ran
    assert sum(len(keys) for keys in ran.values()) >= 3 * TINY["rounds"], ran


def test_eval_every_skips_evaluation_between_rounds_but_not_after_the_last(store):
    run = _run(store, model_name="sparse-eval", rounds=7, eval_every=3, clients=3)
    history = store["client"].get_metric_history(run["run_id"], "valid/rmse")
    assert sorted(m.step for m in history) == [3, 6, 7]
    seconds = store["client"].get_metric_history(run["run_id"], "system/round_seconds")
    assert sorted(m.step for m in seconds) == list(range(1, 8))  # every round is still logged


def test_clients_that_sit_a_round_out_evaluate_the_model_of_the_round_before(store):
    """Their task runs are named after the step whose model they evaluate (the Prefect UI's
    round), and only clients that did not train in that round run one."""
    import re

    run = _run(store, model_name="half-sampled", rounds=3, clients=4, client_fraction=0.5)
    names = {t.name for t in flow_task_runs(store, run["run_id"])}
    sat_out = [tuple(map(int, m.groups())) for n in names
               if (m := re.fullmatch(r"evaluate client-(\d+) round-(\d+)", n))]  # fmt: skip
    # steps 1 and 2 are evaluated in rounds 2 and 3 by the two clients not sampled there; the
    # last step by every client after the rounds
    assert sorted(step for _, step in sat_out) == [1, 1, 2, 2], sorted(names)
    for client, step in sat_out:
        assert f"train client-{client} round-{step + 1}" not in names
    assert {f"evaluate round-3 client-{c}" for c in range(4)} <= names
