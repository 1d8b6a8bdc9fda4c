"""The federated training flow: shard the data, run the configured model family (explicit:
federated MF; implicit: implicit ALS, item-kNN and an optional LightGBM re-ranker) through the
round loop, evaluate the champion the same way, register, and promote only if the candidate is
better."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import ValidationError

from fedrec.cli_errors import hide_input_tracebacks, one_line_config_error
from fedrec.config import TrainingConfig, fedrec_home
from fedrec.inputs import ConfigError
from fedrec.model_store import check_tracking_uri, record_store, sqlite_path
from fedrec.runtime import one_blas_thread, record_foreground_process
from flows.families import build_family
from flows.loop import train_family
from flows.rounds import COMPARED_CLIENTS, EVALUATED_CLIENTS, RunContext, privacy_plan
from flows.sites import SITES_MISSED, missed_text, prune_exchange, start_sites_run
from models.data.partitions import mark_finished, read_item_ids, read_manifest, remove_workspace
from models.files import UnsafeFile, check_private_folders
from models.privacy.ledger import user_ids
from models.privacy.redaction import redact_uri
from models.promotion import WORSE_THAN_BASELINE, PromotionDecision
from tasks.data import check_sharding, data_fingerprint, load_interactions, shard_clients
from tasks.reporting import publish_summary
from tasks.server import client_table, decide, latest_checkpoint
from tasks.tracking import (
    CANCELLED,
    CHAMPION_PLANNED,
    DP_NOT_COVERED,
    HELD_OUT_TAG,
    WARM_START_TAG,
    Champion,
    ResumeError,
    check_ledger_secret,
    close_ended_runs,
    failure,
    finish_run,
    flow_run_state,
    interrupted_run,
    ledger_fingerprint,
    ledger_request,
    load_champion,
    log_artifacts,
    record_promotion,
    register_model,
    reopen_run,
    repair_orphans,
    repeated_version,
    reserve_privacy_budget,
    resolve_tracking_uri,
    run_tag,
    start_run,
    tag_run,
    untag_run,
    version_description,
    version_tags,
)


def federated_training_fn(**params: Any) -> State:
    """Train a federated recommender, track it in MLflow, register it, and promote it if better.

    Parameters are the fields of ``fedrec.config.TrainingConfig``; pass a config as
    ``federated_training(**config.model_dump())``. The run's result is its summary; its final
    state's message says the outcome in one line (:func:`outcome`), so that whoever polls the
    Prefect API tells a promotion from a model kept and from a run with nothing to train.
    """
    hide_input_tracebacks()  # a deployment's worker logs bad input in one line too
    try:
        config = TrainingConfig(**params)
    except ValidationError as err:  # the run's state message: one line, as the CLI gives it
        raise ConfigError(f"invalid configuration: {one_line_config_error(err)}") from None
    record_foreground_process(flow_run.get_id())  # a later command can tell if this process dies
    # a tracking server that does not answer fails the run in seconds, not after MLflow's
    # minutes of retries in every task (a deployment's run holds its concurrency slot meanwhile);
    # a SQLite store's folder is the run's to make (FEDREC_HOME, say), as the flow always did
    uri = resolve_tracking_uri(config.tracking_uri)
    if sqlite_path(uri) is None:
        check_tracking_uri(uri)
    with one_blas_thread():  # client tasks run in parallel threads: one BLAS thread each
        summary = _train(config)
    return Completed(message=outcome(summary), data=summary)


def outcome(summary: dict[str, Any]) -> str:
    """A run's outcome in one line, as the command line's last lines give it (at most 500
    characters): the version and whether it was promoted and why, or why nothing was trained."""
    if summary.get("skipped"):
        line = f"{summary['reason']} (model {summary['model_name']})"
    else:
        verdict = "promoted to champion" if summary["promoted"] else "not promoted"
        line = (
            f"model {summary['model_name']} version {summary['model_version']}: {verdict} "
            f"({summary['reason']})"
        )
    return line if len(line) <= 500 else line[:497] + "..."


federated_training_fn.__signature__ = TrainingConfig.signature()  # type: ignore[attr-defined]
federated_training = flow(
    federated_training_fn,
    name="federated-training",
    task_runner=ThreadPoolTaskRunner(max_workers=min(8, os.cpu_count() or 1)),
    log_prints=True,
)


def _local_cluster(**kwargs: Any) -> Any:
    """A Dask LocalCluster whose worker processes report their task runs to this flow's Prefect
    API: on Prefect's temporary server, each worker would otherwise start a temporary server of
    its own (seconds and memory per worker, on the same database)."""
    import distributed
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is not None and context.client is not None:
        os.environ.setdefault("PREFECT_API_URL", str(context.client.api_url).rstrip("/"))
    return distributed.LocalCluster(**kwargs)


def training_flow(
    task_runner: str = "thread", dask_address: str | None = None, max_workers: int | None = None
) -> Any:
    """The training flow on the asked-for task runner.

    ``dask``: prefect-dask's runner, on the scheduler at ``dask_address`` or else on a local
    cluster of ``max_workers`` (default 2) single-threaded worker processes. Client tasks get the
    workspace path and their partition's entry, so each partition is read on the worker that runs
    it; only global state and aggregates cross the wire.
    """
    if task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            runner = DaskTaskRunner(address=dask_address)
        else:
            runner = DaskTaskRunner(cluster_class=_local_cluster,
                                    cluster_kwargs={"n_workers": max_workers or 2, "threads_per_worker": 1,
                                                    "processes": True, "dashboard_address": None})  # fmt: skip
        return federated_training.with_options(task_runner=runner)
    if max_workers is not None:
        return federated_training.with_options(
            task_runner=ThreadPoolTaskRunner(max_workers=max_workers)
        )
    return federated_training


# what DP does not cover in a private run whose model lists the data's own items
OWN_ITEM_LIST = (
    "the model's item list: every item the rows touch, so an item only one user rated shows that "
    "user's row (--catalogue FILE lists a public one instead)"
)
# what DP does not cover in every private run: one user more or less changes it exactly
USER_COUNT = (
    "the number of users: the privacy ledger's entries record it, and with the default delta "
    "(1 / users) so do privacy/delta and the noise multiplier calibrated to it"
)


def _resume(config: TrainingConfig) -> tuple[TrainingConfig, RunContext]:
    """The interrupted run's configuration and context: its run, partitions and last checkpoint."""
    found = interrupted_run(resolve_tracking_uri(config.tracking_uri), config.resume)
    original = TrainingConfig.model_validate_json(found.config_json)
    workspace = original.workspace or str(fedrec_home() / "workspaces" / found.run_id)
    if not (Path(workspace) / "manifest.json").is_file():
        raise ResumeError(f"--resume {found.run_id}: its client partitions are gone ({workspace})")
    reopen_run(found.uri, found.run_id, str(flow_run.get_id() or ""))
    ctx = RunContext(
        original, found.uri, found.run_id, workspace, read_manifest(workspace),
        read_item_ids(workspace), load_champion(found.uri, original.registered_name),
        logged_through=found.logged_through,
        # the privacy plan is the start's: a champion it did not count is not evaluated
        evaluate_champion=original.dp_epsilon is None or found.champion_planned,
        dp_not_covered=found.dp_not_covered,
    )  # fmt: skip
    return original, ctx


