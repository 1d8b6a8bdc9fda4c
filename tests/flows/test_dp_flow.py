"""User-level DP through the flow when not every user trains every round: sampling
(``client_fraction`` < 1) and per-user clients in cohorts. Under DP every partition trains and
each user flips its own coin (Poisson sampling the server never sees), so the privacy spent per
step must be the accountant's for that sampling rate, and sampling must buy less noise for the
same epsilon."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from fedrec.config import TrainingConfig
from models.privacy.dp import epsilon
from tests.flows.helpers import tracking_store

# the runs below train the same users: the ledger's caps (epsilon, delta) fit them all
SMALL = {"synthetic_users": 400, "synthetic_items": 120, "synthetic_interactions": 12_000,
         "factors": 3, "rounds": 3, "skip_if_unchanged": False, "dp_budget": 100.0,
         "dp_budget_delta": 0.5}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-dp")) as store:
        yield store


def _run(store, **fields) -> dict:
    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | fields))
    return federated_training(**config.model_dump())


def _history(store, run_id: str, key: str) -> list[float]:
    return [m.value for m in store["client"].get_metric_history(run_id, key)]


def _check_spent(store, run_id: str, target: float, sampling_rate: float) -> float:
    """Each step's epsilon is the accountant's for the logged noise and the sampling rate, the
    last one with the final evaluation's release (no champion: one, at 4x the training's noise),
    and the last one uses the budget."""
    sigma = _history(store, run_id, "privacy/noise_multiplier")[-1]
    delta = _history(store, run_id, "privacy/delta")[-1]
    spent = _history(store, run_id, "privacy/epsilon")
    assert len(spent) == SMALL["rounds"]
    for step, value in enumerate(spent, start=1):
        extra = (4.0 * sigma,) if step == SMALL["rounds"] else ()
        expected = epsilon(sigma, sampling_rate, step, delta, extra=extra)
        assert value == pytest.approx(expected, rel=1e-9)
    assert 0.95 * target < spent[-1] <= target + 1e-9
    return sigma


def test_dp_with_client_sampling_spends_the_budget_with_less_noise(store):
    full = _run(store, model_name="dp-all", clients=4, dp_epsilon=8.0)
    sampled = _run(store, model_name="dp-half", clients=4, client_fraction=0.5, dp_epsilon=8.0)

    sigma_full = _check_spent(store, full["run_id"], 8.0, 1.0)
    sigma_sampled = _check_spent(store, sampled["run_id"], 8.0, 0.5)
    assert sigma_sampled < sigma_full  # sampling amplifies privacy: less noise for the same epsilon
    # every partition answers; which of their users took part stays on the clients
    for run in (full, sampled):
        assert _history(store, run["run_id"], "system/clients") == [4.0] * SMALL["rounds"]


def test_dp_with_per_user_clients_in_cohorts(store):
    summary = _run(store, model_name="dp-per-user", partition="per-user", cohort_size=100,
                   client_fraction=0.3, dp_epsilon=4.0)  # fmt: skip

    _check_spent(store, summary["run_id"], 4.0, 0.3)
    assert _history(store, summary["run_id"], "privacy/delta")[-1] == pytest.approx(1 / 400)
    # the four cohorts of 100 answered every round; how many of their users flipped heads on
    # their 30% coin is not reported to the server under DP
    assert _history(store, summary["run_id"], "system/clients") == [4.0] * SMALL["rounds"]
    mlflow.set_tracking_uri(store["uri"])
    # the registered version, promoted or not: at 400 users the noisy evaluation release decides
    # the baseline gate by chance
    version_uri = f"models:/dp-per-user/{summary['model_version']}"
    model = mlflow.pyfunc.load_model(version_uri).unwrap_python_model()
    assert np.isfinite(model.recommender.params.factors).all()
    version = store["client"].get_model_version("dp-per-user", summary["model_version"])
    assert version.tags["fedrec.epsilon"] == "4.0"
    assert "; epsilon 4; " in version.description
