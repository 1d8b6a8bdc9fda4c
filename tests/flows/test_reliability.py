"""Failing, late and missing clients in a real flow: retries, quorum, round retries, aborts that
leave nothing behind."""

from __future__ import annotations

import logging
import re
import threading

import pytest
from prefect import flow, task

from fedrec.config import TrainingConfig
from tests.flows.helpers import flow_log, messages, tracking_store

SMALL = {"synthetic_users": 300, "synthetic_items": 150, "synthetic_interactions": 9_000,
         "clients": 3, "factors": 4, "rounds": 2, "retry_backoff": 0.0}  # fmt: skip


def test_a_client_tasks_retries_wait_twice_as_long_each_time_from_retry_backoff():
    from flows.rounds import retry_options

    three = TrainingConfig(task_retries=3, retry_backoff=1.5)
    assert retry_options(three) == {"retries": 3, "retry_delay_seconds": [1.5, 3.0, 6.0]}
    assert retry_options(TrainingConfig(task_retries=0)) == {"retries": 0, "retry_delay_seconds": 0}


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-reliability")) as store:
        yield store


def _train(store, **fields):
    from flows.training import federated_training

    config = TrainingConfig(
        **({"tracking_uri": store["uri"], "model_name": "reliable"} | SMALL | fields)
    )
    return federated_training(**config.model_dump())


# The module's tests share one store and may run in any order (the mutation runner's is fastest
# first): each that counts versions or expects a promotion uses a model name of its own.
def test_a_client_that_is_down_is_left_out_and_the_round_goes_on(store):
    summary = _train(store, model_name="down", fault_clients=(1,), task_retries=1, min_clients=2)

    client = store["client"]
    answered = [m.value for m in client.get_metric_history(summary["run_id"], "system/clients")]
    assert answered == [2.0, 2.0]  # every round ran on the two clients that answered
    assert summary["model_version"] == "1" and summary["promoted"]


def test_a_round_short_of_its_quorum_aborts_and_leaves_the_registry_alone(store):
    from flows.rounds import QuorumError

    client = store["client"]
    _train(store, model_name="short", seed=8)  # a champion to leave alone
    before = client.get_model_version_by_alias("short", "champion").version
    experiment = client.get_experiment_by_name("fedrec").experiment_id
    failed_before = client.search_runs([experiment], "attributes.status = 'FAILED'")

    # the one line says why too: the first client that did not answer, and how many more
    short = r"round 1: 1 of 3 clients answered, the quorum is 2 \(.*\); train client-0: "
    with (
        flow_log(logging.WARNING) as records,
        pytest.raises(QuorumError, match=short + r"InjectedFault: .*\(and 1 more\)$"),
    ):
        _train(store, model_name="short", fault_clients=(0, 2), task_retries=0, round_retries=1,
               min_clients=2, seed=9)  # fmt: skip
    asked_again = "round 1: 1 of 3 clients answered, quorum 2: asking 2 again"
    assert messages(records).count(asked_again) == 1  # round_retries=1: one more attempt
    failures = [m for m in messages(records) if m.startswith("round 1: train client-0 failed")]
    assert len(failures) == 2, failures  # the first attempt and the one more, then the abort

    assert len(client.search_model_versions("name='short'")) == 1
    assert client.get_model_version_by_alias("short", "champion").version == before
    failed = client.search_runs([experiment], "attributes.status = 'FAILED'")
    assert len(failed) == len(failed_before) + 1


def test_flaky_clients_succeed_on_retries_with_a_fresh_draw_per_attempt(store):
    # Each task attempt fails with probability 0.5; with retries and round retries every client
    # gets through, so every round aggregates all three.
    summary = _train(store, fault_probability=0.5, task_retries=3, round_retries=2,
                     min_fraction=1.0, seed=3, skip_if_unchanged=False)  # fmt: skip

    answered = [
        m.value for m in store["client"].get_metric_history(summary["run_id"], "system/clients")
    ]
    assert answered == [3.0, 3.0]


