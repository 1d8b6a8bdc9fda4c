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
from dataclasses import dataclass
from functools import partial
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture

from flows.rounds import (
    COMPARED_CLIENTS,
    EVALUATED_CLIENTS,
    RunContext,
    Trained,
    answered,
    fault_plan,
    log_step,
    report_step,
    require_quorum,
    round_clients,
    step_record,
    train_and_evaluate,
    who,
)
from flows.secure import everyone_context, secure_round
from models.cohorts import RunningSum
from models.data.partitions import ClientEntry
from models.federation.family import Family, Phase
from models.federation.loop import EVERYONE_ROUND
from models.privacy.released_metrics import MetricRelease, released_noise
from models.promotion import BASELINE, noise_metric
from tasks.clients import evaluate_client, train_run_name
from tasks.secure import round_context
from tasks.server import (
    Fold,
    Progress,
    aggregate,
    build_model,
    champion_for,
    initialize,
    round_summary,
    server_step,
    warm_start,
)
from tasks.tracking import WARM_START_TAG, tag_run

Spent = Callable[[int], dict[str, float]]


@dataclass(frozen=True)
class _Submit:
    """Submits one client's task of a round: what every task of the round shares."""

    ctx: RunContext
    family: Family
    state: Any
    release: MetricRelease | None = None  # a private run's final evaluation: a DP release
    release_name: str = ""

    def evaluate(
        self, entry: ClientEntry, splits: tuple[str, ...], name: str, label: str = ""
    ) -> PrefectFuture:
        """A client's evaluation of the state, as task run ``name``; ``label`` (else the
        release's name) says what is evaluated, as a site's request names it (``round-3``)."""
        if self.ctx.sites is not None:  # a real site answers; a proxy task waits for it
            return self.ctx.sites.evaluate(entry, name, self.family, self.state, splits,
                                           self.release, label or self.release_name)  # fmt: skip
        return evaluate_client.with_options(task_run_name=name).submit(
            workspace=self.ctx.workspace,
            entry=self.ctx.unwalked(entry),
            n_items=self.ctx.n_items,
            family=self.ctx.unwalked(self.family),
            state=self.ctx.unwalked(self.state),
            splits=splits,
            release=self.ctx.unwalked(self.release),
            release_name=self.release_name,
        )

    def train(self, entry: ClientEntry, **options: Any) -> PrefectFuture:
        if self.ctx.sites is not None:
            name = train_run_name({"entry": entry, **options})
            return self.ctx.sites.train(
                entry, name, self.family, self.state, retries=self.ctx.retries, **options
            )
        unwalked = self.ctx.unwalked
        return self.ctx.train_task.submit(
            workspace=self.ctx.workspace,
            entry=unwalked(entry),
            n_items=self.ctx.n_items,
            family=unwalked(self.family),
            state=unwalked(self.state),
            seed=self.ctx.config.seed,
            **{k: unwalked(v) if k == "faults" else v for k, v in options.items()},
        )


def _evaluate_all(
    ctx: RunContext,
    family: Family,
    state: Any,
    splits: tuple,
    what: str,
    release: MetricRelease | None = None,
) -> dict[int, PrefectFuture]:
    """Every client's evaluation of ``state``, submitted (futures by client id); with
    ``release``, each client's answer is its noisy release, named ``what``."""
    submit = _Submit(ctx, family, state, release, what)
    return {
        e.client_id: submit.evaluate(e, splits, f"evaluate {what} client-{e.client_id}")
        for e in ctx.entries
    }


