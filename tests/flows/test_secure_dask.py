"""Secure aggregation when a client's two phases run in different processes: the update and key a
client holds between training and masking live with its partition, not in a worker's memory."""

from __future__ import annotations

import multiprocessing
import os

import mlflow
import numpy as np
import pytest

from fedrec.config import TrainingConfig
from tests.flows.helpers import tracking_store

TINY = {"synthetic_users": 60, "synthetic_items": 30, "synthetic_interactions": 900,
        "factors": 3, "rounds": 2, "clients": 4, "skip_if_unchanged": False,
        "secure_aggregation": True, "min_clients": 2}  # fmt: skip


def _mask_elsewhere(workspace, entry, public, context, out) -> None:
    from tasks.secure import mask_client

    out.put((os.getpid(), mask_client.fn(workspace, entry, public, context).arrays["masked"]))


def test_a_client_masks_in_another_process_what_it_held_in_this_one(tmp_path):
    from models.data.partitions import ClientEntry
    from models.mf.family import ExplicitMF
    from models.mf.federated import MFConfig
    from models.privacy.secagg import ClientKeys, decode, mask, unmask_sum
    from models.protocol import ClientUpdate
    from tasks.secure import hold_update, mask_client, pending_path

    (tmp_path / "clients").mkdir()
    mf, n_items, context = MFConfig(n_factors=2), 5, b"fedrec/run/round-1/keys-0"
    entry = ClientEntry(0, "clients/client-0000.parquet", 1, 1, 0, 0)
    update = ClientUpdate(0, np.array([1, 3]), np.array([2, 1]),
                          {"gram": np.arange(12.0).reshape(2, 6) / 7, "rhs": -np.ones((2, 3))},
                          {"train_sse": 1.5, "train_n": 3.0})  # fmt: skip
    public = hold_update(
        update, n_items, ExplicitMF(mf), context, pending_path(str(tmp_path), entry)
    )
    peer = ClientKeys.generate()
    keys = {0: public, 1: peer.public}

    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=_mask_elsewhere, args=(str(tmp_path), entry, keys, context, queue)
    )
    child.start()
    pid, masked = queue.get(timeout=120)
    child.join(timeout=60)

    assert pid != os.getpid()
    here = mask_client.fn(str(tmp_path), entry, keys, context).arrays["masked"]
    np.testing.assert_array_equal(masked, here)  # the same key and update, read back
    peer_masked = mask(1, np.zeros_like(masked), peer, keys, context)
    from models.mf.federated import to_dense

    np.testing.assert_allclose(
        decode(unmask_sum([masked, peer_masked])), to_dense(update, n_items, mf), atol=2**-23
    )
    assert (pending_path(str(tmp_path), entry).stat().st_mode & 0o077) == 0  # owner only


def test_a_client_refuses_to_mask_for_a_round_it_holds_nothing_for(tmp_path):
    from models.data.partitions import ClientEntry
    from tasks.secure import mask_client

    entry = ClientEntry(0, "clients/client-0000.parquet", 1, 1, 0, 0)
    with pytest.raises(LookupError, match="no update held for fedrec/run/round-2"):
        mask_client.fn(str(tmp_path), entry, {}, b"fedrec/run/round-2/keys-0")


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
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion").unwrap_python_model()
    return model.recommender.params.factors


def test_secure_aggregation_on_two_dask_workers_gives_the_thread_runners_model(store):
    before = os.environ.get("PREFECT_API_URL")
    try:
        dask = _run(store, "dask", model_name="secure-on-dask")
    finally:  # the local cluster points its workers at this session's API
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
    threads = _run(store, "thread", model_name="secure-on-threads")
    assert dask["metrics"]["clients"] == threads["metrics"]["clients"] == 4.0
    np.testing.assert_array_equal(_factors(store, "secure-on-dask"),
                                  _factors(store, "secure-on-threads"))  # fmt: skip