def test_a_round_short_of_its_quorum_asks_the_clients_that_did_not_answer_again(store):
    # No task retries: a client task that fails is left out of its attempt of the round. At
    # this seed the first attempts of client-0 in the mean round and rounds 1 and 2, and of
    # client-1 in round 2, fail (tasks.faults' draws), and each of their second attempts
    # succeeds: the round's second attempt must ask those clients, not the ones that answered.
    with flow_log(logging.WARNING) as records:
        summary = _train(store, model_name="round-retries", fault_probability=0.3,
                         task_retries=0, round_retries=1, min_fraction=1.0, seed=3)  # fmt: skip

    again = [m for m in messages(records) if re.search(r"quorum 3: asking \d+ again$", m)]
    assert again, messages(records)  # the round retry was needed
    answered = [
        m.value for m in store["client"].get_metric_history(summary["run_id"], "system/clients")
    ]
    assert answered == [3.0, 3.0]


_RELEASE = threading.Event()  # the straggler answers only once the round has gone on


@task(retries=0)
def _client(i: int, straggle: bool) -> int:
    if straggle and not _RELEASE.wait(timeout=120):
        raise TimeoutError("never released")
    return i


def test_stragglers_past_the_round_deadline_are_left_out(prefect_server, caplog):
    from flows.rounds import answered

    @flow
    def one_round() -> tuple[dict, bool]:
        _RELEASE.clear()
        futures = {i: _client.submit(i, i == 2) for i in range(3)}
        try:
            result = answered(futures, "round 1", timeout=10.0)
            # the straggler cannot have answered yet: it is held until after the round went on
            return result, futures[2].wrapped_future.done()
        finally:
            _RELEASE.set()

    result, straggler_done = one_round()

    assert result == {0: 0, 1: 1} and not straggler_done
    assert any(
        "round 1: client-2 did not answer within 10.0 s" in r.getMessage() for r in caplog.records
    )


def _hook_client_tasks(monkeypatch, hook) -> None:
    """Call ``hook(task run name)`` at the start of every client task (``tasks.clients``), in
    this process: the thread runner's tasks run here, so the hook sees every one of them."""
    import functools

    from prefect import Task
    from prefect.runtime import task_run

    import tasks.clients as clients

    def wrapped(original):
        @functools.wraps(original)
        def spy(*args, **kwargs):
            hook(task_run.name)
            return original(*args, **kwargs)

        return spy

    for obj in vars(clients).values():
        if isinstance(obj, Task):
            monkeypatch.setattr(obj, "fn", wrapped(obj.fn))


def test_the_round_timeout_leaves_a_straggler_out_of_the_real_flow(store, monkeypatch):
    """--round-timeout in the flow: in each round one client answers only after the next round
    (or the final evaluation) has started, so every round goes on at its deadline with the other
    three, and the late answer is never used."""
    from flows.training import training_flow

    released = {r: threading.Event() for r in (1, 2)}

    def hold_one_client_per_round(name: str) -> None:
        if name in ("train client-1 round-1", "train client-2 round-2"):
            released[int(name[-1])].wait(timeout=120)
        elif name.startswith("train ") and name.endswith(" round-2"):
            released[1].set()  # round 2 has started: round 1's straggler may answer, too late
        elif name.startswith("evaluate "):
            released[2].set()

    _hook_client_tasks(monkeypatch, hold_one_client_per_round)
    config = TrainingConfig(tracking_uri=store["uri"], model_name="deadline",
                            **(SMALL | {"clients": 4, "round_timeout": 15.0, "task_retries": 0,
                                        "round_retries": 0, "min_clients": 1, "min_fraction": 0.0}))  # fmt: skip
    try:  # six threads, so the held tasks do not starve the others
        summary = training_flow("thread", None, 6)(**config.model_dump())
    finally:
        for event in released.values():
            event.set()

    answered = [
        m.value for m in store["client"].get_metric_history(summary["run_id"], "system/clients")
    ]
    assert answered == [3.0, 3.0]  # each round without its straggler
    assert summary["model_version"] is not None


def test_a_round_timeout_keeps_every_prompt_answer(store):
    """With a deadline no client comes near, every client's answer counts in every round."""
    summary = _train(store, model_name="prompt", clients=6, round_timeout=120.0, task_retries=0,
                     round_retries=0, min_clients=1, min_fraction=0.0, seed=31)  # fmt: skip

    answered = [
        m.value for m in store["client"].get_metric_history(summary["run_id"], "system/clients")
    ]
    assert answered == [6.0, 6.0]


