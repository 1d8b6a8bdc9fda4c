"""What the round loop is made of: the run's context, who takes part in a round, the privacy
plan, collecting answers from client tasks under a quorum, logging one step, and what training
hands back for registration and promotion."""

from __future__ import annotations

import gc
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
from prefect import Task, get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.utilities.annotations import quote

from fedrec.config import TrainingConfig
from models.cohorts import RunningSum
from models.data.partitions import ClientEntry, Manifest
from models.data.readers import TABLE_SUFFIXES
from models.federation.sampling import sample_clients
from models.files import UnsafeFile
from models.privacy.dp import calibrate, epsilon, weak_guarantee
from models.privacy.ledger import run_delta
from models.privacy.redaction import redact_uri
from models.privacy.released_metrics import MetricRelease, evaluation_ratios
from models.sites.budget import SITE_RUN_DELTA
from tasks.clients import train_client
from tasks.faults import FaultPlan
from tasks.secure import round_threshold
from tasks.server import Snapshot, record_step
from tasks.tracking import Champion


@dataclass(frozen=True)
class Privacy:
    """A run's differential privacy: the calibrated noise, the final evaluation's releases, and
    how much of the budget each step has spent."""

    noise_multiplier: float
    delta: float
    sampling_rate: float
    shares: (
        int  # clients whose noise shares add up to the full noise (1 without secure aggregation)
    )
    rounds: int  # the sampled rounds of the training
    # noise multipliers of the final evaluation's releases (the model's, the champion's)
    evaluation: tuple[float, ...] = ()

    @property
    def release(self) -> MetricRelease | None:
        """How each client bounds and noises its final evaluation."""
        return MetricRelease(self.evaluation[0]) if self.evaluation else None

    def spent(self, step: int) -> dict[str, float]:
        """The per-step MLflow metrics after ``step`` rounds; the last step's include the final
        evaluation's releases (the champion's too, evaluated after it)."""
        extra = self.evaluation if step >= self.rounds else ()
        eps = epsilon(self.noise_multiplier, self.sampling_rate, step, self.delta, extra=extra)
        return {
            "privacy/epsilon": eps,
            "privacy/noise_multiplier": self.noise_multiplier,
            "privacy/delta": self.delta,
        }


def round_clients(
    ctx: RunContext, r: int, per_device: bool = True
) -> tuple[set[int], float | None]:
    """The partitions asked to train in round ``r``, and the per-device sampling fraction when
    they are cohorts of per-user clients sampled device by device, or under DP (all partitions
    train; each user flips its own coin)."""
    config = ctx.config
    if per_device and (config.partition == "per-user" or config.dp_epsilon is not None):
        # under DP, sampling is of users, by coins each client flips from OS entropy: the
        # Poisson sampling the accountant counts, unknown to the server
        return set(range(len(ctx.entries))), config.client_fraction
    return set(sample_clients(len(ctx.entries), config.client_fraction, config.seed, r)), None


