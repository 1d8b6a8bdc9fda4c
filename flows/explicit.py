"""The explicit-feedback stage (rating prediction by federated MF): rounds of train / aggregate /
evaluate / log, then the champion evaluated the same way."""

from __future__ import annotations

import time

from prefect import get_run_logger

from flows.rounds import RunContext, Trained, answered, log_step, require_quorum
from models.mf.federated import sample_clients
from models.mf.recommender import MFRecommender
from tasks.clients import evaluate, rating_sums, train_client
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


def train_explicit(ctx: RunContext) -> Trained:
    """Federated MF (exact ALS or FedAvg-style rules), evaluated every round on every client."""
    config, workspace, entries, n_items = ctx.config, ctx.workspace, ctx.entries, ctx.n_items
    logger, mf = get_run_logger(), config.mf_config()
    sums = answered(
        {e.client_id: rating_sums.submit(workspace, e, n_items) for e in entries}, "global mean"
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
    updates: list = []
    for r in range(1, config.rounds + 1):
        started = time.perf_counter()
        chosen_ids = set(sample_clients(len(entries), config.client_fraction, config.seed, r))
        chosen = [e for i, e in enumerate(entries) if i in chosen_ids]
        asked = splits if pending else ()
        trainer = train_client.with_options(retries=config.task_retries, retry_delay_seconds=1)
        answers = answered(
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
        require_quorum(len(updates), len(chosen), config, f"round {r}")
        if pending:
            history.append(
                log_step(ctx, r - 1, pending, evaluations, mf, f"round {r - 1}/{config.rounds}")
            )
        state = aggregate(state, updates, mf)
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
    history.append(log_step(ctx, config.rounds, pending, list(final_evaluations.values()), mf,
                            f"round {config.rounds}/{config.rounds}"))  # fmt: skip
    candidate = build_recommender(state, ctx.item_ids, item_popularity(updates, n_items), mf)

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
