"""Client-side tasks: each reads only its own partition and returns aggregates, never rows."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from models.client import ClientData
from models.data.partitions import ClientEntry, read_partition
from models.mf.federated import (
    Evaluation,
    MFConfig,
    client_rating_sums,
    client_rng,
    client_round,
    cohort_round,
    evaluate_client_splits,
)
from models.mf.params import ItemParams
from models.privacy.dp import UserLevelDP
from models.protocol import ClientUpdate
from tasks.faults import FaultPlan
from tasks.secure import hold_update, pending_path


@lru_cache(maxsize=256)
def _client(workspace: str, entry: ClientEntry, n_items: int, mtime_ns: int) -> ClientData:
    # The client's own memory between rounds: its partition is read once (and its row layouts
    # built once) per run; a rewritten partition has a new mtime and is read again.
    return read_partition(workspace, entry, n_items)


def open_client(workspace: str, entry: ClientEntry, n_items: int) -> ClientData:
    """The client's data, read from its partition on first use."""
    mtime = (Path(workspace) / entry.path).stat().st_mtime_ns
    return _client(workspace, entry, n_items, mtime)


@task(name="client-rating-sums", cache_policy=NONE)
def rating_sums(
    workspace: str, entry: ClientEntry, n_items: int, dp: UserLevelDP | None = None, seed: int = 0
) -> dict[str, float]:
    """A client's training rating sum and count (for the global mean); noisy under DP."""
    client = open_client(workspace, entry, n_items)
    return client_rating_sums(client, dp, client_rng(seed, 0, entry.client_id))


@task(name="train-client", cache_policy=NONE)
def train_client(
    workspace: str,
    entry: ClientEntry,
    n_items: int,
    params: ItemParams,
    mf: MFConfig,
    seed: int,
    round_: int,
    eval_splits: tuple[str, ...] = (),
    faults: FaultPlan | None = None,
    secure_context: bytes | None = None,
    devices: float | None = None,
) -> tuple[ClientUpdate | bytes, dict[str, Evaluation]]:
    """Evaluate the incoming global model on the client's own rows, then train one round on it.

    With ``secure_context`` (secure aggregation) the update stays on the client and the task
    returns the client's public key for the round instead. With ``devices`` the partition is a
    cohort of per-user clients, sampled at that fraction (:mod:`models.cohorts`).
    """
    if faults is not None:
        faults.inject(entry.client_id, round_)
    client = open_client(workspace, entry, n_items)
    if devices is not None:
        update, evaluations = cohort_round(client, params, mf, seed, round_, devices, eval_splits)
    else:
        rng = client_rng(seed, round_, entry.client_id)
        update, evaluations = client_round(client, params, mf, rng, eval_splits)
    if secure_context is not None:
        held = pending_path(workspace, entry)
        return hold_update(update, n_items, mf, secure_context, held), evaluations
    return update, evaluations


@task(name="evaluate-client", cache_policy=NONE)
def evaluate(
    workspace: str,
    entry: ClientEntry,
    n_items: int,
    params: ItemParams,
    mf: MFConfig,
    splits: tuple[str, ...],
) -> dict[str, Evaluation]:
    """Metric sums over the client's own held-out rows of each split."""
    return evaluate_client_splits(open_client(workspace, entry, n_items), params, mf, splits)
