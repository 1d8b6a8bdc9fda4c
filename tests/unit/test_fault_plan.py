"""The fault-injection plan: what it draws, outside a flow (``sleep`` recorded, not slept)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import tasks.faults
from tasks.faults import FaultPlan, InjectedFault


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    """The plan's sleeps, recorded: the module's own ``time`` is replaced, not ``time.sleep``,
    which every thread of the test process (Prefect's, MLflow's) calls too."""
    calls: list[float] = []
    monkeypatch.setattr(tasks.faults, "time", SimpleNamespace(sleep=calls.append))
    return calls


def _outcomes(plan: FaultPlan, draws: int = 2000) -> list[bool]:
    failed = []
    for round_ in range(draws):
        try:
            plan.inject(client_id=3, round_=round_)
        except InjectedFault:
            failed.append(True)
        else:
            failed.append(False)
    return failed


def test_a_plan_with_no_fault_is_inactive_and_draws_nothing(slept) -> None:
    plan = FaultPlan()
    assert not plan.active
    assert _outcomes(plan, 50) == [False] * 50
    assert slept == []


@pytest.mark.parametrize("mean", [0.2, 3.0])
def test_delays_are_exponential_with_the_planned_mean_below_a_second_too(slept, mean) -> None:
    assert _outcomes(FaultPlan(delay=mean, seed=1), 2000) == [False] * 2000
    assert len(slept) == 2000 and min(slept) >= 0
    # exponential: the standard deviation is the mean; 2000 draws put the mean within 10%
    assert np.mean(slept) == pytest.approx(mean, rel=0.1)
    assert np.std(slept) == pytest.approx(mean, rel=0.15)


def test_failures_come_at_the_planned_rate_and_always_for_a_listed_client(slept) -> None:
    failed = _outcomes(FaultPlan(probability=0.3, seed=2))
    assert np.mean(failed) == pytest.approx(0.3, abs=0.03)  # 2000 draws: sd 0.010
    assert slept == []  # no delay planned: no sleep
    assert all(_outcomes(FaultPlan(clients=(3,)), 20))
    assert not any(_outcomes(FaultPlan(clients=(4,), probability=0.0, delay=0.0, seed=5), 20))


def test_draws_are_seeded_and_a_new_attempt_draws_afresh(slept) -> None:
    plan = FaultPlan(probability=0.5, seed=9)
    first = _outcomes(plan, 200)
    assert _outcomes(FaultPlan(probability=0.5, seed=9), 200) == first  # reproducible
    assert _outcomes(plan.for_attempt(1), 200) != first  # a round asked again
    assert _outcomes(FaultPlan(probability=0.5, seed=10), 200) != first  # another run
