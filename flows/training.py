"""The federated training flow: shard, then rounds of train / aggregate / evaluate / log, then
evaluate the champion the same way, register, and promote only if the candidate is better."""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from fedrec.config import TrainingConfig, fedrec_home
from models.data.partitions import read_item_ids
from models.mf.federated import sample_clients
from tasks.clients import evaluate, rating_sums, train_client
from tasks.data import load_interactions, shard_clients
from tasks.reporting import publish_summary
from tasks.server import (
    aggregate,
    build_recommender,
    champion_params,
    checkpoint,
    client_table,
    decide,
    initialize,
    item_popularity,
    summarize_round,
    warm_start,
)
from tasks.tracking import (
    finish_run,
    load_champion,
    log_artifacts,
    log_round,
    record_promotion,
    register_model,
    resolve_tracking_uri,
    start_run,
    unchanged_since_champion,
    version_tags,
)


class QuorumError(RuntimeError):
    """Fewer clients answered a round than ``min_clients``: the round commits nothing."""


def _answered(futures: dict[Any, PrefectFuture], what: str) -> dict[Any, Any]:
    """Results of the futures that completed, under their keys; failures are logged and left out."""
    wait(list(futures.values()))
    results = {}
    for key, future in futures.items():
        if future.state.is_completed():
            results[key] = future.result()
        else:
            get_run_logger().warning("%s: %s failed: %s", what, key, future.state.message)
    return results


def _log_step(
    uri: str,
    run_id: str,
    step: int,
    config: TrainingConfig,
    round_: tuple[list, float],
    evaluations: list,
    mf: Any,
    n_items: int,
) -> dict[str, float]:
    """Summarise round ``step`` (its uploads and time, its model's evaluation), log it, report it."""
    updates, seconds = round_
    metrics = summarize_round(updates, evaluations, mf, n_items, seconds)
    log_round(uri, run_id, step, metrics)
    get_run_logger().info(
        "round %d/%d: train RMSE %.4f, valid RMSE %.4f, %.1f MB up, %.2f s",
        step, config.rounds, metrics.get("train_rmse", float("nan")), metrics.get("valid_rmse", float("nan")),
        metrics.get("bytes_uploaded", 0.0) / 1e6, metrics.get("round_seconds", float("nan")),
    )  # fmt: skip
    return metrics


def federated_training_fn(**params: Any) -> dict[str, Any]:
    """Train a federated recommender, track it in MLflow, register it, and promote it if better.

    Parameters are the fields of ``fedrec.config.TrainingConfig``; pass a config as
    ``federated_training(**config.model_dump())``.
    """
    return _train(TrainingConfig(**params))


federated_training_fn.__signature__ = TrainingConfig.signature()  # type: ignore[attr-defined]
federated_training = flow(
    federated_training_fn,
    name="federated-training",
    task_runner=ThreadPoolTaskRunner(max_workers=min(8, os.cpu_count() or 1)),
    log_prints=True,
)