def _train(config: TrainingConfig) -> dict[str, Any]:
    """The flow's body: load, shard, the family's training stage, registration, promotion."""
    if config.resume:
        config, ctx = _resume(config)
        return _train_and_register(config, ctx, resuming=True)
    check_private_places(config)  # before a reservation or a run: a refusal spends nothing
    if config.sites is not None:  # real sites enrol and train; no row is read here
        return _train_and_register(config, start_sites_run(config))
    logger = get_run_logger()
    name = config.registered_name
    data, explicit_split = load_interactions(config)
    check_sharding(data, config)  # before a reservation or a run: a refusal writes nothing
    for note in data.notes:  # what reading changed or assumed (duplicates dropped, ...)
        logger.info("data: %s", note)
    rows = data_fingerprint(data, config, explicit_split)
    uri = resolve_tracking_uri(config.tracking_uri)
    private = config.dp_epsilon is not None
    not_covered = USER_COUNT if private else ""
    if private and config.catalogue is None and data.public_items is None:
        not_covered = f"{OWN_ITEM_LIST}; {USER_COUNT}"
        logger.warning(
            "the model will list every item of %s, and DP does not cover that list: an item only "
            "one user rated shows that user's row; give --catalogue FILE (a public list of the "
            "items: the data's item column or item_id) to list those instead",
            redact_uri(data.source),
        )
    # a private run logs its fingerprint keyed with its ledger's secret (None before the first
    # private run made one): a plain hash of the rows would let a reader of MLflow test guesses
    fingerprint = ledger_fingerprint(uri, config.dp_ledger_secret, rows) if private else rows
    # first, so that a run that then has nothing to train still makes MLflow and the registry
    # true: runs whose process is gone, and the versions they left undecided
    for lost in close_ended_runs(uri):
        logger.warning("MLflow run %s said RUNNING, but its flow run is over: marked KILLED", lost)
    repaired = repair_orphans(uri, name)
    if repaired:
        logger.warning(
            "%s: version(s) %s had no recorded promotion decision (their run ended first): "
            "recorded now", name, ", ".join(
                f"{v} ({'champion' if promoted else 'orphan, not promoted'})"
                for v, promoted in repaired.items()
            ),
        )  # fmt: skip
    if config.skip_if_unchanged and fingerprint is not None:
        skipped = _nothing_to_train(uri, name, fingerprint, config.config_hash())
        if skipped is not None:
            logger.info(skipped["reason"])
            return skipped
    if private:  # before any run starts: refuse past the users' cap
        spent = reserve_privacy_budget(
            uri, ledger_request(config, data.n_users), user_ids=user_ids(data), model_name=name,
            fingerprint=rows, about={"source": redact_uri(data.source)},
            secret_path=config.dp_ledger_secret,
        )  # fmt: skip
        logger.info("privacy ledger: the users closest to their cap have now spent %s",
                    spent.describe())  # fmt: skip
        fingerprint = ledger_fingerprint(uri, config.dp_ledger_secret, rows)  # the secret exists
    assert fingerprint is not None
    uri, run_id = start_run(config, fingerprint, flow_run.get_id())
    try:
        workspace = config.workspace or str(fedrec_home() / "workspaces" / run_id)
        manifest = shard_clients(data, explicit_split, config, workspace, fingerprint=fingerprint)
        del data  # from here on, only client tasks read rows, each its own partition
        tag_run(uri, run_id, {"fedrec.workspace": workspace}
                | ({DP_NOT_COVERED: not_covered} if not_covered else {}))  # fmt: skip
        record_store(workspace, uri)  # for the --resume command `fedrec workspaces` gives
        ctx = RunContext(
            config, uri, run_id, workspace, manifest, read_item_ids(workspace), load_champion(uri, name),
            dp_not_covered=not_covered,
        )  # fmt: skip
        clients = f"{manifest.n_clients} clients"
        if config.partition == "per-user":
            clients = f"{manifest.n_users} per-user clients in {manifest.n_clients} cohorts"
        logger.info("%s, %d items, MLflow run %s", clients, ctx.n_items, run_id)
    except BaseException as err:
        finish_run(uri, run_id, False, _why_ended(err, config))
        raise
    return _train_and_register(config, ctx)


