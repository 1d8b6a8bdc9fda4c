"""The explicit-feedback stage (rating prediction by federated MF): rounds of train / aggregate /
evaluate / log, then the champion evaluated the same way."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from prefect import get_run_logger

from flows.rounds import (
    QuorumError,
    RunContext,
    Trained,
    answered,
    fault_plan,
    log_step,
    privacy_plan,
    require_quorum,
    retry_options,
    round_clients,
    task_unit,
    train_and_evaluate,
)
from models.cohorts import RunningSum
from models.mf.recommender import MFRecommender
from models.privacy.dp import UserLevelDP
from tasks.clients import evaluate, rating_sums, train_client
from tasks.secure import mask_client, rekey_client, round_context, secure_aggregate
from tasks.server import (
    aggregate,
    build_recommender,
    champion_params,
    checkpoint,
    initialize,
    item_popularity,
    summarize_round,
    warm_start,
)


def _secure_step(
    ctx: RunContext, state: Any, public: dict[int, bytes], r: int, mf: Any
) -> tuple[Any, list, list]:
    """The masking half of a securely aggregated round. If a client vanishes after the key
    agreement, the round runs again among the survivors with fresh keys (up to round_retries
    times), since its masks would not cancel; then the server adds the masked vectors. Returns the new state, the masked updates and the
    decoded sum (as one combined update)."""
    config, context = ctx.config, round_context(ctx.run_id, r)
    for attempt in range(config.round_retries + 1):
        masked = answered(
            {c: mask_client.with_options(task_run_name=f"mask client-{c} round-{r}").submit(
                ctx.workspace, ctx.entries[c], public, context, c in config.fault_dropout_clients) for c in public},
            f"round {r} masking", config.round_timeout,
        )  # fmt: skip
        if len(masked) == len(public):
            state, combined = secure_aggregate(state, list(masked.values()), ctx.n_items, mf)
            return state, list(masked.values()), [combined]
        survivors = sorted(masked)
        require_quorum(len(survivors), len(public), config, f"round {r} (secure aggregation)")
        if attempt == config.round_retries:
            break
        fresh = round_context(ctx.run_id, r, attempt + 1)
        get_run_logger().warning("round %d: %d client(s) vanished after the key agreement; "
                                 "agreeing keys again among %d survivors", r,
                                 len(public) - len(survivors), len(survivors))  # fmt: skip
        public = answered(
            {
                c: rekey_client.submit(ctx.workspace, ctx.entries[c], context, fresh)
                for c in survivors
            },
            f"round {r} re-keying",
        )
        context = fresh
    raise QuorumError(f"round {r}: clients kept vanishing during secure aggregation")


def _with_privacy(ctx: RunContext, mf: Any) -> tuple[Any, Callable[[int], dict[str, float]]]:
    """The MF config with DP's bounds and noise (if asked for), and the per-step ``epsilon``
    metrics; the global mean's release from every client counts once more."""
    plan = privacy_plan(ctx, full=1)
    if plan is None:
        return mf, lambda _: {}
    dp = UserLevelDP(plan.noise_multiplier, ctx.config.dp_max_items, shares=plan.shares)
    get_run_logger().info("DP sensitivity of one user's ALS statistics: %.2f", dp.sensitivity)
    return replace(mf, dp=dp), plan.spent