def privacy_plan(ctx: RunContext) -> Privacy | None:
    """With ``dp_epsilon``: the noise multiplier calibrated to it over the whole training (delta
    defaults to 1 / users; over real sites, to the delta each site counts a run at), with
    Poisson sampling of users at ``client_fraction`` (the sampling that runs:
    :func:`round_clients`). Every training release is one of the ``rounds`` sampled
    rounds (explicit MF's biases phase is its first); the final evaluation is one more release
    from every user, and the champion's evaluation one more when there is a champion, each with
    a noise multiplier a fixed multiple of the training's
    (:mod:`models.privacy.released_metrics`): the training's noise is calibrated so that all of
    it composed meets ``dp_epsilon``."""
    config = ctx.config
    if config.dp_epsilon is None:
        return None
    dp_delta = config.dp_delta
    if dp_delta is None and ctx.sites is not None:
        # the delta each site counts a run at by default (a public number, not 1 / users)
        dp_delta = min(SITE_RUN_DELTA, 1.0 / max(1, ctx.manifest.n_users))
    delta = run_delta(dp_delta, ctx.manifest.n_users)
    q = config.client_fraction
    ratios = evaluation_ratios(champion=ctx.champion is not None and ctx.evaluate_champion)
    sigma = calibrate(config.dp_epsilon, q, config.rounds, delta, relative=ratios)
    evaluation = tuple(r * sigma for r in ratios)
    # Against the server: without secure aggregation it sees each client's upload, which must
    # carry the full noise on its own; with it, only sums of at least t clients (the protocol
    # refuses a round below its threshold), whose noise shares add up to the full noise. Under DP
    # every client is asked every round (users are sampled inside clients), so t is that of all.
    n_clients = len(ctx.entries)
    shares = 1
    if config.secure_aggregation:
        shares = round_threshold(n_clients, quorum(config, n_clients))
    where = (
        "each client's upload noised in full (the server sees each one)"
        if shares == 1
        else f"the noise split in shares over at least {shares} clients' masked sum"
    )
    logger = get_run_logger()
    logger.info("user-level DP: epsilon %.3g, delta %.3g, noise multiplier %.3f, %s",
                config.dp_epsilon, delta, sigma, where)  # fmt: skip
    weak = weak_guarantee(config.dp_epsilon)
    if weak is not None:
        logger.warning(weak)
    logger.info("final evaluation under DP: %d release(s) of noise multiplier %.3f, composed "
                "with the training's", len(evaluation), evaluation[0])  # fmt: skip
    return Privacy(sigma, delta, q, shares, config.rounds, evaluation)


# Cohort tasks in flight at once when their answers are folded into a running sum: enough to keep
# every worker busy, few enough that a round holds a handful of (dense) cohort answers.
WAVE = max(8, 2 * (os.cpu_count() or 1))


class QuorumError(RuntimeError):
    """Fewer clients answered a round than ``min_clients``: the round commits nothing."""

    one_line = True  # the command line shows the message alone: it says all there is
    exit_status = 1  # the run failed; the same command may succeed when more clients answer


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
    resume_state: Any = None  # (state, Progress) of the last checkpointed step, when resuming
    logged_through: int = 0  # steps up to this one are in MLflow already (resuming)
    sites: Any = None  # real sites (tasks.remote.SiteLink): client tasks are their proxies
    # False when resuming a private run whose plan counted no champion evaluation: a champion
    # promoted since is not evaluated (an uncounted release) and not replaced
    evaluate_champion: bool = True
    # what a private run's DP does not cover, in words (tasks.tracking.DP_NOT_COVERED); "": not
    # private, or a run of real sites, which count their own users
    dp_not_covered: str = ""
    # what each real site the run went on without missed: its name -> the steps, each with why
    missed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def entries(self) -> list[ClientEntry]:
        return self.manifest.clients

    @property
    def client_names(self) -> dict[int, str]:
        """How log lines name a client: a real site by its name (simulated clients: none)."""
        entries = getattr(self.sites, "entries", None) or {}
        return {client: site.name for client, site in entries.items()}

    @property
    def source(self) -> str:
        """The run's data source as versions record it (credentials redacted)."""
        return redact_uri(self.manifest.source)

    @property
    def champion_on_other_data(self) -> bool:
        """Whether the champion records a data source other than this run's."""
        return self.champion is not None and self.champion.source not in (None, self.source)

    @property
    def champion_on_other_dataset(self) -> bool:
        """Whether the champion's data is another dataset, whose item ids may mean other items:
        another source, unless both are the caller's own files (a later export under a new
        name, such as ``purchases_2026-12-03.csv``, names its items as the last one did)."""
        if self.champion is None or not self.champion_on_other_data:
            return False
        return not (_own_files(self.champion.source) and _own_files(self.source))

    @property
    def n_items(self) -> int:
        return self.manifest.n_items

    @property
    def retries(self) -> dict[str, Any]:
        """Task options of a client training task: retries with exponential backoff."""
        return retry_options(self.config)

    def unwalked(self, value: Any) -> Any:
        """``value`` as a task parameter that Prefect does not walk for futures (``quote``): it
        would walk a family's config or a state twice per task run, on the flow's side of the
        GIL. Under Dask as it is: Dask's own handling of task arguments turns the wrapper into
        a plain tuple."""
        return value if self.config.task_runner == "dask" else quote(value)

    @cached_property
    def train_task(self) -> Task:
        """The client training task with this run's retries, built once per run (each of its
        runs is named from its parameters: :func:`tasks.clients.train_run_name`)."""
        return train_client.with_options(**self.retries)