def _why_ended(err: BaseException, config: TrainingConfig) -> str:
    """The ``fedrec.error`` of a run that ``err`` ended, whatever stage it reached: a cancel
    (:data:`CANCELLED`, the run KILLED) or a failure's one line."""
    return CANCELLED if _cancelled(err) else failure(err, config.dp_epsilon is not None)


def _cancelled(err: BaseException) -> bool:
    """Whether ``err`` is the signal that stops a flow run its operator cancelled: Prefect marks
    the run Cancelling, then its worker terminates the process (a stop by systemd or ``kill``
    comes as the same signal, on a run still Running)."""
    from prefect.exceptions import TerminationSignal

    if not isinstance(err, TerminationSignal):
        return False
    # one read: Prefect's client already retries a busy server (a 503, a dropped connection)
    state = flow_run_state(flow_run.get_id())  # None (the server out of reach): a failure
    return state is not None and state.type.value in ("CANCELLING", "CANCELLED")


def _learnt_from(champion: Champion | None, metric: str) -> str:
    """Why ``champion`` is favoured on ``metric``: its re-ranker learnt from the validation rows
    (all but the selection users'), so a ``valid/`` figure flatters it; empty if it is not."""
    if champion is None or not metric.startswith("valid/"):
        return ""
    if getattr(champion.recommender, "ranker", None) is None:
        return ""
    return "has a re-ranker that learnt from validation rows"


