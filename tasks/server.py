"""Server-side tasks: initialise, aggregate, summarise and checkpoint the global state of any
model family, and decide promotion."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from models.federation.evaluation import Evaluation, summarize_splits
from models.federation.family import Family, Recommender
from models.metrics import finalize_metrics
from models.promotion import PromotionDecision, decide_promotion, worst_client_metric
from models.protocol import ClientUpdate
from tasks.tracking import log_metrics


@task(name="initialize-global", cache_policy=NONE)
def initialize(*, family: Family, n_items: int, seed: int) -> Any:
    """The family's global state before any round, drawn from the seed."""
    return family.initial_state(n_items, seed)


@task(name="warm-start", cache_policy=NONE)
def warm_start(*, family: Family, state: Any, champion: Recommender) -> tuple[Any, int] | None:
    """Carry the champion's parameters into the initial state; None if it cannot seed it."""
    return family.warm_start(state, champion)


@task(name="aggregate", cache_policy=NONE)
def aggregate(*, family: Family, state: Any, updates: Sequence[ClientUpdate], phase: str) -> Any:
    """Combine the round's client updates into the next global state."""
    return family.server_update(state, updates, phase)


def round_summary(
    updates: Sequence[ClientUpdate],
    evaluations: Sequence[Mapping[str, Evaluation]],
    top_k: int,
    n_items: int,
    seconds: float,
    *,
    spread: bool = True,
) -> dict[str, float]:
    """One logged step: the round's uploads and wall time, and the model it produced, evaluated
    on every split the clients reported (``train/*``, ``valid/*``, ``test/*``; the per-client
    spread too with ``spread``); the round's counts and time are ``system/*``."""
    metrics = summarize_splits(evaluations, top_k, n_items, spread=spread)
    if updates:
        metrics["system/clients"] = float(sum(u.metrics.get("clients", 1.0) for u in updates))
        if any("clients" in u.metrics for u in updates):  # cohorts of per-user clients
            metrics["system/client_tasks"] = float(len(updates))
        metrics["system/bytes_uploaded"] = float(sum(u.nbytes() for u in updates))
        metrics["system/round_seconds"] = seconds
    return metrics


@dataclass(frozen=True)
class Progress:
    """Where a run stands after a checkpointed round: the step (sampled rounds so far), and the
    phase and its round that produced it."""

    step: int
    phase: int
    phase_round: int


# Arrays at least this large are stored once, in a file named by their content, and shared by the
# checkpoints that hold them (e.g. the two-stage family's EASE weights through its re-ranker
# rounds), instead of being written again every round.
_SHARED_BYTES = 1 << 20
# A private candidate replaces the champion only when its gain exceeds this many standard
# deviations of the DP noise in the difference of the two released figures: at 2, a candidate
# as good as the champion wins by chance 2.3% of the time instead of half.
PRIVATE_NOISE_SDS = 2.0


def _write_atomically(target: Path, arrays: Mapping[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npz.tmp")
    os.close(fd)
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, target)


@task(name="checkpoint", cache_policy=NONE)
def checkpoint(*, family: Family, state: Any, folder: str, progress: Progress) -> str:
    """Write the global state after a step atomically (temp file, then rename); large arrays
    that an earlier checkpoint already holds are referenced, not written again."""
    return write_checkpoint(family, state, folder, progress)


def write_checkpoint(family: Family, state: Any, folder: str, progress: Progress) -> str:
    """The body of :func:`checkpoint`: returns the checkpoint's path. Once it is in place, the
    earlier checkpoints and the shared arrays only they held are deleted: a resume starts from
    the latest, and a run's folder holds one state, not one per round."""
    target = Path(folder) / f"round-{progress.step:04d}.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "progress": np.array([progress.step, progress.phase, progress.phase_round], np.int64)
    }
    for name, value in family.state_arrays(state).items():
        value = np.asarray(value)
        if value.nbytes < _SHARED_BYTES:
            arrays[name] = value
            continue
        digest = hashlib.sha256(value.tobytes()).hexdigest()[:32]
        shared = target.parent / f"shared-{digest}.npz"
        if not shared.exists():
            _write_atomically(shared, {"value": value})
        arrays[f"shared.{name}"] = np.frombuffer(digest.encode(), np.uint8)
    _write_atomically(target, arrays)
    kept = {f"shared-{bytes(v).decode()}.npz" for k, v in arrays.items() if k.startswith("shared.")}
    for old in target.parent.glob("round-*.npz"):
        if old.name < target.name:
            old.unlink(missing_ok=True)
    for old in target.parent.glob("shared-*.npz"):
        if old.name not in kept:
            old.unlink(missing_ok=True)
    return str(target)


@dataclass(frozen=True)
class Snapshot:
    """The global state after a step, to checkpoint into ``folder``."""

    family: Family
    state: Any
    folder: str
    progress: Progress


