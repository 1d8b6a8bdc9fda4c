"""The implicit-feedback stage (top-K ranking): rounds of federated implicit ALS, one round of
federated item-kNN, then rounds of the federated LightGBM re-ranker; the champion is evaluated
the same way.

Steps in MLflow continue across stages: ALS rounds are steps 1..R, re-ranker rounds R+1..R+Q, and
each step's ``valid_*``/``test_*`` describe the model after that step.
"""

from __future__ import annotations

import time
from dataclasses import replace

from prefect import get_run_logger
from prefect.futures import PrefectFuture

from flows.rounds import (
    RunContext,
    Trained,
    answered,
    fault_plan,
    gather_round,
    log_step,
    privacy_plan,
    require_quorum,
    retry_options,
    round_clients,
    task_unit,
    train_and_evaluate,
)
from models.cohorts import RunningSum
from models.data.partitions import read_item_features
from models.mf.federated import sample_clients
from models.privacy.dp import UserLevelDP
from models.ranking.boosting import TreeEnsemble
from models.ranking.federated import noisy_popularity
from models.ranking.recommender import RankingRecommender
from tasks.ranking import (
    aggregate_implicit,
    aggregate_ranker,
    align_champion,
    build_ranking_model,
    build_similarity,
    evaluate_implicit_client,
    evaluate_ranking_client,
    initialize_factors,
    knn_client,
    train_implicit_client,
    train_ranker_client,
    warm_start_factors,
)
from tasks.server import summarize_round

SPLITS = ("valid", "test")


