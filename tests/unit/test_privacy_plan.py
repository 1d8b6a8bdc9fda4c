"""The delta a private run calibrates its noise at: the one asked for, else 1 / users in
simulation, else over real sites the delta each site counts a run at (a public number: 1 / users
would tell every reader the sites' user count), and 1 / users when that is smaller."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedrec.config import TrainingConfig
from flows.rounds import RunContext, privacy_plan
from models.data.partitions import ClientEntry, Manifest
from models.sites.budget import SITE_RUN_DELTA


def _plan(monkeypatch, users: int, sites: object, **config) -> float:
    monkeypatch.setattr("flows.rounds.get_run_logger", lambda: logging.getLogger("test"))
    entries = [ClientEntry(i, f"client-{i}", users // 2, None, None, None) for i in range(2)]
    ctx = RunContext(
        TrainingConfig(dp_epsilon=8.0, rounds=5, **config),
        "sqlite:///unused.db",
        "run",
        "workspace",
        Manifest("f", "sites:sites.yaml", 10, users, (1.0, 5.0), entries),
        np.arange(10),
        None,
        sites=sites,
    )
    plan = privacy_plan(ctx)
    assert plan is not None
    return plan.delta


@pytest.mark.parametrize(
    ("users", "sites", "config", "delta"),
    [
        (1000, None, {}, 1e-3),  # simulated: 1 / users
        (1000, object(), {}, SITE_RUN_DELTA),  # over sites: the sites' public delta
        (10**8, object(), {}, 1e-8),  # ... unless 1 / users is smaller
        (1000, None, {"dp_delta": 1e-5}, 1e-5),  # asked for: taken, in simulation
        (1000, object(), {"dp_delta": 1e-5}, 1e-5),  # and over sites
    ],
)
def test_the_delta_a_private_run_calibrates_at(monkeypatch, users, sites, config, delta):
    assert _plan(monkeypatch, users, sites, **config) == pytest.approx(delta, rel=1e-12)