def _everyone_round(
    ctx: RunContext, family: Family, state: Any, phase: Phase, progress: Progress
) -> tuple[Any, float]:
    """A round in which every client answers once, securely aggregated when the family encodes
    the phase (:func:`~flows.secure.everyone_context`; its result is then checkpointed at
    ``progress`` by the task that decodes it); returns the new state and the bytes sent."""
    started, submit = time.perf_counter(), _Submit(ctx, family, state)
    secure = everyone_context(ctx, family, phase)
    futures = {
        e.client_id: submit.train(
            e,
            phase=phase.name,
            round_=EVERYONE_ROUND,
            secure_context=secure,
        )
        for e in ctx.entries
    }
    failed: dict[int, str] = {}
    answers = answered(
        futures, phase.name, failed=failed, names=ctx.client_names, missed=ctx.missed
    )
    require_quorum(len(answers), len(ctx.entries), ctx.config, phase.name, failed, ctx.client_names)
    held = {c: u for c, (u, _) in answers.items()}
    if secure is not None:  # the answers stayed on the clients; the sum comes masked
        asked, folder = len(ctx.entries), _checkpoints(ctx)
        state, updates, _ = secure_round(ctx, family, state, held, EVERYONE_ROUND, phase.name,
                                         asked, checkpoint_to=(folder, progress))  # fmt: skip
    else:
        updates = list(held.values())
        state = aggregate(family=family, state=state, updates=updates, phase=phase.name)
    sent = float(sum(u.nbytes() for u in updates))
    get_run_logger().info(
        "%s: %d clients, %.1f MB up, %.2f s",
        phase.name,
        len(updates),
        sent / 1e6,
        time.perf_counter() - started,
    )
    return state, sent


def _starting_state(ctx: RunContext, family: Family) -> tuple[Any, Progress | None]:
    """The initial state (warm-started from the champion if asked), or the checkpointed one."""
    config, logger = ctx.config, get_run_logger()
    if ctx.resume_state is not None:  # continue after the last checkpointed step
        state, progress = ctx.resume_state
        logger.info("resuming MLflow run %s after step %d", ctx.run_id, progress.step)
        return state, progress
    state = initialize(family=family, n_items=ctx.n_items, seed=config.seed)
    if (
        config.warm_start
        and ctx.champion is not None
        and family.private
        and ctx.champion.epsilon is None
    ):
        # its parameters come from the same kind of data without noise: starting from them would
        # release what no accountant counts
        logger.warning(
            "no warm start: champion version %s was not trained with DP", ctx.champion.version
        )
    elif config.warm_start and ctx.champion_on_other_dataset:
        # items of another dataset can share ids with this one's (MovieLens' 1..N and the
        # synthetic 0..N-1 do): their factors would describe other items
        logger.warning(
            "no warm start: champion version %s was trained on %s, not on this run's data",
            ctx.champion.version,
            ctx.champion.source,
        )
    elif config.warm_start and ctx.champion is not None:
        started = warm_start(family=family, state=state, champion=ctx.champion.recommender)
        version = ctx.champion.version
        if started is None:
            logger.warning(
                "no warm start: champion version %s does not fit this run's %s model "
                "(another family, or another size such as the number of factors)",
                version,
                family.name,
            )
        else:
            state, carried = started
            logger.info(
                "warm start from champion version %s: %d of %d items carried over",
                version,
                carried,
                ctx.n_items,
            )
            tag_run(ctx.uri, ctx.run_id, {WARM_START_TAG: str(version)})  # and its version's
            if ctx.champion_on_other_data:  # the caller's files under another name
                logger.warning(
                    "the warm start takes champion version %s's items, trained on %s, to be this "
                    "data's items of the same ids (%s): right for a later export of the same "
                    "shop, wrong for another's (--model-name keeps a champion per dataset)",
                    version, ctx.champion.source, ctx.source,
                )  # fmt: skip
    return state, None


def _checkpoints(ctx: RunContext) -> str:
    return f"{ctx.workspace}/checkpoints"


def _record_of(
    ctx: RunContext, family: Family, step: int, pending: tuple[list, float] | None, spent: Spent
) -> Callable[[list], dict[str, Any] | None]:
    """Step ``step``'s record from the next round's evaluations of it (None before step 1)."""

    def record(evaluations: list) -> dict[str, Any] | None:
        if not pending:
            return None
        return step_record(ctx, step, pending, evaluations, family.top_k, spent(step))

    return record


