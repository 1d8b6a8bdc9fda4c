"""Client-side tasks: each reads only its own partition and returns aggregates, never rows.

The tasks are the same for every model family: the family (:mod:`models.federation.family`)
says what a client computes.
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from models.client import ClientData
from models.cohorts import family_cohort_round
from models.data.partitions import ClientEntry, read_partition
from models.federation.evaluation import Evaluation, without_item_counts
from models.federation.family import Family
from models.federation.loop import EVERYONE_ROUND
from models.federation.sampling import fresh_rng, round_rng
from models.privacy.released_metrics import MetricRelease
from models.privacy.wire import read_npz
from models.protocol import ClientUpdate, answer_arrays, answer_from_arrays
from tasks.faults import FaultPlan
from tasks.secure import hold_update, pending_path, write_private


@lru_cache(maxsize=256)
def _client(workspace: str, entry: ClientEntry, n_items: int, mtime_ns: int) -> ClientData:
    # The client's own memory between rounds: its partition is read once (and its row layouts
    # built once) per run; a rewritten partition has a new mtime and is read again.
    return read_partition(workspace, entry, n_items)


def open_client(workspace: str, entry: ClientEntry, n_items: int) -> ClientData:
    """The client's data, read from its partition on first use."""
    mtime = (Path(workspace) / entry.path).stat().st_mtime_ns
    return _client(workspace, entry, n_items, mtime)


def _answer_path(workspace: str, entry: ClientEntry, phase: str, round_: int) -> Path:
    """Where a private client keeps what it answered in a round: beside its partition."""
    return (Path(workspace) / entry.path).with_suffix(f".answer-{phase}-{round_:04d}.npz")


def _keep_answer(path: Path, update: ClientUpdate, evaluations: dict[str, Evaluation]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **answer_arrays(update, evaluations))
    write_private(path, buffer.getvalue())


def _kept_answer(path: Path) -> tuple[ClientUpdate, dict[str, Evaluation]]:
    return answer_from_arrays(read_npz(path))


def task_unit(devices: float | None) -> str:
    """What one training task stands for, in task run names: a client, or a cohort of them."""
    return "client" if devices is None else "cohort"


def train_run_name(parameters: dict[str, Any]) -> str:
    """A training task run's name, from its parameters: ``train client-3 round-5``, with
    ``cohort-3`` for a cohort of per-user clients, and no round in a round every client answers
    once. Prefect names each run from its parameters, so the flow submits one task object
    (building a task per name, with ``with_options``, costs a millisecond of the flow's thread)."""
    entry, phase, round_ = (parameters.get(key) for key in ("entry", "phase", "round_"))
    if not isinstance(entry, ClientEntry) or phase is None:  # not bound by name: a wrapped body
        return "train-client"
    name = f"{phase} {task_unit(parameters.get('devices'))}-{entry.client_id}"
    return name if round_ == EVERYONE_ROUND else f"{name} round-{round_}"


@task(name="train-client", task_run_name=train_run_name, cache_policy=NONE)
def train_client(
    *,
    workspace: str,
    entry: ClientEntry,
    n_items: int,
    family: Family,
    state: Any,
    phase: str,
    round_: int,
    seed: int,
    eval_splits: tuple[str, ...] = (),
    faults: FaultPlan | None = None,
    secure_context: bytes | None = None,
    devices: float | None = None,
) -> tuple[ClientUpdate | bytes, dict[str, Evaluation]]:
    """Evaluate the incoming global state on the client's own rows, then compute its update for
    ``phase`` of the family's training (its random stream drawn from seed, round and client; a
    private family's from OS entropy).

    A private family's client answers a round once: asked again (a retry, a round repeated for
    the quorum, a resumed run) it sends the noisy answer it already gave, so no extra release
    happens. With ``secure_context`` (secure aggregation) the update stays on the client and the task
    returns only a receipt with the held vector's length instead. With ``devices`` the partition is a
    cohort of per-user clients, sampled at that fraction (:mod:`models.cohorts`).
    """
    if faults is not None:
        faults.inject(entry.client_id, round_)
    kept = _answer_path(workspace, entry, phase, round_) if family.private else None
    if kept is not None and kept.exists():
        update, evaluations = _kept_answer(kept)
    else:
        client = open_client(workspace, entry, n_items)
        if devices is not None:
            update, evaluations = family_cohort_round(
                family, client, state, phase, seed, round_, devices, eval_splits
            )
        else:
            rng = round_rng(seed, round_, entry.client_id, private=family.private)
            update, evaluations = family.client_round(client, state, phase, rng, eval_splits)
        if kept is not None:
            _keep_answer(kept, update, evaluations)
    if family.private:
        evaluations = without_item_counts(evaluations)
    if secure_context is not None:
        held = pending_path(workspace, entry)
        return hold_update(update, n_items, family, secure_context, held), evaluations
    return update, evaluations


@task(name="evaluate-client", cache_policy=NONE)
def evaluate_client(
    *,
    workspace: str,
    entry: ClientEntry,
    n_items: int,
    family: Family,
    state: Any,
    splits: tuple[str, ...],
    release: MetricRelease | None = None,
    release_name: str = "",
) -> dict[str, Evaluation]:
    """Metric sums of the state's model over the client's own held-out rows of each split.

    With ``release`` (a private run's final evaluation) the family bounds each user's sums and
    the client adds Gaussian noise from OS entropy (:meth:`MetricRelease.publish`); it keeps what
    it released under ``release_name`` and sends the same again if asked again (a retry, a
    resumed run), so asking again is not a second release."""
    if release is not None:
        if getattr(family, "released", release) != release:
            raise ValueError(f"{family.name} family does not bound its evaluation for this release")
        kept = _answer_path(workspace, entry, f"release-{release_name}", 0).with_suffix(".json")
        if kept.exists():
            stored = json.loads(kept.read_text())
            return {split: (sums, None) for split, sums in stored.items()}
        evaluations = family.evaluate(open_client(workspace, entry, n_items), state, splits)
        released = release.publish(evaluations, fresh_rng())
        write_private(kept, json.dumps({s: sums for s, (sums, _) in released.items()}).encode())
        return released
    evaluations = family.evaluate(open_client(workspace, entry, n_items), state, splits)
    return without_item_counts(evaluations) if family.private else evaluations