def check_private_places(config: TrainingConfig) -> None:
    """Refuse a private or securely aggregated run whose private files would sit where others
    could swap them, before it spends budget or starts: its clients' kept answers and held
    updates and the registry of the keys its server steps trust (in the workspace), and the
    ledger's secret (:func:`models.files.read_private`'s rules; :class:`models.files.UnsafeFile`
    or ``BudgetError``, one line each). A run of real sites keeps only that registry here (its
    sites keep their answers and count their own users' budgets), so only a securely aggregated
    one is checked."""
    sites = config.sites is not None
    if not config.secure_aggregation and (config.dp_epsilon is None or sites):
        return
    workspace = Path(config.workspace) if config.workspace else fedrec_home() / "workspaces"
    try:
        check_private_folders(workspace, "run's workspace", is_folder=True)
    except UnsafeFile as err:
        raise UnsafeFile(
            f"{err} (give --workspace DIR in a folder of your own, or use a FEDREC_HOME of "
            "your own)",
            err.folder,
        ) from None
    if config.dp_epsilon is not None and not sites:
        check_ledger_secret(resolve_tracking_uri(config.tracking_uri, create=False),
                            config.dp_ledger_secret)  # fmt: skip


def _synthetic(source: str | None) -> bool:
    """Whether a recorded data source is the built-in synthetic generator's."""
    return bool(source) and source.startswith("synthetic(")  # type: ignore[union-attr]


def _nothing_to_train(uri: str, name: str, fingerprint: str, config_hash: str) -> dict | None:
    """The summary of a run that would repeat one already made (:func:`repeated_version`),
    with that version's figures, for whoever reads ``--json``; None when there is none."""
    repeat = repeated_version(uri, name, fingerprint, config_hash)
    if repeat is None:
        return None
    v, same = repeat.version, "was trained on these data with this config and"
    reason = {
        "champion": f"data and config unchanged since champion version {v}",
        "rolled back": f"version {v} {same} rolled back by hand (fedrec rollback)",
        "lost": f"version {v} {same} not promoted against champion version {repeat.champion}",
    }[repeat.why]
    return {"skipped": True, "reason": f"{reason}: nothing to train", "model_name": name,
            "champion_version": repeat.champion, "tracking_uri": redact_uri(uri),
            "promoted": False, "same_as_version": v, "metrics": repeat.metrics}  # fmt: skip


