"""A client masks an update once: the server never gets two secure sums over the same update.

Two sums over one update with different survivors let the server subtract them and read the
update of the client in one but not the other. A server can ask for that on purpose (hold the
same update again, for the same round or for another) or a resumed run can repeat a round whose
sum it decoded; the clients refuse, and the round that decodes a sum checkpoints it in the same
task, so an honest resume never needs to repeat one.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import flow_log, secagg_entry, secagg_update, tracking_store

N_ITEMS, RUN = 5, "run-a"
BASE = {
    "synthetic_users": 200,
    "synthetic_items": 60,
    "synthetic_interactions": 4_000,
    "clients": 3,
    "factors": 3,
    "rounds": 2,
    "skip_if_unchanged": False,
    "secure_aggregation": True,
    "min_clients": 2,
    "task_retries": 0,
    "round_retries": 0,
}


def _secure_sum(
    workspace: str, family, clients: list[int], round_: int, quorum: int = 2, nudge: float = 0.0
) -> np.ndarray:
    """One protocol instance over ``clients``, each holding its (same) update for ``round_``
    first, as a training task asked again would; returns the dense sum the server decodes."""
    from tasks import secure

    entries = {c: secagg_entry(c) for c in clients}
    context = secure.round_context(RUN, round_)
    receipts = {
        c: secure.hold_update(
            _nudged(secagg_update(c), nudge),
            N_ITEMS,
            family,
            context,
            secure.pending_path(workspace, e),
        )
        for c, e in entries.items()
    }
    step = secure.secagg_open.fn(
        run_id=RUN, round_=round_, receipts=receipts, asked=len(clients), quorum=quorum
    )
    config = step.to_clients[clients[0]]
    answers = {
        c: secure.secagg_advertise.fn(workspace=workspace, entry=e, config=config)
        for c, e in entries.items()
    }
    for client_task, server_task in (
        (None, secure.secagg_key_directory),
        (secure.secagg_share, secure.secagg_route_shares),
        (secure.secagg_mask, secure.secagg_commit),
        (secure.secagg_sign, secure.secagg_unmask_request),
        (secure.secagg_unmask, None),
    ):
        if client_task is not None:
            answers = {
                c: client_task.fn(workspace=workspace, entry=entries[c], config=config, message=m)
                for c, m in step.to_clients.items()
            }
        if server_task is not None:
            step = server_task.fn(server=step.server, workspace=workspace, answers=answers)
    server = secure._server(step.server, workspace)
    shares, _ = secure._parse(secure.UnmaskShares, answers, "client_id")
    return server.aggregate_decoded(shares)


def _nudged(update, by: float):
    """The update a client computes from a state moved by a rounding step: every value a little
    off (``by`` relative)."""
    from dataclasses import replace

    arrays = {name: value * (1 + by) for name, value in update.arrays.items()}
    return replace(update, arrays=arrays)


def test_a_server_that_asks_a_round_again_with_fewer_clients_gets_no_second_sum(tmp_path):
    from models.mf.family import ExplicitMF
    from models.mf.federated import MFConfig, to_dense
    from models.privacy.secagg_plus import SecAggError

    workspace, mf = str(tmp_path), MFConfig(n_factors=2)
    family = ExplicitMF(mf)
    (tmp_path / "clients").mkdir()
    first = _secure_sum(workspace, family, [0, 1, 2], round_=1)
    dense = {c: to_dense(secagg_update(c), N_ITEMS, mf) for c in range(3)}
    np.testing.assert_allclose(first, sum(dense.values()), atol=1e-5)  # the honest sum

    # the attack: the same round again without client 2; the difference of the two sums would
    # be client 2's update (as it is without the clients' record: checked with the record off)
    with pytest.raises(SecAggError, match="masked this round's update once already"):
        _secure_sum(workspace, family, [0, 1], round_=1)
    # the same updates held for another round: refused by the update's own hash
    with pytest.raises(SecAggError, match="masked this very update once already"):
        _secure_sum(workspace, family, [0, 1], round_=7)


def test_not_given_a_lying_server_that_nudges_the_state_reads_one_update(tmp_path):
    """What the README states as not given without DP: the record stops the very same update,
    but a server that sends a state moved by a rounding step gets updates a few bits off, which
    the record sees as new, and the difference of two sums, one without the client, is that
    client's update to within the step. Only DP noise in each update bounds this."""
    from models.mf.family import ExplicitMF
    from models.mf.federated import MFConfig, to_dense

    workspace, mf = str(tmp_path), MFConfig(n_factors=2)
    family = ExplicitMF(mf)
    (tmp_path / "clients").mkdir()
    everyone = _secure_sum(workspace, family, [0, 1, 2], round_=1)
    without = _secure_sum(workspace, family, [0, 1], round_=2, nudge=1e-12)  # masked: new
    victim = to_dense(secagg_update(2), N_ITEMS, mf)
    read = everyone - without
    assert np.count_nonzero(victim) and np.abs(read - victim).max() < 1e-4  # its update, read