def train_explicit(ctx: RunContext) -> Trained:
    """Federated MF (exact ALS or FedAvg-style rules), evaluated every round on every client."""
    config, workspace, entries, n_items = ctx.config, ctx.workspace, ctx.entries, ctx.n_items
    logger, mf, faults = get_run_logger(), config.mf_config(), fault_plan(config)
    mf, privacy = _with_privacy(ctx, mf)
    sums = answered(
        {
            e.client_id: rating_sums.submit(workspace, e, n_items, mf.dp, config.seed)
            for e in entries
        },
        "global mean",
    )
    state = initialize(n_items, mf, list(sums.values()), config.seed)
    champion = (
        ctx.champion
        if isinstance(getattr(ctx.champion, "recommender", None), MFRecommender)
        else None
    )
    if config.warm_start and champion is not None:
        if champion.recommender.params.n_factors == mf.n_factors:
            state, carried = warm_start(state, champion.recommender, ctx.item_ids)
            logger.info("warm start from champion version %s: %d of %d items carried over",
                        champion.version, carried, n_items)  # fmt: skip
        else:
            logger.warning("no warm start: champion has %d factors, this run %d",
                           champion.recommender.params.n_factors, mf.n_factors)  # fmt: skip
    # A client task evaluates the model it receives, then trains on it: the model of round r is
    # evaluated by round r+1's tasks (and the last one by a final pass), so each step's metrics
    # are logged one round late, in one batch, at step = r.
    history: list[dict[str, float]] = []
    splits = ("train", "valid", "test")
    pending: tuple[list, float] | None = None  # round r's updates and seconds, until evaluated
    counted: list = []  # the last round's updates whose counts give item popularity
    first = 1
    if ctx.resume_state is not None:  # continue after the last checkpointed round
        state, first = ctx.resume_state, ctx.resume_state.round + 1
        pending = ([], 0.0) if state.round > 0 else None  # its uploads died with the process
        logger.info("resuming MLflow run %s after round %d", ctx.run_id, state.round)
    trainer = train_client.with_options(**retry_options(config))
    for r in range(first, config.rounds + 1):
        started = time.perf_counter()
        chosen_ids, devices = round_clients(ctx, r)
        evaluating = pending is not None and (r - 1) % config.eval_every == 0
        asked = splits if evaluating else ()

        secure = round_context(ctx.run_id, r) if config.secure_aggregation else None
        running = None if devices is None else RunningSum(n_items)  # cohorts: folded on arrival
        sent, evaluations = train_and_evaluate(
            ctx, r, chosen_ids, evaluating,
            train=lambda e, attempt, r=r, asked=asked, params=state.params, secure=secure, devices=devices: trainer.with_options(
                task_run_name=f"train {task_unit(devices)}-{e.client_id} round-{r}").submit(
                workspace, e, n_items, params, mf, config.seed, r, asked, faults.for_attempt(attempt), secure, devices),
            evaluate=lambda e, r=r, params=state.params: evaluate.with_options(
                task_run_name=f"evaluate client-{e.client_id} round-{r - 1}").submit(
                workspace, e, n_items, params, mf, splits),
            running=running,
        )  # fmt: skip
        updates = list(sent.values())
        if pending:
            history.append(
                log_step(
                    ctx,
                    r - 1,
                    pending,
                    evaluations,
                    mf,
                    f"round {r - 1}/{config.rounds}",
                    privacy(r - 1),
                )
            )
        if config.secure_aggregation:  # updates are public keys here; the sums come masked
            state, updates, counted = _secure_step(ctx, state, sent, r, mf)
        else:
            summed = updates if running is None else [running.total()]
            state, counted = aggregate(state, summed, mf), summed
        checkpoint(state, f"{workspace}/checkpoints")
        pending = (updates, time.perf_counter() - started)

    final_evaluations = answered(
        {
            e.client_id: evaluate.with_options(task_run_name=f"evaluate client-{e.client_id} round-{config.rounds}").submit(
                workspace, e, n_items, state.params, mf, splits
            )
            for e in entries
        },
        "final evaluation",
    )  # fmt: skip
    assert pending is not None  # rounds >= 1
    final_step = log_step(ctx, config.rounds, pending, list(final_evaluations.values()), mf,
                          f"round {config.rounds}/{config.rounds}", privacy(config.rounds))  # fmt: skip
    history.append(final_step)
    # popularity (the cold-start list) from the last round's counts; under secure aggregation
    # only their sum exists
    candidate = build_recommender(state, ctx.item_ids, item_popularity(counted, n_items), mf)

    champion_metrics, comparable = None, ""
    if ctx.champion is not None and champion is None:
        comparable = f"champion version {ctx.champion.version} is not an MF model"
    elif champion is not None:
        params, champion_mf = champion_params(champion.recommender, ctx.item_ids, mf)
        parts = answered(
            {e.client_id: evaluate.with_options(task_run_name=f"evaluate champion client-{e.client_id}").submit(
                workspace, e, n_items, params, champion_mf, ("valid",)) for e in entries},
            "champion evaluation",
        )  # fmt: skip
        champion_metrics = summarize_round([], list(parts.values()), champion_mf, n_items, 0.0)
    return Trained(candidate, history[-1], history, final_evaluations, champion_metrics, comparable)