@dataclass(frozen=True)
class Trained:
    """What a training stage hands back: the candidate model and how it and the champion did."""

    candidate: Any  # the family's servable recommender
    final: dict[str, float]  # the last step's metrics
    history: list[dict[str, float]]  # one entry per logged step
    client_evaluations: Mapping[int, Mapping[str, Any]]  # client id -> its final evaluation
    champion_metrics: dict[str, float] | None
    comparable: str = ""  # why the champion could not be compared, if it could not
    importance: pd.Series | None = None  # e.g. the re-ranker's feature importance (gain)
    # the candidate's metrics on the clients the champion's evaluation answered too, when not
    # every client answered both (None: ``final`` is on the same clients as the champion's)
    compared: dict[str, float] | None = None

    @property
    def candidate_compared(self) -> dict[str, float]:
        """What the promotion compares with ``champion_metrics``: the same clients' figures."""
        return self.final if self.compared is None else self.compared


# the number of clients the candidate and the champion were compared on, when fewer than answered,
# and of those that answered either evaluation
COMPARED_CLIENTS = "system/compared_clients"
EVALUATED_CLIENTS = "system/evaluated_clients"


def answered(
    futures: Mapping[Any, PrefectFuture],
    what: str,
    timeout: float | None = None,
    failed: dict[Any, str] | None = None,
    names: Mapping[int, str] | None = None,
    missed: dict[str, list[str]] | None = None,
) -> dict[Any, Any]:
    """Results of the futures that completed (within ``timeout`` seconds, if given), under their
    keys; failures and stragglers are logged (a client by its ``names`` entry, if any) and left
    out (a late answer is never used), and written into ``failed`` (key: why) when it is given.
    A named client left out is added to ``missed`` (name: ``what`` and why), when it is given.
    A private file that others could swap (:class:`models.files.UnsafeFile`, the workspace every
    simulated client keeps its files in) ends the run: it is the user's to fix, not a dropout."""
    done = wait(list(futures.values()), timeout=timeout).done
    results = {}
    for key, future in futures.items():
        if future not in done:
            why = f"did not answer within {timeout:.1f} s"  # a round's time left: not 29.99998
            get_run_logger().warning("%s: %s %s: left out", what, who(key, names), why)
        else:
            # With a timeout, wait() tells which futures are done but records no final state,
            # and the state read from the API can lag behind a task that has just finished:
            # take the final state from the finished future itself.
            future.wait(timeout=0)
            if future.state.is_completed():
                results[key] = future.result()
                continue
            if isinstance(error := _error(future.state), UnsafeFile):
                raise error
            why = f"failed: {_failure(future.state)}"
            get_run_logger().warning("%s: %s %s", what, who(key, names), why)
        if failed is not None:
            failed[key] = why.removeprefix("failed: ")
        note_missed(missed, names, what, {key: why.removeprefix("failed: ")})
    return results


def note_missed(
    missed: dict[str, list[str]] | None,
    names: Mapping[int, str] | None,
    what: str,
    left: Mapping[Any, str],
) -> None:
    """Add each named client of ``left`` (task key: why it was left out) to ``missed``, under
    its name: ``what``, the task's kind (``round 3 train``) and why."""
    for key, why in left.items():
        kind, client = key if isinstance(key, tuple) and len(key) == 2 else ("", key)
        name = (names or {}).get(int(client)) if isinstance(client, int | np.integer) else None
        if missed is not None and name is not None:
            missed.setdefault(name, []).append(f"{what}{' ' * bool(kind)}{kind} ({why})")