@pytest.mark.slow
def test_robust_rules_resist_an_attack_through_the_flow_where_the_mean_does_not(store):
    """Two of six FedAvg clients send their update flipped and scaled by 20: the mean is pulled
    far off, the coordinate-wise median and the screened mean stay near the clean run. One round: a second would
    train on the mean's wrecked model until its arithmetic overflows."""
    runs = {
        name: _train(store, model_name=f"robust-{name}", algorithm="fedavg", clients=6, rounds=1,
                     skip_if_unchanged=False, **fields)
        for name, fields in {
            "clean": {},
            "attacked-mean": {"attack": "sign_flip", "attack_fraction": 1 / 3, "attack_scale": 20.0},
            "attacked-median": {"attack": "sign_flip", "attack_fraction": 1 / 3, "attack_scale": 20.0,
                                "aggregation": "median"},
            "attacked-screened": {"attack": "sign_flip", "attack_fraction": 1 / 3, "attack_scale": 20.0,
                                  "aggregation": "screened_mean", "trim": 1 / 3},
        }.items()
    }  # fmt: skip
    rmse = {name: run["metrics"]["valid/rmse"] for name, run in runs.items()}
    params = store["client"].get_run(runs["attacked-median"]["run_id"]).data.params
    assert params["attack"] == "sign_flip" and params["aggregation"] == "median"

    assert runs["clean"]["promoted"] is True
    assert not any(run["promoted"] for name, run in runs.items() if name != "clean")
    assert rmse["attacked-mean"] > rmse["clean"] + 0.3, rmse
    assert rmse["attacked-median"] < rmse["clean"] * 1.1, rmse
    assert rmse["attacked-screened"] < rmse["clean"] * 1.1, rmse


def test_a_model_trained_under_a_simulated_attack_is_registered_but_never_promoted(store):
    """A simulated attack poisons the model on purpose (for tests and benchmarks): run with the
    production model's name, it became champion with nothing in the registry to say so."""
    summary = _train(store, model_name="attacked-alone", algorithm="fedavg", clients=3,
                     rounds=1, attack="scale", attack_fraction=1 / 3, attack_scale=3.0)  # fmt: skip

    assert summary["promoted"] is False
    assert summary["reason"].startswith("no champion yet")
    assert summary["reason"].endswith(
        ", but it was trained under a simulated attack (scale by 33% of the clients, strength "
        "3): registered for inspection, never promoted"
    )
    client = store["client"]
    version = client.get_model_version("attacked-alone", summary["model_version"])
    assert version.tags["fedrec.simulated_attack"] == "scale by 33% of the clients, strength 3"
    assert "not private; under a simulated attack (scale by 33%" in version.description
    assert not client.get_registered_model("attacked-alone").aliases


def test_a_candidate_whose_evaluation_failed_is_not_promoted(store, monkeypatch):
    """Every client's evaluation of the final model fails: the candidate is registered without
    validation metrics, is not promoted, and the champion stays."""
    client = store["client"]
    first = _train(store, model_name="unevaluated", seed=21)
    assert first["promoted"]

    final = re.compile(rf"^evaluate\b(?!.*champion).*\bround-{SMALL['rounds']}\b")

    def fail_final_evaluation(name: str) -> None:
        if final.search(name):  # the final model's evaluation tasks, not the champion's
            raise RuntimeError(f"{name}: evaluation failed on purpose")

    _hook_client_tasks(monkeypatch, fail_final_evaluation)
    summary = _train(store, model_name="unevaluated", seed=22, task_retries=0)

    assert summary["promoted"] is False
    assert summary["reason"] == "candidate has no valid/rmse: evaluation failed or was empty"
    assert "valid/rmse" not in summary["metrics"]
    champion = client.get_model_version_by_alias("unevaluated", "champion")
    assert str(champion.version) == first["model_version"]
    tags = client.get_model_version("unevaluated", summary["model_version"]).tags
    assert tags["fedrec.promoted"] == "false"