def _train(config: TrainingConfig) -> dict[str, Any]:
    """The flow's body: shard, rounds, champion evaluation, registration, promotion."""
    logger = get_run_logger()
    data, explicit_split = load_interactions(config)
    fingerprint, uri = data.fingerprint(), resolve_tracking_uri(config.tracking_uri)
    if config.skip_if_unchanged:
        same = unchanged_since_champion(uri, config.model_name, fingerprint, config.config_hash())
        if same is not None:
            reason = f"data and config unchanged since champion version {same}: nothing to train"
            logger.info(reason)
            return {"skipped": True, "reason": reason, "model_name": config.model_name,
                    "champion_version": same, "tracking_uri": uri, "promoted": False}  # fmt: skip
    uri, run_id = start_run(config, fingerprint, flow_run.get_id())
    succeeded = False
    try:
        workspace = config.workspace or str(fedrec_home() / "workspaces" / run_id)
        manifest = shard_clients(data, explicit_split, config, workspace)
        del data  # from here on, only client tasks read rows, each its own partition
        entries, n_items, mf = manifest.clients, manifest.n_items, config.mf_config()
        item_ids = read_item_ids(workspace)
        logger.info("%d clients, %d items, MLflow run %s", manifest.n_clients, n_items, run_id)

        sums = _answered(
            {e.client_id: rating_sums.submit(workspace, e, n_items) for e in entries}, "global mean"
        )
        state = initialize(n_items, mf, list(sums.values()), config.seed)
        champion = load_champion(uri, config.model_name)
        if config.warm_start and champion is not None:
            if champion.recommender.params.n_factors == mf.n_factors:
                state, carried = warm_start(state, champion.recommender, item_ids)
                logger.info("warm start from champion version %s: %d of %d items carried over",
                            champion.version, carried, n_items)  # fmt: skip
            else:
                logger.warning("no warm start: champion has %d factors, this run %d",
                               champion.recommender.params.n_factors, mf.n_factors)  # fmt: skip
        # A client task evaluates the model it receives, then trains on it: the model of round r
        # is evaluated by round r+1's tasks (and the last one by a final pass), so each step's
        # metrics are logged one round late, in one batch, at step = r.
        history: list[dict[str, float]] = []
        splits = ("train", "valid", "test")
        pending: tuple[list, float] | None = None  # round r's updates and seconds, until evaluated
        updates: list = []
        for r in range(1, config.rounds + 1):
            started = time.perf_counter()
            chosen_ids = set(sample_clients(len(entries), config.client_fraction, config.seed, r))
            chosen = [e for i, e in enumerate(entries) if i in chosen_ids]
            asked = splits if pending else ()
            trainer = train_client.with_options(retries=config.task_retries, retry_delay_seconds=1)
            answers = _answered(
                {
                    ("train", e.client_id): trainer.with_options(task_run_name=f"train client-{e.client_id} round-{r}").submit(
                        workspace, e, n_items, state.params, mf, config.seed, r, asked
                    )
                    for e in chosen
                }
                | {  # clients sitting this round out still evaluate the model (after round 1)
                    ("evaluate", e.client_id): evaluate.with_options(task_run_name=f"evaluate client-{e.client_id} round-{r - 1}").submit(
                        workspace, e, n_items, state.params, mf, splits
                    )
                    for i, e in enumerate(entries) if pending and i not in chosen_ids
                },
                f"round {r}",
            )  # fmt: skip
            updates = [a[0] for (kind, _), a in answers.items() if kind == "train"]
            evaluations = [a[1] if kind == "train" else a for (kind, _), a in answers.items()]
            if len(updates) < config.min_clients:
                raise QuorumError(
                    f"round {r}: {len(updates)} of {len(chosen)} clients answered, min_clients={config.min_clients}"
                )
            if pending:
                history.append(
                    _log_step(uri, run_id, r - 1, config, pending, evaluations, mf, n_items)
                )
            state = aggregate(state, updates, mf)
            checkpoint(state, f"{workspace}/checkpoints")
            pending = (updates, time.perf_counter() - started)

        final_evaluations = _answered(
            {
                e.client_id: evaluate.with_options(task_run_name=f"evaluate client-{e.client_id} round-{config.rounds}").submit(
                    workspace, e, n_items, state.params, mf, splits
                )
                for e in entries
            },
            "final evaluation",
        )  # fmt: skip
        evaluations = list(final_evaluations.values())
        assert pending is not None  # rounds >= 1
        history.append(
            _log_step(uri, run_id, config.rounds, config, pending, evaluations, mf, n_items)
        )
        final = history[-1]
        candidate = build_recommender(state, item_ids, item_popularity(updates, n_items), mf)

        champion_metrics = None
        if champion is not None:
            params, champion_mf = champion_params(champion.recommender, item_ids, mf)
            parts = _answered(
                {e.client_id: evaluate.with_options(task_run_name=f"evaluate champion client-{e.client_id}").submit(
                    workspace, e, n_items, params, champion_mf, ("valid",)) for e in entries},
                "champion evaluation",
            )  # fmt: skip
            champion_metrics = summarize_round([], list(parts.values()), champion_mf, n_items, 0.0)
        decision = decide(
            final,
            champion_metrics,
            config.promotion_metric,
            config.min_delta,
            config.max_client_regression,
        )

        identity = {
            "fedrec.dataset_fingerprint": manifest.fingerprint,
            "fedrec.config_hash": config.config_hash(),
            "fedrec.algorithm": config.algorithm,
            "fedrec.run_id": run_id,
        }
        version = register_model(
            uri, run_id, candidate, config.model_name, version_tags(final, identity)
        )
        record_promotion(
            uri, config.model_name, version, decision, champion.version if champion else None
        )
        logger.info("model %s version %s: %s (%s)", config.model_name, version,
                    "promoted to champion" if decision.promote else "not promoted", decision.reason)  # fmt: skip

        per_client = client_table(evaluations, list(final_evaluations), mf.top_k, "test")
        log_artifacts(uri, run_id, config, manifest.profile(), history, per_client)
        summary = {
            "run_id": run_id,
            "tracking_uri": uri,
            "model_name": config.model_name,
            "model_version": version,
            "promoted": decision.promote,
            "reason": decision.reason,
            "champion_version": version if decision.promote else getattr(champion, "version", None),
            "metrics": {k: v for k, v in final.items() if not k.endswith(("_p10", "_median"))},
            "champion_metrics": champion_metrics,
            "workspace": workspace,
        }
        publish_summary(history, summary, decision.reason)
        succeeded = True
        return summary
    finally:
        finish_run(uri, run_id, succeeded)
