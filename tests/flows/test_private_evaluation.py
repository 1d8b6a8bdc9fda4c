"""A private run's final evaluation is a counted release: each client's evaluation upload
carries noise of its own (it is not the client's exact sums), and the epsilon the run logs at its
last step is dp-accounting's composition of the training rounds and the evaluation release,
computed here without fedrec's accountant."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import tracking_store

SMALL = {"synthetic_users": 500, "synthetic_items": 120, "synthetic_interactions": 15_000,
         "clients": 3, "factors": 4, "rounds": 3, "skip_if_unchanged": False,
         "dp_budget": 8.0}  # fmt: skip
RATIO = (
    4.0  # an evaluation's noise multiplier over the training's (models/privacy/released_metrics.py)
)


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-private-evaluation")) as store:
        yield store


def _independent_epsilon(sigma: float, rounds: int, evaluations: int, delta: float) -> float:
    """dp-accounting alone: ``rounds`` Gaussian rounds (every user, every round) and
    ``evaluations`` Gaussian releases of ``RATIO * sigma``, the tighter of PLD (pessimistic, grid
    1e-2) and RDP (integer orders 2..64 and a few above), both valid bounds."""
    import dp_accounting
    from dp_accounting import pld, rdp

    events = [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), rounds)]
    events += [dp_accounting.GaussianDpEvent(RATIO * sigma)] * evaluations
    event = dp_accounting.ComposedDpEvent(events)
    by_pld = pld.PLDAccountant(value_discretization_interval=1e-2)
    by_pld.compose(event)
    by_rdp = rdp.RdpAccountant([*range(2, 65), 80, 96, 128, 192, 256, 512, 1024])
    by_rdp.compose(event)
    return min(by_pld.get_epsilon(delta), by_rdp.get_epsilon(delta))


def test_the_final_evaluation_is_noised_by_each_client_and_counted_in_epsilon(store, monkeypatch):
    import tasks.clients as clients
    from flows.training import federated_training
    from models.data.partitions import read_partition
    from models.privacy.released_metrics import MetricRelease, released_noise

    calls: list[tuple[dict, Any]] = []
    original = clients.evaluate_client.fn

    def spy(**kwargs: Any) -> Any:
        result = original(**kwargs)
        calls.append((kwargs, result))
        return result

    monkeypatch.setattr(clients.evaluate_client, "fn", spy)
    config = TrainingConfig(  # the partitions are read again below, after the run
        tracking_uri=store["uri"],
        model_name="counted",
        dp_epsilon=8.0,
        keep_workspace=True,
        **SMALL,
    )
    summary = federated_training(**config.model_dump())

    client = store["client"]

    def history(key: str) -> list[float]:
        return [m.value for m in client.get_metric_history(summary["run_id"], key)]

    sigma, delta = history("privacy/noise_multiplier")[-1], history("privacy/delta")[-1]
    spent = history("privacy/epsilon")
    assert len(spent) == SMALL["rounds"]
    # the training rounds alone up to the last step; the last one adds the evaluation's release
    for step, value in enumerate(spent[:-1], start=1):
        assert value == pytest.approx(_independent_epsilon(sigma, step, 0, delta), rel=1e-9)
    assert spent[-1] == pytest.approx(_independent_epsilon(sigma, 3, 1, delta), rel=1e-9)
    assert 7.9 < spent[-1] <= 8.0 + 1e-9  # calibrated so that the whole composition meets it
    assert _independent_epsilon(sigma, 3, 0, delta) < 7.95  # the release is not free

    # every client's final evaluation upload: noised, without training split or item counts
    assert len(calls) == SMALL["clients"]  # no champion yet: one evaluation, once per client
    release = MetricRelease(RATIO * sigma)
    for kwargs, upload in calls:
        own = read_partition(kwargs["workspace"], kwargs["entry"], kwargs["n_items"])
        exact = replace(kwargs["family"], released=None).evaluate(own, kwargs["state"], ("valid",))
        assert "train" not in upload and all(r is None for _, r in upload.values())
        keys = [(s, k) for s in sorted(upload) for k in sorted(upload[s][0])]
        deviations = release.deviations(keys)
        rows = own.rows("valid")
        capped = float(np.minimum(np.bincount(rows.users), release.max_rows).sum())
        sent = upload["valid"][0]
        assert sent["n"] != exact["valid"][0]["n"] and sent["sse"] != exact["valid"][0]["sse"]
        # the count is the capped count plus noise of the documented deviation
        assert sent["n"] != capped
        assert abs(sent["n"] - capped) < 6 * deviations[("valid", "n")]

    # the run logs how far the noise moves each released metric (public: post-processing)
    stated = released_noise([upload for _, upload in calls], release, config.top_k)
    assert history("valid/dp_sd/rmse") == [pytest.approx(stated["valid/rmse"])]
    assert history("test/dp_sd/ndcg_at_10") == [pytest.approx(stated["test/ndcg_at_10"])]
    assert history("valid/dp_sd/mae") == [pytest.approx(stated["valid/mae"])]
    # the baseline's too, released in the same uploads: the baseline gate weighs both
    assert history("baseline/valid/dp_sd/rmse") == [pytest.approx(stated["baseline/valid/rmse"])]
    assert stated["valid/rmse"] > 0
    # and no per-client spread: each client's figure would be its own noisy release alone
    logged = client.get_run(summary["run_id"]).data.metrics
    assert "valid/rmse" in logged and not [name for name in logged if "/client_" in name]


@pytest.fixture
def own_store(tmp_path, prefect_server):
    """A store of the test's own: its users have spent nothing in its ledger."""
    with tracking_store(tmp_path) as store:
        yield store