def _error(state: Any) -> BaseException | None:
    """The exception a failed task run's state holds, if it can be read."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # a result that cannot be read: the message says what Prefect knows
        return None
    return error if isinstance(error, BaseException) else None


def _failure(state: Any) -> str:
    """Why a task run failed: its exception's type and words where the state holds it
    (Prefect's message wraps a TimeoutError's: "Task run failed due to timeout:
    TimeoutError('...')"), else the state's message."""
    error = _error(state)
    if error is not None:
        return f"{type(error).__name__}: {error}"
    return str(state.message)


def who(key: Any, names: Mapping[int, str] | None = None) -> str:
    """A client task's key as its log lines name it: ``train client-3``, ``client-3``, or with
    ``names`` (a real site's) ``train shop-a``, ``shop-a``."""

    def client(i: Any) -> str:
        return (names or {}).get(int(i), f"client-{int(i)}")

    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], int | np.integer):
        return f"{key[0]} {client(key[1])}"
    return client(key) if isinstance(key, int | np.integer) else str(key)


def quorum(config: TrainingConfig, asked: int) -> int:
    """How many of ``asked`` clients must answer: ``min_clients`` and ``min_fraction`` both hold."""
    return max(min(config.min_clients, asked), math.ceil(config.min_fraction * asked))


def require_quorum(
    answers: int,
    asked: int,
    config: TrainingConfig,
    what: str,
    failed: Mapping[Any, str] | None = None,
    names: Mapping[int, str] | None = None,
) -> None:
    """Raise :class:`QuorumError` when fewer than the quorum answered; its one line names the
    first of the ``failed`` clients (by its ``names`` entry, if any) and why (a refusal's
    reason, a timeout)."""
    if answers < quorum(config, asked):
        first = next(iter(failed.items()), None) if failed else None
        why = "" if first is None else f"; {who(first[0], names)}: {first[1]}"
        more = f" (and {len(failed) - 1} more)" if failed and len(failed) > 1 else ""
        raise QuorumError(
            f"{what}: {answers} of {asked} clients answered, the quorum is {quorum(config, asked)} "
            f"(min_clients={config.min_clients}, min_fraction={config.min_fraction}){why}{more}"
        )


def gather_round(
    submit: Callable[[Any, int], PrefectFuture],
    keys: Sequence[Any],
    counts: Callable[[Any], bool],
    config: TrainingConfig,
    what: str,
    fold: Callable[[Any, Any], Any] | None = None,
    names: Mapping[int, str] | None = None,
    missed: dict[str, list[str]] | None = None,
) -> dict[Any, Any]:
    """Submit one task per key (``submit(key, attempt)``) and collect the answers. If fewer of the counted keys (the
    trainers) answered than the quorum, ask the missing ones again, up to ``round_retries`` times;
    then give up with :class:`QuorumError`. Nothing is committed before this returns, so an
    aborted round commits nothing.

    With ``fold`` (cohorts of per-user clients), tasks go out in waves of :data:`WAVE` and each
    answer is replaced by ``fold(key, answer)`` as its wave completes (the answer's arrays are
    added into a running sum), so a round holds a few answers at a time, not every cohort's.
    The named clients the round went on without are added to ``missed`` (:func:`note_missed`).
    """
    asked = sum(1 for k in keys if counts(k))
    results: dict[Any, Any] = {}
    failed: dict[Any, str] = {}  # the last attempt's reason, for the quorum's one line
    pending = list(keys)
    for attempt in range(config.round_retries + 1):
        deadline = None if config.round_timeout is None else time.monotonic() + config.round_timeout
        size = WAVE if fold is not None else max(1, len(pending))
        for start in range(0, len(pending), size):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            wave = answered(
                {k: submit(k, attempt) for k in pending[start : start + size]},
                what,
                left,
                failed,
                names,
            )
            if fold is not None:
                wave = {k: fold(k, a) for k, a in wave.items()}
                # A finished future and its done-callbacks form reference cycles that hold the
                # answer (tens of MB) until the cyclic collector runs, which large numpy arrays do
                # not trigger: collect the young generations so a folded wave is freed now.
                gc.collect(1)
            results |= wave
        got = sum(1 for k in results if counts(k))
        if got >= quorum(config, asked):  # a client asked again that then answered missed nothing
            note_missed(missed, names, what, {k: w for k, w in failed.items() if k not in results})
            return results
        pending = [k for k in keys if k not in results]
        if attempt < config.round_retries:
            get_run_logger().warning("%s: %d of %d clients answered, quorum %d: asking %d again",
                                     what, got, asked, quorum(config, asked), len(pending))  # fmt: skip
    trainers = {k: why for k, why in failed.items() if counts(k) and k not in results}
    require_quorum(sum(1 for k in results if counts(k)), asked, config, what, trainers, names)
    return results


