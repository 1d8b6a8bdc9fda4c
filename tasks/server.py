"""Server-side tasks: initialise, aggregate, summarise and checkpoint the global state."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from models.aggregation import aggregate_item_sums
from models.metrics import finalize_metrics
from models.mf.federated import (
    Evaluation,
    GlobalState,
    MFConfig,
    init_global_state,
    server_update,
    summarize_evaluation,
)
from models.mf.params import ItemParams
from models.mf.recommend import align_item_params, warm_start_params
from models.mf.recommender import MFRecommender
from models.promotion import PromotionDecision, decide_promotion
from models.protocol import ClientUpdate
from models.server_optimizers import ServerOptimizerState


@task(name="initialize-global", cache_policy=NONE)
def initialize(
    n_items: int, mf: MFConfig, sums: Sequence[dict[str, float]], seed: int
) -> GlobalState:
    """Global mean from the clients' sums, item factors from the seed."""
    return init_global_state(n_items, mf, sums, seed)


@task(name="aggregate", cache_policy=NONE)
def aggregate(state: GlobalState, updates: Sequence[ClientUpdate], mf: MFConfig) -> GlobalState:
    """Combine the round's client updates (exact ALS reduction or FedAvg-style averaging)."""
    return server_update(state, updates, mf)


@task(name="item-popularity", cache_policy=NONE)
def item_popularity(updates: Sequence[ClientUpdate], n_items: int) -> np.ndarray:
    """Training interactions per item, summed over the clients' counts."""
    if not updates:
        return np.zeros(n_items)
    return aggregate_item_sums([(u.items, u.counts.astype(np.float64)) for u in updates], n_items)


@task(name="summarize-round", cache_policy=NONE)
def summarize_round(
    updates: Sequence[ClientUpdate],
    evaluations: Sequence[Mapping[str, Evaluation]],
    mf: MFConfig,
    n_items: int,
    seconds: float,
) -> dict[str, float]:
    """One logged step: the round's uploads and wall time, and the model it produced, evaluated
    on every split the clients reported (``train_*``, ``valid_*``, ``test_*``)."""
    metrics: dict[str, float] = {}
    for split in dict.fromkeys(s for e in evaluations for s in e):
        parts = [e[split] for e in evaluations if split in e]
        metrics |= summarize_evaluation(parts, mf, n_items, split)
    if updates:
        metrics["clients"] = float(sum(u.metrics.get("clients", 1.0) for u in updates))
        if any("clients" in u.metrics for u in updates):  # cohorts of per-user clients
            metrics["client_tasks"] = float(len(updates))
        metrics["bytes_uploaded"] = float(sum(u.nbytes() for u in updates))
        metrics["round_seconds"] = seconds
    return metrics


@task(name="checkpoint", cache_policy=NONE)
def checkpoint(state: GlobalState, folder: str) -> str:
    """Write the global state of the round atomically (temp file, then rename)."""
    target = Path(folder) / f"round-{state.round:04d}.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "factors": state.params.factors,
        "bias": state.params.bias,
        "global_mean": np.array(state.params.global_mean),
        "round": np.array(state.round),
    }
    if state.optimizer is not None:
        arrays |= {"opt_first": state.optimizer.first, "opt_second": state.optimizer.second}
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npz.tmp")
    os.close(fd)
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, target)
    return str(target)


@task(name="load-checkpoint", cache_policy=NONE)
def latest_checkpoint(folder: str) -> GlobalState | None:
    """The global state of the last round whose checkpoint was written completely (files are
    renamed into place, so a file there is whole), or None."""
    files = sorted(Path(folder).glob("round-*.npz"))
    if not files:
        return None
    with np.load(files[-1], allow_pickle=False) as data:
        params = ItemParams(data["factors"], data["bias"], float(data["global_mean"]))
        optimizer = None
        if "opt_first" in data:
            optimizer = ServerOptimizerState(data["opt_first"], data["opt_second"])
        return GlobalState(params, optimizer, int(data["round"]))


@task(name="decide-promotion", cache_policy=NONE)
def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    metric: str,
    min_delta: float,
    max_client_regression: float,
) -> PromotionDecision:
    """Apply the promotion rule to metrics measured the same way for both models."""
    worst = f"{metric}_client_max" if metric.endswith(("rmse", "mae")) else f"{metric}_client_min"
    return decide_promotion(
        candidate,
        champion,
        metric=metric,
        worst_client_metric=worst,
        min_delta=min_delta,
        max_client_regression=max_client_regression,
    )


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


@task(name="prepare-champion", cache_policy=NONE)
def champion_params(
    recommender: MFRecommender, item_ids: np.ndarray, mf: MFConfig
) -> tuple[ItemParams, MFConfig]:
    """The champion's item parameters on today's catalogue, and its fold-in ridge."""
    aligned = align_item_params(recommender.params, recommender.item_ids, item_ids)
    return aligned, replace(mf, reg=recommender.reg, n_factors=aligned.n_factors)


@task(name="warm-start", cache_policy=NONE)
def warm_start(
    state: GlobalState, champion: MFRecommender, item_ids: np.ndarray
) -> tuple[GlobalState, int]:
    """Carry the champion's item parameters into the initial state; returns how many items."""
    params, carried = warm_start_params(state.params, champion.params, champion.item_ids, item_ids)
    return replace(state, params=params), carried


@task(name="build-recommender", cache_policy=NONE)
def build_recommender(
    state: GlobalState, item_ids: np.ndarray, popularity: np.ndarray, mf: MFConfig
) -> MFRecommender:
    """The servable model: final item parameters, catalogue, popularity, fold-in ridge."""
    return MFRecommender(
        state.params, np.asarray(item_ids).astype(str), popularity, mf.reg, mf.clip_to
    )
