"""User-level DP through the flow when not every user trains every round: sampling
(``client_fraction`` < 1) and per-user clients in cohorts. Under DP every partition trains and
each user flips its own coin (Poisson sampling the server never sees), so the privacy spent per
step must be the accountant's for that sampling rate, and sampling must buy less noise for the
same epsilon."""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pandas as pd
import pytest

from fedrec.config import TrainingConfig
from models.data.partitions import read_item_ids
from models.privacy.dp import UserLevelDP, epsilon
from tests.flows.helpers import (
    censored_noise_ratio,
    final_checkpoint,
    flow_log,
    summed_answers,
    tracking_store,
    unpacked,
    workspace_clients,
)

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

    from flows.training import USER_COUNT

    # the default delta is 1 / users: its figures give the user count, which the run says
    assert full["dp_not_covered"] == USER_COUNT  # the synthetic data has a public item list
    assert store["client"].get_run(full["run_id"]).data.metrics["privacy/delta"] == pytest.approx(
        1 / SMALL["synthetic_users"]
    )
    sigma_full = _check_spent(store, full["run_id"], 8.0, 1.0)
    sigma_sampled = _check_spent(store, sampled["run_id"], 8.0, 0.5)
    assert sigma_sampled < sigma_full  # sampling amplifies privacy: less noise for the same epsilon
    # every partition answers; which of their users took part stays on the clients
    for run in (full, sampled):
        assert _history(store, run["run_id"], "system/clients") == [4.0] * SMALL["rounds"]


def test_a_weak_epsilon_is_warned_of_and_a_usual_one_is_not(store, caplog):
    warned = "is a weak guarantee: one user's data may change the odds"
    _run(store, model_name="dp-usual", clients=2, rounds=1, dp_epsilon=8.0)
    assert not any(warned in r.getMessage() for r in caplog.records)
    caplog.clear()
    _run(store, model_name="dp-weak", clients=2, rounds=1, dp_epsilon=12.0)
    said = [r for r in caplog.records if warned in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"
    assert said[0].getMessage().startswith("epsilon 12 is a weak guarantee")


def _expected_answers(state: dict, items: np.ndarray, ratings: np.ndarray, reg: float, k: int):
    """A user's top ``k`` unseen items and their raw scores, by hand from the item parameters
    ``state`` and the user's history: the user's factors and bias are the ridge regression
    (``reg`` per history row on every coordinate) of ``r - mu - b_i`` on ``[q_i, 1]``."""
    q, b, mu = state["factors"], state["bias"], float(state["global_mean"])
    x = np.column_stack([q[items], np.ones(items.size)])
    solution = np.linalg.solve(
        x.T @ x + reg * items.size * np.eye(x.shape[1]), x.T @ (ratings - mu - b[items])
    )
    scores = mu + solution[-1] + b + q @ solution[:-1]
    scores[items] = -np.inf
    best = np.argsort(-scores, kind="stable")[:k]
    return best, scores[best]


def test_dp_with_per_user_clients_in_cohorts(store):
    fields = {"model_name": "dp-per-user", "partition": "per-user", "cohort_size": 100,
              "client_fraction": 0.3, "dp_epsilon": 4.0, "keep_workspace": True}  # fmt: skip
    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | fields))
    summary = _run(store, **fields)

    sigma = _check_spent(store, summary["run_id"], 4.0, 0.3)
    assert _history(store, summary["run_id"], "privacy/delta")[-1] == pytest.approx(1 / 400)
    # the four cohorts of 100 answered every round; how many of their users flipped heads on
    # their 30% coin is not reported to the server under DP
    assert _history(store, summary["run_id"], "system/clients") == [4.0] * SMALL["rounds"]
    mlflow.set_tracking_uri(store["uri"])
    version = store["client"].get_model_version("dp-per-user", summary["model_version"])
    assert version.run_id == summary["run_id"]
    assert version.tags["fedrec.epsilon"] == "4.0"
    assert "; epsilon 4; " in version.description
    # the registered version, promoted or not: at 400 users the baseline gate reads noisy
    # figures (it refuses only a shortfall beyond their noise)
    loaded = mlflow.pyfunc.load_model(f"models:/dp-per-user/{summary['model_version']}")
    served = loaded.unwrap_python_model().recommender

    # what is served is the run's state after its last step, as its checkpoint holds it
    workspace = summary["workspace"]
    state = final_checkpoint(workspace, SMALL["rounds"])
    np.testing.assert_array_equal(served.params.factors, state["factors"])
    np.testing.assert_array_equal(served.params.bias, state["bias"])
    assert served.params.global_mean == float(state["global_mean"])
    np.testing.assert_array_equal(served.popularity, state["popularity"])
    item_ids = read_item_ids(workspace).astype(str)
    np.testing.assert_array_equal(served.item_ids, item_ids)

    # the pyfunc answers three users from those parameters and their training rows, as numpy
    # computes it by hand
    clients = workspace_clients(workspace)
    rows = clients[0].rows("train")
    users = np.unique(rows.users)[:3]
    mine = [rows.users == u for u in users]
    requests = pd.DataFrame({
        "user_id": [str(clients[0].user_ids[u]) for u in users],
        "history_items": [list(item_ids[rows.items[m]]) for m in mine],
        "history_ratings": [list(rows.ratings[m]) for m in mine],
    })  # fmt: skip
    answers = loaded.predict(requests, params={"k": 5})
    reg = config.mf_config().reg
    for user, m in zip(requests["user_id"], mine, strict=True):
        got = answers[answers["user_id"] == user].sort_values("rank")
        best, scores = _expected_answers(state, rows.items[m], rows.ratings[m], reg, 5)
        assert list(got["item_id"]) == list(item_ids[best])
        expected = np.clip(scores, *served.rating_scale)
        np.testing.assert_allclose(got["score"].astype(float), expected, rtol=1e-9)

    # the popularity of the cold-start list is the last round's noisy counts: each item's
    # count over the users whose coin came up (its mean: 30% of the users' weights, its
    # sampling variance 0.3 x 0.7 of their squares), plus each cohort's noise of the logged
    # multiplier times one user's sensitivity, floored at 0
    dp = UserLevelDP(sigma, config.dp_max_items)
    weights = np.zeros(len(item_ids))
    squares = np.zeros(len(item_ids))
    for client in clients:
        train = client.rows("train")
        w = np.minimum(1.0, np.sqrt(config.dp_max_items / np.bincount(train.users)))[train.users]
        weights += np.bincount(train.items, weights=w, minlength=len(item_ids))
        squares += np.bincount(train.items, weights=w**2, minlength=len(item_ids))
    q = config.client_fraction
    # and it is the sum of the cohorts' last answers, from which the served factors are solved
    # by hand: each item's summed noisy Gram projected onto the PSD cone, a ridge of reg per
    # noisy count plus 3 noise deviations x sqrt(k), zero factors below 4 deviations of count
    answers = summed_answers(workspace, "train", SMALL["rounds"])
    np.testing.assert_allclose(served.popularity, np.maximum(answers["counts"], 0.0), rtol=1e-12)
    deviation, k = sigma * dp.factor_sensitivity, SMALL["factors"]
    values, vectors = np.linalg.eigh(unpacked(answers["gram"], k))
    grams = (vectors * np.maximum(values, 0.0)[:, None, :]) @ np.swapaxes(vectors, 1, 2)
    ridge = reg * np.maximum(answers["counts"], 0.0) + 3.0 * deviation * np.sqrt(k)
    solved = np.linalg.solve(grams + ridge[:, None, None] * np.eye(k), answers["rhs"][..., None])
    factors = np.where((answers["counts"] >= 4.0 * deviation)[:, None], solved[..., 0], 0.0)
    np.testing.assert_allclose(served.params.factors, factors, rtol=1e-9, atol=1e-12)
    assert np.abs(factors).sum(axis=1).astype(bool).any()
    noise = len(clients) * (sigma * dp.factor_sensitivity) ** 2
    ratio = censored_noise_ratio(served.popularity, q * weights, q * (1 - q) * squares + noise)
    # about 1 (these counts' 0.01% to 99.99% range, simulated: 0.6 to 1.55); exact counts give
    # about 0.01, half the noise 0.3, twice the noise 3.3
    assert 0.5 < ratio < 2.0, ratio