def test_a_private_run_with_a_champion_counts_the_champions_evaluation_too(own_store, monkeypatch):
    import tasks.clients as clients
    import tasks.server as server
    from flows.training import federated_training
    from tasks.server import PRIVATE_NOISE_SDS

    rules: list[tuple[float, float]] = []  # (max_client_regression, noise_sds) of each decision
    decide_promotion = server.decide_promotion

    def rule(*args: Any, **kwargs: Any) -> Any:
        rules.append((kwargs["max_client_regression"], kwargs["noise_sds"]))
        return decide_promotion(*args, **kwargs)

    monkeypatch.setattr(server, "decide_promotion", rule)
    store, other_users = own_store, {"synthetic_users": 520}
    plain_fields = {k: v for k, v in (SMALL | other_users).items() if k != "dp_budget"}
    plain = TrainingConfig(tracking_uri=store["uri"], model_name="compared", **plain_fields)
    assert federated_training(**plain.model_dump())["promoted"]  # the champion, trained without DP
    # a run without DP: the worst client's rule, no noise margin
    assert rules == [(plain.max_client_regression, 0.0)]

    names: list[str] = []
    original = clients.evaluate_client.fn

    def spy(**kwargs: Any) -> Any:
        names.append(kwargs.get("release_name"))
        return original(**kwargs)

    monkeypatch.setattr(clients.evaluate_client, "fn", spy)
    private = TrainingConfig(tracking_uri=store["uri"], model_name="compared", dp_epsilon=8.0,
                             **(SMALL | other_users))  # fmt: skip
    summary = federated_training(**private.model_dump())

    client = store["client"]

    def last(key: str) -> float:
        return client.get_metric_history(summary["run_id"], key)[-1].value

    sigma, delta = last("privacy/noise_multiplier"), last("privacy/delta")
    # a private run: no worst-client rule (each client's figure is its own noisy release), and
    # the noise margin
    assert rules[1:] == [(math.inf, PRIVATE_NOISE_SDS)]
    # two evaluation releases: the candidate's and the champion's, both noised by the clients
    assert sorted(names) == ["champion"] * SMALL["clients"] + ["round-3"] * SMALL["clients"]
    assert last("privacy/epsilon") == pytest.approx(
        _independent_epsilon(sigma, 3, 2, delta), rel=1e-9
    )
    assert 7.9 < last("privacy/epsilon") <= 8.0 + 1e-9
    # both released figures carry their noise, which the promotion rule weighs
    assert summary["champion_metrics"]["valid/dp_sd/rmse"] > 0
    assert not [name for name in summary["champion_metrics"] if "/client_" in name]
    assert last("valid/dp_sd/rmse") > 0


def test_a_private_candidate_without_a_released_validation_metric_is_not_promoted_and_says_why():
    from tasks.server import decide

    rule = {"metric": "valid/rmse", "min_delta": 0.0, "max_client_regression": 0.0}
    private = decide.fn({"test/rmse": 1.2}, None, private=True, **rule)
    plain = decide.fn({"test/rmse": 1.2}, None, private=False, **rule)

    assert not private.promote and not plain.promote
    assert "DP noise" in private.reason and "DP" not in plain.reason