def train_and_evaluate(
    ctx: RunContext,
    r: int,
    chosen: set[int],
    evaluate_others: bool,
    train: Callable[[ClientEntry, int], PrefectFuture],
    evaluate: Callable[[ClientEntry], PrefectFuture],
    running: RunningSum | None = None,
) -> tuple[dict[int, Any], list[Any]]:
    """One round's client tasks: the sampled clients train (each evaluating the model it receives
    first), and with ``evaluate_others`` the clients sitting the round out evaluate it too.
    ``train(entry, attempt)`` and ``evaluate(entry)`` submit one task. Returns what each trainer
    sent (by client) and every evaluation, with the quorum of :func:`gather_round`. With
    ``running``, trainers' updates are added into it as they arrive and what each sent is only its
    size and metrics (:class:`~models.cohorts.Uploaded`)."""

    def fold(key: tuple[str, int], answer: Any) -> Any:
        if key[0] != "train" or running is None:
            return answer
        update, evaluations = answer
        return running.add(update), evaluations

    def submit(key: tuple[str, int], attempt: int) -> PrefectFuture:
        kind, i = key
        return train(ctx.entries[i], attempt) if kind == "train" else evaluate(ctx.entries[i])

    keys = [("train", i) for i in sorted(chosen)]
    keys += [
        ("evaluate", i) for i in range(len(ctx.entries)) if evaluate_others and i not in chosen
    ]
    answers = gather_round(submit, keys, lambda k: k[0] == "train", ctx.config, f"round {r}",
                           None if running is None else fold, ctx.client_names, ctx.missed)  # fmt: skip
    sent = {i: a[0] for (kind, i), a in answers.items() if kind == "train"}
    evaluations = [a[1] if kind == "train" else a for (kind, _), a in answers.items()]
    return sent, evaluations


def retry_options(config: TrainingConfig) -> dict[str, Any]:
    """Task options of a client task: retries with exponential backoff."""
    delays = [config.retry_backoff * 2**i for i in range(config.task_retries)]
    return {"retries": config.task_retries, "retry_delay_seconds": delays or 0}


def fault_plan(config: TrainingConfig) -> FaultPlan:
    return FaultPlan(
        config.fault_probability, config.fault_delay, tuple(config.fault_clients), config.seed
    )


_STEP_MARKS: dict[str, list[float]] = {}  # run id -> wall-clock time each step was logged at
_OF_TOTAL = re.compile(r"(\d+)/(\d+)")


