"""The round loop, the same for every model family: the family's phases of rounds, each round
sample / train clients in parallel / aggregate / log, evaluation one round late, then the final
model and the champion evaluated the same way.

A client task evaluates the state it receives, then trains on it: the model of step ``s`` is
evaluated by step ``s + 1``'s tasks (and the last one by a final pass), so each step's metrics
are logged one round late, in one batch, at step = ``s``. Rounds in which every client answers
once (``Phase.everyone``, e.g. the global mean, item co-occurrences) are not steps: what they
compute belongs to the next step's model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger

from flows.rounds import (
    QuorumError,
    RunContext,
    Trained,
    answered,
    fault_plan,
    log_step,
    require_quorum,
    retry_options,
    round_clients,
    task_unit,
    train_and_evaluate,
)
from models.cohorts import RunningSum
from models.federation.family import Family, Phase
from models.federation.loop import EVERYONE_ROUND
from tasks.clients import evaluate_client, train_client
from tasks.secure import mask_client, rekey_client, round_context, secure_aggregate
from tasks.server import (
    Progress,
    aggregate,
    build_model,
    champion_for,
    checkpoint,
    initialize,
    summarize_round,
    warm_start,
)

Spent = Callable[[int], dict[str, float]]


def _evaluate_all(ctx: RunContext, family: Family, state: Any, splits: tuple, what: str) -> dict:
    """Every client's evaluation of ``state`` (by client id)."""
    return answered(
        {e.client_id: evaluate_client.with_options(task_run_name=f"evaluate {what} client-{e.client_id}").submit(
            workspace=ctx.workspace, entry=e, n_items=ctx.n_items, family=family, state=state,
            splits=splits) for e in ctx.entries},
        f"{what} evaluation",
    )  # fmt: skip


def _everyone_round(ctx: RunContext, family: Family, state: Any, phase: Phase) -> tuple[Any, float]:
    """A round in which every client answers once; returns the new state and the bytes sent."""
    started = time.perf_counter()
    answers = answered(
        {e.client_id: train_client.with_options(task_run_name=f"{phase.name} client-{e.client_id}").submit(
            workspace=ctx.workspace, entry=e, n_items=ctx.n_items, family=family, state=state,
            phase=phase.name, round_=EVERYONE_ROUND, seed=ctx.config.seed) for e in ctx.entries},
        phase.name,
    )  # fmt: skip
    require_quorum(len(answers), len(ctx.entries), ctx.config, phase.name)
    updates = [u for u, _ in answers.values()]
    state = aggregate(family=family, state=state, updates=updates, phase=phase.name)
    sent = float(sum(u.nbytes() for u in updates))
    get_run_logger().info("%s: %d clients, %.1f MB up, %.2f s", phase.name, len(updates),
                          sent / 1e6, time.perf_counter() - started)  # fmt: skip
    return state, sent


def _secure_step(
    ctx: RunContext, family: Family, state: Any, public: dict[int, bytes], r: int, phase: str
) -> tuple[Any, list, list]:
    """The masking half of a securely aggregated round. If a client vanishes after the key
    agreement, the round runs again among the survivors with fresh keys (up to round_retries
    times), since its masks would not cancel; then the server adds the masked vectors. Returns
    the new state, the masked updates and the decoded sum (as one combined update)."""
    config, context = ctx.config, round_context(ctx.run_id, r)
    for attempt in range(config.round_retries + 1):
        masked = answered(
            {c: mask_client.with_options(task_run_name=f"mask client-{c} round-{r}").submit(
                ctx.workspace, ctx.entries[c], public, context, c in config.fault_dropout_clients)
             for c in public},
            f"round {r} masking", config.round_timeout,
        )  # fmt: skip
        if len(masked) == len(public):
            state, combined = secure_aggregate(family=family, state=state,
                                               masked=list(masked.values()), n_items=ctx.n_items,
                                               phase=phase)  # fmt: skip
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
            {c: rekey_client.submit(ctx.workspace, ctx.entries[c], context, fresh)
             for c in survivors}, f"round {r} re-keying",
        )  # fmt: skip
        context = fresh
    raise QuorumError(f"round {r}: clients kept vanishing during secure aggregation")


def _starting_state(ctx: RunContext, family: Family) -> tuple[Any, Progress | None]:
    """The initial state (warm-started from the champion if asked), or the checkpointed one."""
    config, logger = ctx.config, get_run_logger()
    if ctx.resume_state is not None:  # continue after the last checkpointed step
        state, progress = ctx.resume_state
        logger.info("resuming MLflow run %s after step %d", ctx.run_id, progress.step)
        return state, progress
    state = initialize(family=family, n_items=ctx.n_items, seed=config.seed)
    if config.warm_start and ctx.champion is not None:
        started = warm_start(family=family, state=state, champion=ctx.champion.recommender)
        if started is None:
            logger.warning("no warm start: champion version %s is not a %s model of this shape",
                           ctx.champion.version, family.name)  # fmt: skip
        else:
            state, carried = started
            logger.info("warm start from champion version %s: %d of %d items carried over",
                        ctx.champion.version, carried, ctx.n_items)  # fmt: skip
    return state, None