def _sampled_round(
    ctx: RunContext,
    family: Family,
    state: Any,
    phase: Phase,
    step: int,
    evaluating: bool,
    record_of: Callable[[list], dict[str, Any] | None],
    progress: Progress,
) -> tuple[Any, list, Fold | None, list, float, dict[str, float] | None]:
    """Step ``step``: the sampled clients train on ``state`` (each evaluating it first when
    ``evaluating``), the others evaluate it. Returns the new state, what each trainer sent, the
    previous step's metrics (``record_of(evaluations)`` recorded) and None after a secure
    round, whose aggregation task also checkpoints the new state at ``progress``: a decoded
    round is on disk before anything else runs, so a resumed run never repeats it. After a
    plain round: None, the plain updates, their fold, and None. Then the evaluations of
    ``state`` and when the round started."""
    config, started = ctx.config, time.perf_counter()
    chosen, devices = round_clients(ctx, step, phase.per_device)
    asked = family.eval_splits if evaluating else ()
    secure = round_context(ctx.run_id, step) if config.secure_aggregation else None
    # cohorts: folded on arrival (under secure aggregation they answer with public keys)
    running = None if devices is None or secure is not None else RunningSum(ctx.n_items)
    faults, submit = fault_plan(config), _Submit(ctx, family, state)

    def train(entry: ClientEntry, attempt: int) -> PrefectFuture:
        return submit.train(
            entry,
            phase=phase.name,
            round_=step,
            eval_splits=asked,
            faults=faults.for_attempt(attempt),
            secure_context=secure,
            devices=devices,
        )

    def evaluate(entry: ClientEntry) -> PrefectFuture:
        name = f"evaluate client-{entry.client_id} round-{step - 1}"
        return submit.evaluate(entry, family.eval_splits, name, label=f"round-{step - 1}")

    sent, evaluations = train_and_evaluate(ctx, step, chosen, evaluating, train, evaluate, running)
    if secure is not None:  # updates stayed on the clients; the sum comes masked
        state, updates, metrics = secure_round(
            ctx, family, state, sent, step, phase.name, len(chosen),
            record=record_of(evaluations), checkpoint_to=(_checkpoints(ctx), progress),
        )  # fmt: skip
        return state, updates, None, evaluations, started, metrics
    updates = list(sent.values())
    summed = updates if running is None else [running.total()]
    return None, updates, Fold(family, state, summed, phase.name), evaluations, started, None


