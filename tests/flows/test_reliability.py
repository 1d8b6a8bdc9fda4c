"""Failing, late and missing clients in a real flow: retries, quorum, round retries, aborts that
leave nothing behind."""

from __future__ import annotations

import threading

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
            result = answered(futures, "round 1", timeout=5.0)
            # the straggler cannot have answered yet: it is held until after the round went on
            return result, futures[2].wrapped_future.done()
        finally:
            _RELEASE.set()

    result, straggler_done = one_round()

    assert result == {0: 0, 1: 1} and not straggler_done
    assert any("round 1: 2 did not answer within 5.0 s" in r.getMessage() for r in caplog.records)