def _clock(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


PACE_STEPS = 3  # the ETA's step time: the median of the last few, so a slower phase shows soon


def pace(marks: Sequence[float], started: float, label: str) -> str:
    """Elapsed time since ``started`` and, when ``label`` reads "N/TOTAL", the time left at the
    median of the last :data:`PACE_STEPS` steps (a family's later phase, a re-ranker's rounds
    after implicit ALS's, may be slower): ``marks`` are the times steps ended, the first one the
    first step's start."""
    now = marks[-1]
    shown = f"elapsed {_clock(now - started)}"
    found = _OF_TOTAL.search(label)
    if found is None or len(marks) < 2:
        return shown
    left = int(found[2]) - int(found[1])
    if left <= 0:
        return shown
    step = float(np.median(np.diff(marks)[-PACE_STEPS:]))
    return f"{shown}, ETA {_clock(step * left)} ({step:.1f} s/round)"


def _run_started() -> float | None:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    start = getattr(getattr(context, "flow_run", None), "start_time", None)
    return None if start is None else start.timestamp()


def step_record(
    ctx: RunContext,
    step: int,
    round_: tuple[Sequence, float],
    evaluations: Sequence,
    top_k: int,
    extra: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of :func:`~tasks.server.record_step` (but the snapshot) that
    summarise and log step ``step``: its uploads and time (``round_``) and its model's
    evaluations. A resumed run does not log again the steps the interrupted one logged. A
    private run logs no per-client spread: each client's evaluation is its own noisy release."""
    updates, seconds = round_
    return dict(
        step=step, updates=updates, evaluations=evaluations, top_k=top_k, n_items=ctx.n_items,
        seconds=seconds, extra=dict(extra or {}),
        log_to=(ctx.uri, ctx.run_id) if step > ctx.logged_through else None,
        spread=ctx.config.dp_epsilon is None,
        logged_at=int(time.time() * 1000),  # one timestamp for every attempt of the task
    )  # fmt: skip


def report_step(ctx: RunContext, label: str, metrics: Mapping[str, float], seconds: float) -> None:
    """One line for a recorded step: its headline metrics, clients, uploads and time, with the
    run's elapsed time and an ETA."""
    at = ctx.config.top_k
    shown = [
        f"{k} {metrics[k]:.4f}"
        for k in (
            "train/rmse",
            "valid/rmse",
            f"valid/ndcg_at_{at}",
            f"select/ndcg_at_{at}",
            f"test/ndcg_at_{at}",
        )
        if k in metrics
    ]
    now = time.time()
    marks = _STEP_MARKS.setdefault(ctx.run_id, [now - seconds])
    marks.append(now)
    started = _run_started() or marks[0]
    work = "trained before the run was resumed (its clients and time went with the process)"
    if metrics.get("system/clients"):
        work = (f"{metrics['system/clients']:.0f} clients, "
                f"{metrics.get('system/bytes_uploaded', 0.0) / 1e6:.1f} MB up, "
                f"{metrics.get('system/round_seconds', float('nan')):.2f} s")  # fmt: skip
    get_run_logger().info("%s: %s, %s; %s", label, ", ".join(shown) or "no evaluation", work,
                          pace(marks, min(started, marks[0]), label))  # fmt: skip
    if "final" in label:
        _STEP_MARKS.pop(ctx.run_id, None)


def log_step(
    ctx: RunContext,
    step: int,
    round_: tuple[Sequence, float],
    evaluations: Sequence,
    top_k: int,
    label: str,
    extra: Mapping[str, float] | None = None,
    snapshot: Snapshot | None = None,
) -> dict[str, float]:
    """Summarise step ``step`` (its uploads and time, its model's evaluation), log it, then
    checkpoint ``snapshot`` (the state after the next step) if given, all in one server task
    run; report the step in one line (:func:`report_step`)."""
    record = step_record(ctx, step, round_, evaluations, top_k, extra)
    metrics = record_step(**record, snapshot=snapshot)
    report_step(ctx, label, metrics, round_[1])
    return metrics


def _own_files(source: str | None) -> bool:
    """Whether a recorded data source is CSV/Parquet files (not a named or built-in dataset)."""
    parts = (source or "").split(" + ")
    return all(part.lower().endswith(TABLE_SUFFIXES) for part in parts)