def train_family(
    ctx: RunContext, family: Family, spent: Spent, release: MetricRelease | None = None
) -> Trained:
    """Train ``family`` through its phases, then evaluate the final model and the champion on
    every client. ``spent(step)`` gives the privacy metrics logged with each step; with
    ``release`` (DP), both evaluations are releases each client bounds and noises."""
    config = ctx.config
    phases = family.phases(config.rounds)
    total = sum(p.rounds for p in phases if not p.everyone)
    state, resumed = _starting_state(ctx, family)
    step = 0 if resumed is None else resumed.step
    # step s's updates and seconds, until evaluated (a resumed run's died with the process)
    pending: tuple[list, float] | None = None if step == 0 else ([], 0.0)
    history: list[dict[str, float]] = []
    extra: dict[str, float] = {}
    for index, phase in enumerate(phases):
        for phase_round in range(1, phase.rounds + 1):
            if resumed is not None and (index, phase_round) <= (resumed.phase, resumed.phase_round):
                continue
            if phase.everyone:
                state, extra[f"system/{phase.name}_bytes_uploaded"] = _everyone_round(
                    ctx, family, state, phase, Progress(step, index, phase_round)
                )
                continue
            step += 1
            # a private model is evaluated once, at the end: each evaluation is a release
            evaluating = (
                pending is not None and (step - 1) % config.eval_every == 0 and not family.private
            )
            progress = Progress(step, index, phase_round)
            record_of = _record_of(ctx, family, step - 1, pending, spent)
            secured, updates, fold, evaluations, started, metrics = _sampled_round(
                ctx, family, state, phase, step, evaluating, record_of, progress
            )
            label = f"round {step - 1}/{total}"
            if fold is not None:  # one server task run: step folded, step - 1 logged, then
                state, metrics = server_step(  # step checkpointed
                    fold=ctx.unwalked(fold),
                    record=ctx.unwalked(record_of(evaluations)),
                    folder=_checkpoints(ctx),
                    progress=progress,
                )
            else:  # a secure round: folded, recorded and checkpointed by its aggregation task
                state = secured
            if pending:
                report_step(ctx, label, metrics, pending[1])
                history.append(metrics)
            pending = (updates, time.perf_counter() - started)

    if pending is None:
        raise ValueError(f"the {family.name} family trained no sampled round: rounds must be >= 1")
    # the final model's and the champion's evaluations run side by side
    get_run_logger().info("round %s/%s: evaluating the final model on every client", step, total)
    final_futures = _evaluate_all(ctx, family, state, family.eval_splits, f"round-{step}", release)
    champion_futures, comparable = _champion_evaluations(ctx, family, release)
    final_evaluations = answered(
        final_futures, f"round-{step} evaluation", names=ctx.client_names, missed=ctx.missed
    )
    label = f"round {step}/{total} (final)"
    noise = _noise(list(final_evaluations.values()), release, family.top_k)
    final = log_step(
        ctx,
        step,
        pending,
        list(final_evaluations.values()),
        family.top_k,
        label,
        spent(step) | extra | noise,
    )
    if noise:
        shown = [f"{name} {final[name]:.4f} ± {final[noise_metric(name)]:.4f}" for name in final
                 if noise_metric(name) in noise and not name.startswith(BASELINE)]  # fmt: skip
        get_run_logger().info(
            "the released metrics with their DP noise (one standard deviation): %s",
            ", ".join(shown),
        )
    history.append(final)
    candidate = build_model(family=family, state=state)
    champion_metrics = compared = None
    if champion_futures is not None:
        parts = answered(
            champion_futures, "champion evaluation", names=ctx.client_names, missed=ctx.missed
        )
        both = sorted(set(parts) & set(final_evaluations))
        summary = partial(_released_summary, family=family, n_items=ctx.n_items, release=release)
        if not parts or not final_evaluations:  # one was not evaluated at all: the decision
            champion_metrics = summary(list(parts.values()))  # says which
        elif not both:
            comparable = "no client answered both the candidate's and the champion's evaluation"
        else:
            champion_metrics = summary([parts[c] for c in both])
            if len(both) < len(final_evaluations) or len(both) < len(parts):
                once = sorted(set(parts) ^ set(final_evaluations))
                get_run_logger().warning(
                    "the candidate and the champion are compared on the %d client(s) that "
                    "answered both evaluations (%s answered one only)",
                    len(both), ", ".join(who(c, ctx.client_names) for c in once),
                )  # fmt: skip
                compared = summary([final_evaluations[c] for c in both]) | {
                    COMPARED_CLIENTS: float(len(both)),
                    EVALUATED_CLIENTS: float(len(set(parts) | set(final_evaluations))),
                }
    get_run_logger().info("trained the %s family: %d step(s)", family.name, step)
    return Trained(
        candidate,
        final,
        history,
        final_evaluations,
        champion_metrics,
        comparable,
        family.describe(state),
        compared,
    )


def _released_summary(
    evaluations: list[Any], *, family: Family, n_items: int, release: MetricRelease | None
) -> dict[str, float]:
    """The metrics of one model's evaluation answers, with their DP noise under ``release`` (no
    per-client spread then: each client's figure would be mostly noise)."""
    metrics = round_summary([], evaluations, family.top_k, n_items, 0.0, spread=release is None)
    return metrics | _noise(evaluations, release, family.top_k)


def _noise(evaluations: list[Any], release: MetricRelease | None, k: int) -> dict[str, float]:
    """A release's ``dp_sd`` metrics (:func:`released_noise`), none without DP."""
    if release is None:
        return {}
    return {noise_metric(name): sd for name, sd in released_noise(evaluations, release, k).items()}


def _champion_evaluations(
    ctx: RunContext, family: Family, release: MetricRelease | None = None
) -> tuple[dict[int, PrefectFuture] | None, str]:
    """The champion's evaluation on today's clients as the candidate's is evaluated, submitted
    (None without a champion), or why the two cannot be compared; under DP a release of its
    own (counted in the plan)."""
    if ctx.champion is None:
        return None, ""
    if not ctx.evaluate_champion:
        return None, (
            f"champion version {ctx.champion.version} was promoted after this private run "
            "started; evaluating it would be a release the run's budget did not count"
        )
    target = champion_for(family=family, champion=ctx.champion.recommender)
    if isinstance(target, str):
        return None, f"champion version {ctx.champion.version}: {target}"
    splits = tuple(s for s in family.eval_splits if s != "train")
    return _evaluate_all(ctx, target[0], target[1], splits, "champion", release), ""