def save_step(
    *,
    step: int,
    updates: Sequence[ClientUpdate],
    evaluations: Sequence[Mapping[str, Evaluation]],
    top_k: int,
    n_items: int,
    seconds: float,
    extra: Mapping[str, float],
    log_to: tuple[str, str] | None,
    snapshot: Snapshot | None,
    logged_at: int,
    spread: bool = True,
) -> dict[str, float]:
    """The server's record of a round: step ``step``'s metrics (as :func:`round_summary`, with
    ``extra``) logged to the MLflow run ``log_to`` = (URI, run id) when given, then
    ``snapshot`` checkpointed when given. In that order: a checkpoint on disk means every step
    before it is logged. ``logged_at`` (ms since the epoch) timestamps the metrics: fixed
    before the task runs, it makes a retried attempt (the checkpoint failed after the metrics
    were logged) log the same rows again, which MLflow keeps once. Returns the metrics."""
    metrics = round_summary(updates, evaluations, top_k, n_items, seconds, spread=spread)
    metrics |= dict(extra)
    if log_to is not None:
        log_metrics(*log_to, step, metrics, at=logged_at)
    if snapshot is not None:
        write_checkpoint(snapshot.family, snapshot.state, snapshot.folder, snapshot.progress)
    return metrics


#: :func:`save_step` in a task run of its own (after a secure round, and for the final step)
record_step = task(name="record-step", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 5])(
    save_step
)


@dataclass(frozen=True)
class Fold:
    """A round's plain client updates, to fold into the next global state."""

    family: Family
    state: Any
    updates: Sequence[ClientUpdate]
    phase: str


@task(name="server-step", cache_policy=NONE, retries=2, retry_delay_seconds=[1, 5])
def server_step(
    *, fold: Fold, record: Mapping[str, Any] | None, folder: str, progress: Progress
) -> tuple[Any, dict[str, float] | None]:
    """The server's work after a plain round, in one task run: fold the updates into the next
    state (as :func:`aggregate`), record the previous step (``record``: the keyword arguments
    of :func:`save_step` but the snapshot) and checkpoint the new state into ``folder`` (as
    :func:`save_step`: a checkpoint on disk means every step before it is logged). Returns
    the new state and the recorded step's metrics (None without ``record``)."""
    state = fold.family.server_update(fold.state, fold.updates, fold.phase)
    snapshot = Snapshot(fold.family, state, folder, progress)
    if record is None:
        write_checkpoint(fold.family, state, folder, progress)
        return state, None
    return state, save_step(**record, snapshot=snapshot)


@task(name="load-checkpoint", cache_policy=NONE)
def latest_checkpoint(*, family: Family, folder: str) -> tuple[Any, Progress] | None:
    """The state after the last step whose checkpoint was written completely (files are renamed
    into place, so a file there is whole), and where it stands; None without one."""
    files = sorted(Path(folder).glob("round-*.npz"))
    if not files:
        return None
    with np.load(files[-1], allow_pickle=False) as data:
        stored = {name: data[name] for name in data.files}
    step, phase, phase_round = (int(v) for v in stored.pop("progress"))
    arrays = {}
    for name, value in stored.items():
        if name.startswith("shared."):
            digest = value.tobytes().decode()
            with np.load(Path(folder) / f"shared-{digest}.npz", allow_pickle=False) as shared:
                arrays[name.removeprefix("shared.")] = shared["value"]
        else:
            arrays[name] = value
    return family.load_state(arrays), Progress(step, phase, phase_round)


@task(name="build-model", cache_policy=NONE)
def build_model(*, family: Family, state: Any) -> Recommender:
    """The servable model of the final state."""
    return family.servable(state)


@task(name="prepare-champion", cache_policy=NONE)
def champion_for(*, family: Family, champion: Recommender) -> tuple[Family, Any] | str:
    """A family and state that evaluate the champion as this run's model is evaluated, on
    today's catalogue; or why they cannot be compared."""
    return family.for_champion(champion)


@task(name="decide-promotion", cache_policy=NONE)
def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    metric: str,
    min_delta: float,
    max_client_regression: float,
    private: bool = False,
) -> PromotionDecision:
    """Apply the promotion rule to metrics measured the same way for both models. A ``private``
    run skips the worst-client rule: each client's metrics come from its own noisy release
    (:mod:`models.privacy.released_metrics`), too noisy to compare client by client; the
    baseline gate and the comparison of the totals hold, each with a margin of
    :data:`PRIVATE_NOISE_SDS` standard deviations of the noise in the compared figures: a gain
    on the champion must exceed it, and a shortfall below the baseline refuses only beyond it."""
    decision = decide_promotion(
        candidate,
        champion,
        metric=metric,
        worst_client_metric=worst_client_metric(metric),
        min_delta=min_delta,
        max_client_regression=math.inf if private else max_client_regression,
        noise_sds=PRIVATE_NOISE_SDS if private else 0.0,
    )
    if private and metric not in candidate:  # the released count of held-out rows came out <= 0
        noise = (
            "or the DP noise of the released sums outweighed the few held-out rows (more data "
            "or a larger --dp-epsilon)"
        )
        return replace(decision, reason=f"{decision.reason}, {noise}")
    return decision


@task(name="client-metrics-table", cache_policy=NONE)
def client_table(
    evaluations: Sequence[Mapping[str, Evaluation]], client_ids: Sequence[int], k: int, split: str
) -> pd.DataFrame:
    """One row of final metrics of ``split`` per client (for the per-client plot and CSV)."""
    rows = [
        {"client": c} | finalize_metrics(e[split][0], k=k)
        for c, e in zip(client_ids, evaluations, strict=True)
    ]
    return pd.DataFrame(rows)
