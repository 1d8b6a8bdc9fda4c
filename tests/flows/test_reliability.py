"""Failing, late and missing clients in a real flow: retries, quorum, round retries, aborts that
leave nothing behind."""

from __future__ import annotations

import time

import pytest
from prefect import flow, task

from fedrec.config import TrainingConfig
from tests.flows.helpers import tracking_store

SMALL = {"synthetic_users": 300, "synthetic_items": 150, "synthetic_interactions": 9_000,
         "clients": 3, "factors": 4, "rounds": 2, "retry_backoff": 0.0}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-reliability")) as store:
        yield store


def _train(store, **fields):
    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], model_name="reliable", **(SMALL | fields))
    return federated_training(**config.model_dump())


def test_a_client_that_is_down_is_left_out_and_the_round_goes_on(store):
    summary = _train(store, fault_clients=(1,), task_retries=1, min_clients=2)

    client = store["client"]
    answered = [m.value for m in client.get_metric_history(summary["run_id"], "clients")]
    assert answered == [2.0, 2.0]  # every round ran on the two clients that answered
    assert summary["model_version"] == "1" and summary["promoted"]


def test_a_round_short_of_its_quorum_aborts_and_leaves_the_registry_alone(store):
    from flows.rounds import QuorumError

    client = store["client"]
    before = client.get_model_version_by_alias("reliable", "champion").version

    with pytest.raises(QuorumError, match=r"round 1: 1 of 3 clients answered, the quorum is 2"):
        _train(store, fault_clients=(0, 2), task_retries=0, round_retries=1, min_clients=2, seed=9)

    assert len(client.search_model_versions("name='reliable'")) == 1
    assert client.get_model_version_by_alias("reliable", "champion").version == before
    failed = client.search_runs(
        [client.get_experiment_by_name("fedrec").experiment_id], "attributes.status = 'FAILED'"
    )
    assert len(failed) == 1


def test_flaky_clients_succeed_on_retries_with_a_fresh_draw_per_attempt(store):
    # Each task attempt fails with probability 0.5; with retries and round retries every client
    # gets through, so every round aggregates all three.
    summary = _train(store, fault_probability=0.5, task_retries=3, round_retries=2,
                     min_fraction=1.0, seed=3, skip_if_unchanged=False)  # fmt: skip

    answered = [m.value for m in store["client"].get_metric_history(summary["run_id"], "clients")]
    assert answered == [3.0, 3.0]


@task(retries=0)
def _slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_stragglers_past_the_round_deadline_are_left_out(prefect_server, caplog):
    from flows.rounds import answered

    @flow
    def one_round() -> tuple[dict, float]:
        started = time.perf_counter()
        futures = {i: _slow.submit(s) for i, s in enumerate((0.0, 0.0, 3.0))}
        return answered(futures, "round 1", timeout=1.0), time.perf_counter() - started

    result, waited = one_round()

    assert result == {0: 0.0, 1: 0.0}
    assert waited < 2.5  # the round went on without waiting for the straggler's 3 s
    assert any("round 1: 2 did not answer within 1.0 s" in r.getMessage() for r in caplog.records)
