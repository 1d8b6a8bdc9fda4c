"""Secure aggregation through the real training flow: the model equals the plain one, a dropout at
any phase leaves exactly the survivors' sum, a substituted identity key shuts that client out
with a clear log line, fewer than t survivors refuse the round, and the explicit family's global
mean (each client's rating sum and count) is summed under the protocol too.

The sums are checked against an oracle independent of the protocol: each client's plain update,
recorded as training produced it (before it was held), summed in the clear by the family's own
server step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import mlflow
import numpy as np
import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import flow_log, messages, tracking_store

BASE = {
    "synthetic_users": 200,
    "synthetic_items": 60,
    "synthetic_interactions": 4_000,
    "clients": 4,
    "factors": 3,
    "rounds": 2,
    "skip_if_unchanged": False,
}
SECURE = {"secure_aggregation": True, "min_clients": 2}
IMPLICIT = {"feedback": "implicit", "factors": 4}


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-secure-flow")) as store:
        yield store


def _run(store, **fields) -> dict:
    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], **(BASE | fields))
    return federated_training(**config.model_dump())


def _served(store, name: str):
    mlflow.set_tracking_uri(store["uri"])
    return mlflow.pyfunc.load_model(f"models:/{name}/latest").unwrap_python_model().recommender


class _Round:
    """What a secure run's first sampled round did: each trainer's plain update as training
    produced it, the state they trained on, and the state and sum the server came out with."""

    def __init__(self) -> None:
        self.plain: dict[int, Any] = {}
        self.trained_on: Any = None
        self.family: Any = None
        self.phase = ""
        self.after: Any = None
        self.combined: Any = None

    def check_sum_of(self, survivors: set[int]) -> None:
        """The decoded sum and the new state are the plain ones over ``survivors`` exactly."""
        assert set(self.plain) >= survivors
        plain = [self.plain[c] for c in sorted(survivors)]
        expected = self.family.server_update(self.trained_on, plain, self.phase)
        counts: dict[int, float] = {}
        for u in plain:
            for item, count in zip(u.items.tolist(), u.counts.tolist(), strict=True):
                counts[item] = counts.get(item, 0) + count
        touched = sorted(i for i, c in counts.items() if c > 0)
        assert self.combined.items.tolist() == touched
        assert self.combined.counts.tolist() == [counts[i] for i in touched]
        for name in ("gram", "rhs"):
            total = np.zeros_like(self.combined.arrays[name])
            at = {item: row for row, item in enumerate(touched)}
            for u in plain:
                total[[at[i] for i in u.items.tolist()]] += u.arrays[name]
            np.testing.assert_allclose(self.combined.arrays[name], total, atol=1e-5)
        np.testing.assert_allclose(_factors(self.after), _factors(expected), atol=1e-6)


def _factors(state: Any) -> np.ndarray:
    return state.params.factors if hasattr(state, "params") else state.factors


@pytest.fixture
def first_round(monkeypatch) -> _Round:
    """Records the first sampled round of the next secure run."""
    import tasks.clients as clients
    import tasks.secure as secure

    seen = _Round()
    original_hold, original_train = clients.hold_update, clients.train_client.fn
    original_aggregate = secure.secagg_aggregate.fn

    def hold(update, n_items, family, context, where):
        if context.endswith(b"/round-1"):
            seen.plain[update.client_id] = update
        return original_hold(update, n_items, family, context, where)

    def train(**kwargs):
        if kwargs.get("secure_context", b"").endswith(b"/round-1"):
            seen.trained_on, seen.family, seen.phase = (
                kwargs["state"],
                kwargs["family"],
                kwargs["phase"],
            )
        return original_train(**kwargs)

    def aggregate(**kwargs):
        result = original_aggregate(**kwargs)
        if seen.after is None and seen.trained_on is not None:  # round 1, not the mean's round
            seen.after, seen.combined, _ = result
        return result

    monkeypatch.setattr(clients, "hold_update", hold)
    monkeypatch.setattr(clients.train_client, "fn", train)
    monkeypatch.setattr(secure.secagg_aggregate, "fn", aggregate)
    return seen


@pytest.fixture
def run_log() -> Iterator[list[logging.LogRecord]]:
    """The flow- and task-run log records at INFO and above while the test runs."""
    with flow_log(logging.INFO, ("prefect.flow_runs", "prefect.task_runs")) as records:
        yield records


def _clients_per_round(store, run_id: str) -> list[float]:
    return [m.value for m in store["client"].get_metric_history(run_id, "system/clients")]


def test_a_secure_explicit_run_gives_the_plain_model(store):
    plain = _run(store, model_name="explicit-plain", min_clients=2)
    secure = _run(store, model_name="explicit-secure", **SECURE)

    np.testing.assert_allclose(
        _served(store, "explicit-secure").params.factors,
        _served(store, "explicit-plain").params.factors,
        atol=1e-6,
    )
    assert secure["metrics"]["test/rmse"] == pytest.approx(plain["metrics"]["test/rmse"], abs=1e-6)
    assert _clients_per_round(store, secure["run_id"]) == [4.0, 4.0]


def test_a_secure_implicit_run_gives_the_plain_model_and_says_knn_ran_in_the_clear(store, run_log):
    plain = _run(store, model_name="implicit-plain", min_clients=2, **IMPLICIT)
    secure = _run(store, model_name="implicit-secure", **SECURE, **IMPLICIT)

    ours, theirs = _served(store, "implicit-secure"), _served(store, "implicit-plain")
    np.testing.assert_allclose(
        ours.retrieval.item_factors, theirs.retrieval.item_factors, atol=1e-6
    )
    np.testing.assert_allclose(ours.retrieval.popularity, theirs.retrieval.popularity)
    assert secure["metrics"]["test/ndcg_at_10"] == pytest.approx(
        plain["metrics"]["test/ndcg_at_10"], abs=1e-9
    )
    log = messages(run_log)
    clear = [i for i, line in enumerate(log) if "phase(s) knn send each client's answer to the "
             "server in the clear" in line]  # fmt: skip
    summed = [i for i, line in enumerate(log) if "securely aggregated the updates" in line]
    assert len(clear) == 1 and summed  # once per run, not once per round,
    assert clear[0] < summed[0]  # and before the first round's sum


def test_a_client_that_vanishes_after_sharing_keys_leaves_the_survivors_plain_sum(
    store, first_round
):
    summary = _run(store, model_name="drop-after-share", fault_dropout_clients=(1,), **SECURE)

    assert _clients_per_round(store, summary["run_id"]) == [3.0, 3.0]
    first_round.check_sum_of({0, 2, 3})


def test_a_client_that_vanishes_after_its_masked_input_is_unmasked_through_shares(
    store, first_round, monkeypatch
):
    import tasks.secure as secure

    original = secure.secagg_sign.fn

    def sign(**kwargs):
        if kwargs["entry"].client_id == 1:
            raise ConnectionError("client-1 vanished after sending its masked input")
        return original(**kwargs)

    monkeypatch.setattr(secure.secagg_sign, "fn", sign)
    summary = _run(store, model_name="drop-after-mask", **SECURE)

    # its masked input was committed: its update is in the sum, its self mask rebuilt from shares
    assert _clients_per_round(store, summary["run_id"]) == [4.0, 4.0]
    first_round.check_sum_of({0, 1, 2, 3})


def test_a_client_that_times_out_is_left_out_and_its_late_answer_changes_nothing(
    store, first_round, monkeypatch, run_log
):
    import time

    import tasks.secure as secure

    original = secure.secagg_sign.fn

    def sign(**kwargs):
        if kwargs["entry"].client_id == 3 and secure.read_round_config(kwargs["config"]).round == 1:
            time.sleep(25)  # past the round's deadline; it answers after round 2 has begun
        return original(**kwargs)

    monkeypatch.setattr(secure.secagg_sign, "fn", sign)
    summary = _run(store, model_name="late-signer", round_timeout=15, **SECURE)

    # round 1 went on without its signature (its masked input is in the sum); round 2 had it back
    assert "round 1 secagg-sign: client-3 did not answer within 15.0 s: left out" in messages(
        run_log
    )
    assert _clients_per_round(store, summary["run_id"]) == [4.0, 4.0]
    first_round.check_sum_of({0, 1, 2, 3})


def test_a_substituted_registry_key_shuts_that_client_out_with_a_clear_log_line(
    store, first_round, monkeypatch, run_log
):
    from cryptography.hazmat.primitives import serialization

    import tasks.secure as secure
    from models.privacy.identity import generate_identity

    original = secure.secagg_advertise.fn

    def advertise(**kwargs):
        if kwargs["entry"].client_id == 2:  # someone registered another key for client 2
            target = secure.registry_folder(kwargs["workspace"]) / "client-2.pub"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                forged = (
                    generate_identity()
                    .public_key()
                    .public_bytes(
                        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                )
                target.write_bytes(forged)
        return original(**kwargs)

    monkeypatch.setattr(secure.secagg_advertise, "fn", advertise)
    summary = _run(store, model_name="substituted", **SECURE)

    assert _clients_per_round(store, summary["run_id"]) == [3.0, 3.0]
    first_round.check_sum_of({0, 1, 3})
    expected = (
        "round 1: secagg-key-directory left client-2 out of secure aggregation: server: round "
        "keys of client 2: signature does not verify against its registered identity key; "
        "aborting this round"
    )
    assert expected in messages(run_log)


@pytest.mark.parametrize(
    ("clients", "dropped", "message"),
    [
        (3, (0, 1), "1 clients sent masked inputs, threshold is 2: round refused"),
        (4, (0, 1), "2 clients sent masked inputs, threshold is 3: round refused"),
    ],
    ids=["lone-survivor", "t-minus-1-survivors"],
)
def test_fewer_than_t_survivors_refuse_the_round(store, clients, dropped, message):
    from flows.rounds import QuorumError

    # implicit ALS: no phase before the first sampled round runs the protocol
    with pytest.raises(QuorumError, match=rf"round 1 \(secure aggregation\): .*{message}"):
        _run(
            store,
            model_name=f"refused-{clients}",
            clients=clients,
            rounds=1,
            fault_dropout_clients=dropped,
            **SECURE,
            **IMPLICIT,
        )


def test_fewer_than_t_survivors_of_the_mean_round_refuse_it(store):
    from flows.rounds import QuorumError

    message = "1 clients sent masked inputs, threshold is 2: round refused"
    with pytest.raises(QuorumError, match=rf"the mean round \(secure aggregation\): .*{message}"):
        _run(store, model_name="refused-mean", clients=3, fault_dropout_clients=(0, 1), **SECURE)


def test_the_global_means_sums_reach_the_server_only_as_a_masked_sum(store, monkeypatch, run_log):
    """With secure aggregation each client's rating sum and count stay on the client: the flow
    gets a receipt of the vector's length, the server masked vectors that are not the client's
    encoded sums, and it decodes their total alone; the model is the plain run's."""
    import tasks.clients as clients
    import tasks.secure as secure
    from flows.rounds import quorum
    from models.privacy.fixed_point import encode
    from models.privacy.secagg_plus import MaskedInput
    from models.privacy.wire import unpack
    from tasks.secure import round_threshold

    held: dict[int, Any] = {}  # client -> its mean-phase answer as training produced it
    receipts: dict[int, Any] = {}  # client -> what the mean-phase task returned to the flow
    masked: dict[int, np.ndarray] = {}  # client -> the masked vector the server got in that round
    combined: list[Any] = []  # the sum the server decoded in that round
    original_hold, original_train = clients.hold_update, clients.train_client.fn
    original_mask, original_aggregate = secure.secagg_mask.fn, secure.secagg_aggregate.fn

    def hold(update, n_items, family, context, where):
        if context.endswith(b"/round-0"):
            held[update.client_id] = update
        return original_hold(update, n_items, family, context, where)

    def train(**kwargs):
        result = original_train(**kwargs)
        if kwargs["phase"] == "mean":
            receipts[kwargs["entry"].client_id] = result
        return result

    def mask(**kwargs):
        result = original_mask(**kwargs)
        if secure.read_round_config(kwargs["config"]).round == 0:
            masked[kwargs["entry"].client_id] = MaskedInput.from_bytes(result).vector
        return result

    def aggregate(**kwargs):
        result = original_aggregate(**kwargs)
        if kwargs["phase"] == "mean":
            combined.append(result[1])
        return result

    monkeypatch.setattr(clients, "hold_update", hold)
    monkeypatch.setattr(clients.train_client, "fn", train)
    monkeypatch.setattr(secure.secagg_mask, "fn", mask)
    monkeypatch.setattr(secure.secagg_aggregate, "fn", aggregate)
    ours = _run(store, model_name="mean-secure", **SECURE)
    monkeypatch.undo()
    plain = _run(store, model_name="mean-plain", min_clients=2)

    assert sorted(held) == sorted(receipts) == sorted(masked) == [0, 1, 2, 3]
    sums = {c: (u.metrics["rating_sum"], u.metrics["n"]) for c, u in held.items()}
    assert all(n > 0 for _, n in sums.values())
    for c, (receipt, evaluations) in receipts.items():
        fields, arrays = unpack(receipt)  # the flow holds a length, not the two numbers
        assert fields == {"kind": fields["kind"], "vector_size": 2} and not arrays, c
        assert not evaluations
        own = encode(np.array(sums[c]), n_clients=4)
        assert masked[c].shape == (2,) and not np.isin(masked[c], own).any(), c
    assert len(combined) == 1
    total = combined[0]
    assert total.metrics["n"] == sum(n for _, n in sums.values())
    assert total.metrics["rating_sum"] == pytest.approx(sum(s for s, _ in sums.values()), abs=1e-6)
    assert total.items.size == 0 and not total.arrays
    log = messages(run_log)
    assert not any("in the clear" in line for line in log)  # nothing left to warn about
    t = round_threshold(4, quorum(TrainingConfig(**(BASE | SECURE)), 4))
    assert (
        f"the mean round: securely aggregated the updates of 4 of 4 clients (threshold {t})" in log
    )

    mean = total.metrics["rating_sum"] / total.metrics["n"]
    secure_model, plain_model = _served(store, "mean-secure"), _served(store, "mean-plain")
    assert secure_model.params.global_mean == pytest.approx(mean, abs=1e-12)
    assert secure_model.params.global_mean == pytest.approx(
        plain_model.params.global_mean, abs=1e-9
    )
    np.testing.assert_allclose(secure_model.params.factors, plain_model.params.factors, atol=1e-6)
    assert ours["metrics"]["test/rmse"] == pytest.approx(plain["metrics"]["test/rmse"], abs=1e-6)


def test_the_configuration_refuses_what_secure_aggregation_cannot_protect():
    with pytest.raises(ValueError, match="min_clients=1 with secure_aggregation"):
        TrainingConfig(clients=4, secure_aggregation=True, min_clients=1)
    # sampled rounds sum other sets of clients each time: solvable for one client's update
    with pytest.raises(ValueError, match=r"client_fraction=0\.5 with secure_aggregation and no"):
        TrainingConfig(clients=4, secure_aggregation=True, client_fraction=0.5)
    # under DP every client is asked every round and users are sampled inside clients
    TrainingConfig(clients=4, secure_aggregation=True, client_fraction=0.5, dp_epsilon=4.0)
    with pytest.raises(ValueError, match="secure_aggregation with ranker='lightgbm'"):
        TrainingConfig(
            clients=4,
            min_clients=2,
            secure_aggregation=True,
            feedback="implicit",
            ranker="lightgbm",
        )
    with pytest.raises(ValueError, match="per-user trains ALS without a re-ranker or secure"):
        TrainingConfig(partition="per-user", min_clients=2, secure_aggregation=True)
