"""Secure aggregation when a client's phases run in different processes: what a client holds
between phases (its update, its protocol state, its identity key) lives in its own folder beside
its partition, not in a worker's memory."""

from __future__ import annotations

import multiprocessing
import os
import stat

import mlflow
import numpy as np
import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import flow_task_runs, secagg_entry, secagg_update, tracking_store

TINY = {
    "synthetic_users": 60,
    "synthetic_items": 30,
    "synthetic_interactions": 900,
    "factors": 3,
    "rounds": 2,
    "clients": 4,
    "skip_if_unchanged": False,
    "secure_aggregation": True,
    "min_clients": 2,
}
N_ITEMS, RUN = 5, "run-a"


def _share_elsewhere(workspace, entry, config, message, out) -> None:
    from tasks.secure import secagg_share

    reply = secagg_share.fn(workspace=workspace, entry=entry, config=config, message=message)
    out.put((os.getpid(), reply))


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_client_phase_runs_in_another_process_from_the_state_its_last_phase_left(tmp_path):
    from models.mf.family import ExplicitMF
    from models.mf.federated import MFConfig, to_dense
    from tasks import secure

    workspace, mf = str(tmp_path), MFConfig(n_factors=2)
    family = ExplicitMF(mf)
    (tmp_path / "clients").mkdir()
    entries = {c: secagg_entry(c) for c in range(3)}
    receipts = {
        c: secure.hold_update(
            secagg_update(c),
            N_ITEMS,
            family,
            secure.round_context(RUN, 1),
            secure.pending_path(workspace, e),
        )
        for c, e in entries.items()
    }
    step = secure.secagg_open.fn(run_id=RUN, round_=1, receipts=receipts, asked=3, quorum=1)
    config = step.to_clients[0]
    adverts = {
        c: secure.secagg_advertise.fn(workspace=workspace, entry=e, config=config)
        for c, e in entries.items()
    }
    step = secure.secagg_key_directory.fn(server=step.server, workspace=workspace, answers=adverts)

    # client 0 shares its keys in a fresh process, from the state its advertisement left on disk
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=_share_elsewhere, args=(workspace, entries[0], config, step.to_clients[0], queue)
    )
    child.start()
    pid, shared = queue.get(timeout=120)
    child.join(timeout=60)
    assert pid != os.getpid()
    shares = {0: shared} | {
        c: secure.secagg_share.fn(
            workspace=workspace, entry=entries[c], config=config, message=step.to_clients[c]
        )
        for c in (1, 2)
    }

    def phase(task, answers_from, server_task):
        answers = {
            c: task.fn(workspace=workspace, entry=entries[c], config=config, message=m)
            for c, m in answers_from.to_clients.items()
        }
        return answers, server_task.fn(
            server=answers_from.server, workspace=workspace, answers=answers
        )

    step = secure.secagg_route_shares.fn(server=step.server, workspace=workspace, answers=shares)
    _, step = phase(secure.secagg_mask, step, secure.secagg_commit)
    assert not secure.pending_path(workspace, entries[0]).exists()  # masked, then deleted
    _, step = phase(secure.secagg_sign, step, secure.secagg_unmask_request)
    answers = {
        c: secure.secagg_unmask.fn(workspace=workspace, entry=entries[c], config=config, message=m)
        for c, m in step.to_clients.items()
    }
    _, combined, _ = secure.secagg_aggregate.fn(
        server=step.server,
        workspace=workspace,
        answers=answers,
        family=family,
        state=family.initial_state(N_ITEMS, 0),
        n_items=N_ITEMS,
        phase="train",
    )

    expected = family.from_dense_sum(
        np.sum([to_dense(secagg_update(c), N_ITEMS, mf) for c in entries], axis=0), N_ITEMS
    )
    np.testing.assert_array_equal(combined.items, expected.items)
    np.testing.assert_array_equal(combined.counts, expected.counts)
    for name in ("gram", "rhs"):
        np.testing.assert_allclose(combined.arrays[name], expected.arrays[name], atol=1e-6)
    assert combined.metrics["train_sse"] == pytest.approx(expected.metrics["train_sse"], abs=1e-6)
    # what each client kept stays its own: owner-only folder, state and identity key
    folder = secure.client_folder(workspace, entries[0])
    assert _mode(folder) & 0o077 == 0
    assert _mode(secure.state_path(workspace, entries[0])) == 0o600
    assert _mode(folder / "identity" / "client-0.key") == 0o600
    assert sorted(p.name for p in secure.registry_folder(workspace).iterdir()) == [
        "client-0.pub",
        "client-1.pub",
        "client-2.pub",
    ]


def test_a_client_advertises_nothing_for_a_round_it_holds_no_update_for(tmp_path):
    from models.privacy.secagg_plus import RoundConfig
    from tasks import secure

    config = secure._round_message(RoundConfig(RUN, 2, 3, 10, 2))
    with pytest.raises(LookupError, match="holds no held update"):
        secure.secagg_advertise.fn(workspace=str(tmp_path), entry=secagg_entry(0), config=config)


def test_a_client_keeps_its_identity_key_across_rounds_and_resumes(tmp_path):
    from tasks.secure import client_identity, registry_folder

    first = client_identity(str(tmp_path), secagg_entry(4)).private_bytes_raw()
    again = client_identity(str(tmp_path), secagg_entry(4)).private_bytes_raw()
    assert first == again
    assert (registry_folder(str(tmp_path)) / "client-4.pub").is_file()


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-secure-dask")) as store:
        yield store


def _run(store, task_runner: str, **fields) -> dict:
    from flows.training import training_flow

    config = TrainingConfig(tracking_uri=store["uri"], task_runner=task_runner, **(TINY | fields))
    return training_flow(config.task_runner, config.dask_address)(**config.model_dump())


def _factors(store, name: str) -> np.ndarray:
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{name}/latest").unwrap_python_model()
    return model.recommender.params.factors


def test_secure_aggregation_on_two_dask_workers_gives_the_thread_runners_model(store):
    before = os.environ.get("PREFECT_API_URL")
    try:
        dask = _run(store, "dask", model_name="secure-on-dask", fault_dropout_clients=(2,))
    finally:  # the local cluster points its workers at this session's API
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
    threads = _run(store, "thread", model_name="secure-on-threads", fault_dropout_clients=(2,))
    # client 2 vanished after sharing its keys in every round: 3 of 4 in the sum
    assert dask["metrics"]["system/clients"] == threads["metrics"]["system/clients"] == 3.0
    np.testing.assert_array_equal(
        _factors(store, "secure-on-dask"), _factors(store, "secure-on-threads")
    )
    # the workers reported their task runs to this session's API, where the flow run is
    runs = {t.name: t.state.type.value for t in flow_task_runs(store, dask["run_id"])}
    trained = [f"train client-{c} round-{r}" for c in range(4) for r in (1, 2)]
    assert [runs.get(name) for name in trained] == ["COMPLETED"] * len(trained), sorted(runs)