def train_family(ctx: RunContext, family: Family, spent: Spent) -> Trained:
    """Train ``family`` through its phases, then evaluate the final model and the champion on
    every client. ``spent(step)`` gives the privacy metrics logged with each step."""
    config, n_items, workspace = ctx.config, ctx.n_items, ctx.workspace
    faults, logger = fault_plan(config), get_run_logger()
    trainer = train_client.with_options(**retry_options(config))
    phases = family.phases(config.rounds)
    total = sum(p.rounds for p in phases if not p.everyone)
    state, resumed = _starting_state(ctx, family)
    step = 0 if resumed is None else resumed.step
    # round r's updates and seconds, until evaluated (a resumed run's died with the process)
    pending: tuple[list, float] | None = None if step == 0 else ([], 0.0)
    history: list[dict[str, float]] = []
    extra: dict[str, float] = {}
    for index, phase in enumerate(phases):
        for phase_round in range(1, phase.rounds + 1):
            if resumed is not None and (index, phase_round) <= (resumed.phase, resumed.phase_round):
                continue
            if phase.everyone:
                state, sent = _everyone_round(ctx, family, state, phase)
                extra[f"{phase.name}_bytes_uploaded"] = sent
                continue
            step += 1
            started = time.perf_counter()
            chosen, devices = round_clients(ctx, step, phase.per_device)
            evaluating = pending is not None and (step - 1) % config.eval_every == 0
            asked = family.eval_splits if evaluating else ()
            secure = round_context(ctx.run_id, step) if config.secure_aggregation else None
            running = None if devices is None else RunningSum(n_items)  # cohorts: folded on arrival
            sent, evaluations = train_and_evaluate(
                ctx, step, chosen, evaluating,
                train=lambda e, attempt, step=step, asked=asked, state=state, phase=phase, secure=secure, devices=devices: trainer.with_options(
                    task_run_name=f"{phase.name} {task_unit(devices)}-{e.client_id} round-{step}").submit(
                    workspace=workspace, entry=e, n_items=n_items, family=family, state=state,
                    phase=phase.name, round_=step, seed=config.seed, eval_splits=asked,
                    faults=faults.for_attempt(attempt), secure_context=secure, devices=devices),
                evaluate=lambda e, step=step, state=state: evaluate_client.with_options(
                    task_run_name=f"evaluate client-{e.client_id} round-{step - 1}").submit(
                    workspace=workspace, entry=e, n_items=n_items, family=family, state=state,
                    splits=family.eval_splits),
                running=running,
            )  # fmt: skip
            updates = list(sent.values())
            if pending:
                label = f"round {step - 1}/{total}"
                history.append(log_step(ctx, step - 1, pending, evaluations, family.top_k, label,
                                        spent(step - 1)))  # fmt: skip
            if secure is not None:  # updates are public keys here; the sums come masked
                state, updates, _ = _secure_step(ctx, family, state, sent, step, phase.name)
            else:
                summed = updates if running is None else [running.total()]
                state = aggregate(family=family, state=state, updates=summed, phase=phase.name)
            checkpoint(family=family, state=state, folder=f"{workspace}/checkpoints",
                       progress=Progress(step, index, phase_round))  # fmt: skip
            pending = (updates, time.perf_counter() - started)

    final_evaluations = _evaluate_all(ctx, family, state, family.eval_splits, f"round-{step}")
    assert pending is not None, "a family trains for at least one sampled round"
    history.append(log_step(ctx, step, pending, list(final_evaluations.values()), family.top_k,
                            f"round {step}/{total} (final)", spent(step) | extra))  # fmt: skip
    candidate = build_model(family=family, state=state)

    champion_metrics, comparable = None, ""
    if ctx.champion is not None:
        target = champion_for(family=family, champion=ctx.champion.recommender)
        if isinstance(target, str):
            comparable = f"champion version {ctx.champion.version}: {target}"
        else:
            splits = tuple(s for s in family.eval_splits if s != "train")
            parts = _evaluate_all(ctx, target[0], target[1], splits, "champion")
            champion_metrics = summarize_round(updates=[], evaluations=list(parts.values()),
                                               top_k=family.top_k, n_items=n_items, seconds=0.0)  # fmt: skip
    logger.info("trained %s: %d steps", family.name, step)
    return Trained(candidate, history[-1], history, final_evaluations, champion_metrics,
                   comparable, family.describe(state))  # fmt: skip
