"""What every training stage shares: the run's context, collecting answers from client tasks,
logging one step, and what a stage hands back for registration and promotion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from prefect import get_run_logger
from prefect.futures import PrefectFuture, wait

from fedrec.config import TrainingConfig
from models.data.partitions import ClientEntry, Manifest
from tasks.server import summarize_round
from tasks.tracking import Champion, log_round


class QuorumError(RuntimeError):
    """Fewer clients answered a round than ``min_clients``: the round commits nothing."""


@dataclass(frozen=True)
class RunContext:
    """One training run after sharding: where things are and who takes part."""

    config: TrainingConfig
    uri: str
    run_id: str
    workspace: str
    manifest: Manifest
    item_ids: np.ndarray
    champion: Champion | None

    @property
    def entries(self) -> list[ClientEntry]:
        return self.manifest.clients

    @property
    def n_items(self) -> int:
        return self.manifest.n_items


@dataclass(frozen=True)
class Trained:
    """What a training stage hands back: the candidate model and how it and the champion did."""

    candidate: Any  # MFRecommender or RankingRecommender
    final: dict[str, float]  # the last step's metrics
    history: list[dict[str, float]]  # one entry per logged step
    client_evaluations: Mapping[int, Mapping[str, Any]]  # client id -> its final evaluation
    champion_metrics: dict[str, float] | None
    comparable: str = ""  # why the champion could not be compared, if it could not
    importance: pd.Series | None = None  # re-ranker feature importance (gain)


def answered(futures: Mapping[Any, PrefectFuture], what: str) -> dict[Any, Any]:
    """Results of the futures that completed, under their keys; failures are logged and left out."""
    wait(list(futures.values()))
    results = {}
    for key, future in futures.items():
        if future.state.is_completed():
            results[key] = future.result()
        else:
            get_run_logger().warning("%s: %s failed: %s", what, key, future.state.message)
    return results


def require_quorum(answers: int, asked: int, config: TrainingConfig, what: str) -> None:
    if answers < config.min_clients:
        raise QuorumError(
            f"{what}: {answers} of {asked} clients answered, min_clients={config.min_clients}"
        )


def log_step(
    ctx: RunContext,
    step: int,
    round_: tuple[Sequence, float],
    evaluations: Sequence,
    core_config: Any,
    label: str,
) -> dict[str, float]:
    """Summarise step ``step`` (its uploads and time, its model's evaluation), log it, report it."""
    updates, seconds = round_
    metrics = summarize_round(updates, evaluations, core_config, ctx.n_items, seconds)
    log_round(ctx.uri, ctx.run_id, step, metrics)
    shown = [
        f"{k} {metrics[k]:.4f}"
        for k in ("train_rmse", "valid_rmse", "valid_ndcg_at_10", "test_ndcg_at_10")
        if k in metrics
    ]
    get_run_logger().info(
        "%s: %s, %.1f MB up, %.2f s", label, ", ".join(shown) or "no evaluation",
        metrics.get("bytes_uploaded", 0.0) / 1e6, metrics.get("round_seconds", float("nan")),
    )  # fmt: skip
    return metrics