def _client_dp(monkeypatch) -> list:
    """The DP settings every client training task receives (None without DP), in the order
    asked."""
    import tasks.clients as clients

    asked: list = []
    original = clients.train_client.fn

    def spy(**kwargs):
        asked.append(kwargs["family"].config.dp)
        return original(**kwargs)

    monkeypatch.setattr(clients.train_client, "fn", spy)
    return asked


def test_without_secure_aggregation_each_clients_upload_carries_the_whole_noise(store, monkeypatch):
    """Against the server, which sees each client's upload when the updates are not securely
    aggregated: every client adds the whole noise the accountant counts, not a share of it (a
    share is right only when the server sees nothing but a masked sum of enough clients)."""
    asked = _client_dp(monkeypatch)
    with flow_log(logging.INFO) as records:
        summary = _run(store, model_name="dp-whole-noise", clients=3, dp_epsilon=8.0)
    (said,) = [r.getMessage() for r in records if r.getMessage().startswith("user-level DP:")]
    assert said.endswith("each client's upload noised in full (the server sees each one)"), said
    sigma = _history(store, summary["run_id"], "privacy/noise_multiplier")[-1]
    assert len(asked) >= 3 * SMALL["rounds"]
    for dp in asked:
        assert dp.noise_multiplier == pytest.approx(sigma, rel=1e-12)
        # one client's noise: the multiplier times one user's sensitivity, whole
        assert dp.noise_std(dp.sensitivity) == pytest.approx(sigma * dp.sensitivity, rel=1e-12)


def test_under_secure_aggregation_the_noise_shares_add_up_over_the_rounds_threshold(
    store, monkeypatch
):
    """Against the server, which sees only masked sums of at least t clients: each client adds
    a share of the noise such that any t of them add up to the whole noise (never more shares
    than the smallest sum the protocol opens)."""
    from flows.rounds import quorum
    from tasks.secure import round_threshold

    settings = _client_dp(monkeypatch)
    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | {
        "model_name": "dp-secure-shares", "clients": 4, "min_clients": 2, "dp_epsilon": 8.0,
        "secure_aggregation": True}))  # fmt: skip
    from flows.training import federated_training

    summary = federated_training(**config.model_dump())
    sigma = _history(store, summary["run_id"], "privacy/noise_multiplier")[-1]
    t = round_threshold(4, quorum(config, 4))
    asked = [dp for dp in settings if dp is not None]
    assert 2 <= t <= 4 and asked
    for dp in asked:
        assert dp.shares == t
        whole = t * dp.noise_std(dp.sensitivity) ** 2  # t shares' variances add up
        assert whole == pytest.approx((sigma * dp.sensitivity) ** 2, rel=1e-12)