def _train_and_register(
    config: TrainingConfig, ctx: RunContext, resuming: bool = False
) -> dict[str, Any]:
    """Train the family, register the candidate and promote it if it is better."""
    logger, name = get_run_logger(), config.registered_name
    uri, run_id, workspace, manifest = ctx.uri, ctx.run_id, ctx.workspace, ctx.manifest
    source = ctx.source
    if ctx.champion_on_other_data:  # a warning when its item ids may mean other items
        logger.log(
            logging.WARNING if ctx.champion_on_other_dataset else logging.INFO,
            "the champion, version %s of %s, was trained on %s; this run's data is %s. It is "
            "compared on this run's clients (--model-name keeps a separate champion per dataset)",
            ctx.champion.version, name, ctx.champion.source, source,
        )  # fmt: skip
    held_out = config.held_out_rows()
    champion_held_out = ctx.champion.held_out if ctx.champion is not None else None
    other_rows = champion_held_out not in (None, held_out)
    if other_rows:
        logger.warning(
            "the champion, version %s of %s, held out other rows (%s; this run: %s): it may have "
            "trained on some of this run's held-out rows, which favours it in the comparison "
            "(--model-name starts a separate champion)",
            ctx.champion.version, name, champion_held_out, held_out,
        )  # fmt: skip
    champion_metric = ctx.champion.promotion_metric if ctx.champion is not None else None
    # a champion whose re-ranker learnt from validation rows, compared on validation rows
    flattered = _learnt_from(ctx.champion, config.promotion)
    if flattered:
        logger.warning(
            "the champion, version %s of %s, %s, which favours it on %s; --promotion-metric "
            "%s compares on rows neither model learnt from (--model-name starts a separate "
            "champion)",
            ctx.champion.version, name, flattered, config.promotion,
            config.promotion.replace("valid/", "test/", 1),
        )  # fmt: skip
    elif champion_metric not in (None, config.promotion):
        logger.warning(
            "the champion, version %s of %s, was promoted on %s; this run compares on %s "
            "(--promotion-metric), so a model that lost on %s may replace it",
            ctx.champion.version, name, champion_metric, config.promotion, champion_metric,
        )  # fmt: skip
    succeeded, error = False, None
    try:
        plan = privacy_plan(ctx)
        if plan is not None and not resuming:  # a resumed run keeps this plan
            tag_run(uri, run_id, {CHAMPION_PLANNED: str(int(ctx.champion is not None))})
        family = build_family(ctx, plan)
        if resuming:
            found = latest_checkpoint(family=family, folder=f"{workspace}/checkpoints")
            ctx = replace(ctx, resume_state=found)
        trained = train_family(
            ctx,
            family,
            plan.spent if plan is not None else lambda _: {},
            None if plan is None else plan.release,
        )

        champion = ctx.champion
        if config.promotion not in trained.final:
            logger.warning(
                "no %s was measured (no held-out rows, or their evaluation failed): version "
                "registered, and it cannot be promoted; more rows per client give a held-out split",
                config.promotion,
            )
        if trained.comparable:  # e.g. the champion is of another model family: never replace it
            decision = PromotionDecision(False, f"not comparable: {trained.comparable}")
        else:
            decision = decide(
                trained.candidate_compared,  # on the clients the champion's figures are from
                trained.champion_metrics,
                config.promotion,
                config.min_delta,
                config.max_client_regression,
                private=plan is not None,
            )
            if trained.compared is not None:
                both, of = (int(trained.compared[k]) for k in (COMPARED_CLIENTS, EVALUATED_CLIENTS))
                decision = PromotionDecision(
                    decision.promote, f"{decision.reason} (compared on the {both} of {of} "
                    "clients that answered both evaluations)",
                )  # fmt: skip
            lost_to_it = trained.champion_metrics is not None and not (
                decision.promote or decision.reason.startswith(WORSE_THAN_BASELINE)
            )
            if other_rows and lost_to_it:
                decision = PromotionDecision(
                    False, f"{decision.reason} (the champion held out other rows: "
                    f"{champion_held_out}; it may have trained on some of this run's)",
                )  # fmt: skip
            elif flattered and lost_to_it:
                decision = PromotionDecision(False, f"{decision.reason} (the champion {flattered})")
            demo_over_real = (
                ctx.champion_on_other_dataset
                and _synthetic(source)
                and not (_synthetic(ctx.champion.source))
            )
            if decision.promote and demo_over_real:  # `make demo` after a real run, same name
                decision = PromotionDecision(
                    False, f"{decision.reason}, but the champion, version {ctx.champion.version}, "
                    f"was trained on real data ({ctx.champion.source}) and this version on the "
                    "built-in synthetic data (--model-name keeps a demo apart)",
                )  # fmt: skip
            elif decision.promote and ctx.champion_on_other_dataset:  # what is served changes
                decision = PromotionDecision(
                    True, f"{decision.reason} (it replaces a champion trained on other data, "
                    f"{ctx.champion.source}; --model-name keeps one champion per dataset)",
                )  # fmt: skip
        if decision.promote and config.simulated_attack:  # a test's or benchmark's poisoning
            decision = PromotionDecision(
                False, f"{decision.reason}, but it was trained under a simulated attack "
                f"({config.simulated_attack}): registered for inspection, never promoted",
            )  # fmt: skip
        identity = {
            "fedrec.dataset_fingerprint": manifest.fingerprint,
            "fedrec.config_hash": config.config_hash(),
            "fedrec.algorithm": config.algorithm,
            "fedrec.feedback": config.feedback,
            "fedrec.ranker": config.ranker,
            "fedrec.run_id": run_id,
            "fedrec.source": source,
            "fedrec.promotion_metric": config.promotion,
            HELD_OUT_TAG: held_out,
        } | ({} if config.dp_epsilon is None else {"fedrec.epsilon": str(config.dp_epsilon)})
        if config.simulated_attack:
            identity["fedrec.simulated_attack"] = config.simulated_attack
        warm_started_from = run_tag(uri, run_id, WARM_START_TAG)  # set by the loop, resumes too
        if warm_started_from is not None:
            identity[WARM_START_TAG] = warm_started_from
        if ctx.dp_not_covered:  # on the version, where readers of the registry look
            identity[DP_NOT_COVERED] = ctx.dp_not_covered
        version = register_model(
            uri,
            run_id,
            trained.candidate,
            name,
            version_tags(trained.final, identity, config.promotion),
        )
        decision = record_promotion(
            uri,
            name,
            version,
            decision,
            champion.version if champion else None,
            description=version_description(config, source, trained.final),
        )
        logger.info("model %s version %s: %s (%s)", name, version,
                    "promoted to champion" if decision.promote else "not promoted", decision.reason)  # fmt: skip
        # the run says what became of it, as its version says which run it was
        tag_run(uri, run_id, {"fedrec.model_version": f"{name}/{version}",
                              "fedrec.promoted": str(decision.promote).lower()})  # fmt: skip

        per_client = client_table(
            list(trained.client_evaluations.values()),
            list(trained.client_evaluations),
            config.top_k,
            "test",
        )
        profile = manifest.profile()
        if config.dp_epsilon is not None:  # per-client rows are not part of what DP counts
            profile, per_client = profile.iloc[0:0], per_client.iloc[0:0]
        log_artifacts(uri, run_id, config, profile, trained.history, per_client,
                      trained.importance)  # fmt: skip
        final = trained.final
        summary = {
            "run_id": run_id,
            "tracking_uri": redact_uri(uri),  # the summary is printed and published
            "model_name": name,
            "model_version": version,
            "promoted": decision.promote,
            "reason": decision.reason,
            "champion_version": version if decision.promote else getattr(champion, "version", None),
            "metrics": {k: v for k, v in final.items() if not k.endswith(("_p10", "_median"))},
            "top_k": config.top_k,  # the K of the ranking metrics' names (*_at_K)
            "champion_metrics": trained.champion_metrics,
            # the candidate's figures on the clients that answered the champion's evaluation too
            **({"compared_metrics": trained.compared} if trained.compared is not None else {}),
            "workspace": workspace if config.keep_workspace else None,
        }
        if config.dp_epsilon is not None:  # said where the run's result is read, not only logged
            summary["dp_not_covered"] = ctx.dp_not_covered or None
        if ctx.sites is not None:  # which sites took part, why the others did not, what each missed
            summary["sites"] = {"enrolled": sorted(s.name for s in ctx.sites.entries.values()),
                                "left_out": dict(ctx.sites.left_out), "missed": dict(ctx.missed)}  # fmt: skip
        publish_summary(trained.history, summary, decision.reason)
        succeeded = True
        return summary
    except BaseException as err:
        error = _why_ended(err, config)
        raise
    finally:
        if ctx.missed:  # which steps each site missed, and why, where the run's readers look
            tag_run(uri, run_id, {SITES_MISSED: missed_text(ctx.missed)})
        finish_run(uri, run_id, succeeded, error)
        if ctx.sites is not None:  # exchanges still waiting (a failed or interrupted run) end
            ctx.sites.stop()
        if ctx.sites is not None and not config.keep_workspace:  # no resume: whatever the end
            prune_exchange(ctx.sites)
        if succeeded and not config.keep_workspace:
            _remove_workspace(workspace, uri, run_id)
        elif succeeded:
            mark_finished(workspace)


def _remove_workspace(workspace: str, uri: str, run_id: str) -> None:
    """Delete a succeeded run's workspace: the clients' copies of their rows and the checkpoints
    are of no further use. The run's ``fedrec.workspace`` tag goes with it, so that it names no
    folder that is gone. A folder that cannot be removed is left, with a warning."""
    logger = get_run_logger()
    try:
        if not remove_workspace(workspace):
            return
    except OSError as err:
        logger.warning("could not remove the run's workspace %s: %s", workspace, err)
        return
    logger.info("removed the run's workspace %s (--keep-workspace keeps it)", workspace)
    try:
        untag_run(uri, run_id, "fedrec.workspace")
    except (MlflowException, OSError) as err:  # the run succeeded: a stale tag cannot fail it
        logger.warning("could not remove the run's fedrec.workspace tag: %s", err)