def train_ranking(ctx: RunContext) -> Trained:
    """Retrieval (implicit ALS, item-kNN) and, if configured, the re-ranker; all federated."""
    config, workspace, entries, n_items = ctx.config, ctx.workspace, ctx.entries, ctx.n_items
    logger, rc, faults = get_run_logger(), config.ranking_config(), fault_plan(config)
    plan = privacy_plan(ctx, full=0)
    if plan is not None:  # implicit ALS alone: kNN and the re-ranker have no DP mechanism
        dp = UserLevelDP.for_implicit(plan.noise_multiplier, config.dp_max_items, plan.shares)
        rc = replace(rc, dp=dp)
        logger.info("DP sensitivity of one user's implicit-ALS statistics: %.2f",
                    dp.implicit_sensitivity(rc.alpha))  # fmt: skip
    factors = initialize_factors(n_items, rc, config.seed)
    champion = (
        ctx.champion
        if isinstance(getattr(ctx.champion, "recommender", None), RankingRecommender)
        else None
    )
    if config.warm_start and champion is not None:
        if champion.recommender.retrieval.item_factors.shape[1] == rc.n_factors:
            factors, carried = warm_start_factors(factors, champion.recommender, ctx.item_ids)
            logger.info("warm start from champion version %s: %d of %d items carried over",
                        champion.version, carried, n_items)  # fmt: skip
        else:
            logger.warning("no warm start: the champion has another number of factors")

    # kNN needs no model: its one round of co-occurrence counts runs beside the ALS rounds.
    knn_futures = {} if plan is not None else {e.client_id: knn_client.with_options(task_run_name=f"knn client-{e.client_id}").submit(
        workspace, e, n_items) for e in entries}  # fmt: skip

    history: list[dict[str, float]] = []
    pending: tuple[list, float] | None = None
    last_sums: list = []  # the last ALS round's updates (or their running sum)
    trainer = train_implicit_client.with_options(**retry_options(config))
    for r in range(1, config.rounds + 1):
        started = time.perf_counter()
        chosen_ids, devices = round_clients(ctx, r)
        evaluating = pending is not None and (r - 1) % config.eval_every == 0
        asked = SPLITS if evaluating else ()
        running = None if devices is None else RunningSum(n_items)  # cohorts: folded on arrival
        sent, evaluations = train_and_evaluate(
            ctx, r, chosen_ids, evaluating,
            train=lambda e, attempt, r=r, asked=asked, factors=factors, devices=devices: trainer.with_options(
                task_run_name=f"train-implicit {task_unit(devices)}-{e.client_id} round-{r}").submit(
                workspace, e, n_items, factors, rc, asked, faults.for_attempt(attempt), r, config.seed, devices),
            evaluate=lambda e, r=r, factors=factors: evaluate_implicit_client.with_options(
                task_run_name=f"evaluate client-{e.client_id} round-{r - 1}").submit(
                workspace, e, n_items, factors, rc, SPLITS),
            running=running,
        )  # fmt: skip
        updates = list(sent.values())
        if pending:
            history.append(
                log_step(ctx, r - 1, pending, evaluations, rc, f"ALS round {r - 1}/{config.rounds}",
                         plan.spent(r - 1) if plan else None)
            )  # fmt: skip
        summed = updates if running is None else [running.total()]
        factors = aggregate_implicit(factors, summed, rc)
        pending, last_sums = (updates, time.perf_counter() - started), summed

    started = time.perf_counter()
    if plan is None:
        knn_updates = answered(knn_futures, "item-kNN")
        require_quorum(len(knn_updates), len(entries), config, "item-kNN")
        similarity, popularity = build_similarity(list(knn_updates.values()), n_items, rc)
    else:  # the cold-start list from the last round's noisy counts
        knn_updates, similarity = {}, None
        popularity = noisy_popularity(last_sums, n_items)
    catalogue = read_item_features(workspace)
    retrieval = build_ranking_model(factors, similarity, popularity, rc, ctx.item_ids, catalogue)
    knn_bytes = float(sum(u.nbytes() for u in knn_updates.values()))
    logger.info("item-kNN: %d clients, %.1f MB up, %.2f s", len(knn_updates), knn_bytes / 1e6,
                time.perf_counter() - started)  # fmt: skip

    ensemble, step = TreeEnsemble(), config.rounds
    if rc.ranker is not None:
        ranker_task = train_ranker_client.with_options(**retry_options(config))
        for q in range(1, rc.ranker.rounds + 1):
            started = time.perf_counter()
            chosen_ids = sample_clients(
                len(entries), config.client_fraction, config.seed, config.rounds + q
            )

            def submit_ranker(
                client: int, attempt: int, q: int = q, ensemble: TreeEnsemble = ensemble
            ) -> PrefectFuture:
                entry = entries[client]
                return ranker_task.with_options(task_run_name=f"train-ranker client-{entry.client_id} round-{q}").submit(
                    workspace, entry, n_items, retrieval, ensemble, rc, config.seed, q, ctx.run_id, faults.for_attempt(attempt))  # fmt: skip

            answers = gather_round(
                submit_ranker, list(chosen_ids), lambda _: True, config, f"ranker round {q}"
            )
            updates = [u for u, _ in answers.values()]
            evaluations = [e for _, e in answers.values()]
            # Round q's tasks evaluated the model after step config.rounds + q - 1.
            history.append(log_step(ctx, step, pending, evaluations, rc, f"step {step}"))
            ensemble = aggregate_ranker(ensemble, updates)
            step, pending = config.rounds + q, (updates, time.perf_counter() - started)

    candidate = retrieval
    if rc.ranker is not None:
        candidate = build_ranking_model(
            factors, similarity, popularity, rc, ctx.item_ids, catalogue, ensemble
        )
    final_evaluations = answered(
        {e.client_id: evaluate_ranking_client.with_options(task_run_name=f"evaluate client-{e.client_id} step-{step}").submit(
            workspace, e, n_items, candidate, SPLITS, rc.top_k) for e in entries},
        "final evaluation",
    )  # fmt: skip
    final = log_step(ctx, step, pending, list(final_evaluations.values()), rc,
                     f"step {step} (final)", plan.spent(step) if plan else None)  # fmt: skip
    history.append(final | {"knn_bytes_uploaded": knn_bytes})

    champion_metrics, comparable = None, ""
    if ctx.champion is not None and champion is None:
        comparable = f"champion version {ctx.champion.version} is not a ranking model"
    elif champion is not None:
        aligned = align_champion(champion.recommender, ctx.item_ids)
        parts = answered(
            {e.client_id: evaluate_ranking_client.with_options(task_run_name=f"evaluate champion client-{e.client_id}").submit(
                workspace, e, n_items, aligned, SPLITS, rc.top_k) for e in entries},
            "champion evaluation",
        )  # fmt: skip
        champion_metrics = summarize_round([], list(parts.values()), rc, n_items, 0.0)
    importance = ensemble.feature_importance() if len(ensemble) else None
    return Trained(
        candidate, history[-1], history, final_evaluations, champion_metrics, comparable, importance
    )