def test_a_private_client_masks_only_for_a_sum_that_carries_the_full_noise(tmp_path):
    """Under DP each client adds ``1 / sqrt(shares)`` of the noise, so a sum of fewer clients
    than the plan's shares carries less than the accountant counted: a server that opens a
    round with a lower threshold t gets no masked update."""
    from models.mf.family import ExplicitMF
    from models.mf.federated import MFConfig
    from models.privacy.dp import UserLevelDP
    from models.privacy.secagg_plus import SecAggError

    (tmp_path / "clients").mkdir()
    # three factors: a private update of the helper's shapes (DP leaves the bias column out)
    private = ExplicitMF(MFConfig(n_factors=3, dp=UserLevelDP(1.0, shares=3)))
    # the server's round configuration says t = 2; the noise was split in 3
    with pytest.raises(SecAggError, match="threshold 2 is below the 3 clients"):
        _secure_sum(str(tmp_path), private, [0, 1, 2], round_=1)
    total = _secure_sum(str(tmp_path), private, [0, 1, 2], round_=2, quorum=3)  # t = 3
    assert total.shape == (private.to_dense(secagg_update(0), N_ITEMS).size,)


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-secure-once")) as store:
        yield store


def _run(store, **fields) -> dict:
    from flows.training import federated_training

    config = TrainingConfig(tracking_uri=store["uri"], **(BASE | fields))
    return federated_training(**config.model_dump())


def _failed_run(store, model_name: str) -> str:
    """The failed run of ``model_name`` (its config is in the run's tags)."""
    client = store["client"]
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            config = run.data.tags.get("fedrec.config", "").replace(" ", "")
            if run.info.status == "FAILED" and f'"model_name":"{model_name}"' in config:
                return run.info.run_id
    raise AssertionError(f"no failed run of {model_name}")


def _spy_sums(patch, decoded: list) -> None:
    """Record (phase, round) of every sum the server decodes."""
    import tasks.secure as secure

    original = secure.secagg_aggregate.fn

    def aggregate(**kwargs: Any) -> Any:
        round_ = secure._server(kwargs["server"], kwargs["workspace"]).config.round
        decoded.append((kwargs["phase"], round_))
        return original(**kwargs)

    patch.setattr(secure.secagg_aggregate, "fn", aggregate)


def test_a_resumed_run_cannot_repeat_a_round_whose_sum_the_server_decoded(store, monkeypatch):
    import tasks.secure as secure
    from flows.rounds import QuorumError
    from models.federation.loop import EVERYONE_ROUND

    decoded: list = []
    with monkeypatch.context() as patch:
        _spy_sums(patch, decoded)
        original = secure.write_checkpoint

        def crash(family, state, folder, progress):
            if progress.step == 1:  # the coordinator dies after decoding round 1's sum
                raise SystemError("the coordinator went away")
            return original(family, state, folder, progress)

        patch.setattr(secure, "write_checkpoint", crash)
        with pytest.raises(SystemError):
            _run(store, model_name="repeat")
    run_id = _failed_run(store, "repeat")
    assert decoded.count(("train", 1)) == 3  # decoded, then retried by its task: one instance

    with monkeypatch.context() as patch:
        _spy_sums(patch, decoded)
        with (
            flow_log(logging.WARNING) as records,
            pytest.raises(QuorumError, match=r"round 1 \(secure aggregation\)"),
        ):
            _run(store, model_name="repeat", resume=run_id)
    # the clients refused to mask round 1 again: the server decoded it in one instance only
    assert decoded.count(("train", 1)) == 3 and decoded.count(("mean", EVERYONE_ROUND)) == 1
    assert any("masked this round's update once already" in r.getMessage() for r in records)


def test_a_secure_run_stopped_in_its_first_round_resumes_without_asking_the_mean_again(
    store, monkeypatch
):
    import tasks.clients as clients
    from flows.rounds import QuorumError

    whole = _run(store, model_name="whole")
    asked: list = []
    with monkeypatch.context() as patch:
        original = clients.train_client.fn

        def stop_in_round_1(**kwargs: Any) -> Any:
            asked.append((kwargs["phase"], kwargs["round_"]))
            if kwargs["round_"] == 1:
                raise ConnectionError("the coordinator went away")
            return original(**kwargs)

        patch.setattr(clients.train_client, "fn", stop_in_round_1)
        with pytest.raises(QuorumError):
            _run(store, model_name="stopped")
        run_id = _failed_run(store, "stopped")
        asked.clear()
        patch.setattr(
            clients.train_client, "fn", lambda **k: asked.append(k["phase"]) or original(**k)
        )
        summary = _run(store, model_name="stopped", resume=run_id)

    assert "mean" not in asked  # its sum was checkpointed when it was decoded
    for key in ("valid/rmse", "test/rmse"):
        assert summary["metrics"][key] == pytest.approx(whole["metrics"][key], abs=1e-9), key
