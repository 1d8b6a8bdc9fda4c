"""Every MLflow call of fedrec: runs, per-round metrics, artifacts, the registered model, aliases,
and the privacy ledger (the experiment ``fedrec-privacy-ledger``).

The default store is ``sqlite:///$FEDREC_HOME/mlflow.db`` with artifacts in
``$FEDREC_HOME/mlartifacts``; ``MLFLOW_TRACKING_URI`` or the config's ``tracking_uri`` overrides.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, Run, RunStatus, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema
from prefect import task
from prefect.cache_policies import NONE

from fedrec.config import TrainingConfig, fedrec_home
from fedrec.model_store import (
    EARLIER_FLOW_RUNS_TAG,
    PAUSED_TAG,
    STATE,
    load_recommender,
    resolve_tracking_uri,
    resume_command,
    sqlite_path,
)
from fedrec.runtime import SITES_TRAINED_AGAIN
from models.data.partitions import remove_workspace
from models.federation.family import Recommender
from models.files import (
    UnsafeFile,
    check_private_folders,
    check_private_path,
    make_private_folder,
    read_private,
    write_private,
)
from models.privacy.ledger import (
    USER_KEY,
    Balance,
    BudgetError,
    Cap,
    Entry,
    Group,
    Request,
    Stored,
    check_groups_after_writing,
    keyed_fingerprint,
    plan_user_reservation,
    recovered_spend,
    run_delta,
    secret_id,
    standing,
    user_keys,
)
from models.privacy.redaction import redact_text, redact_uri
from models.promotion import PromotionDecision, baseline_metric, worst_client_metric
from tasks import retry_unless

CHAMPION = "champion"
_SERVING = Path(__file__).resolve().parents[1] / "fedrec" / "serving"
_MODELS_PACKAGE = Path(__file__).resolve().parents[1] / "models"
_STATE = STATE  # the model's artifact folder holding the recommender's state files
# MLflow 3's UI opens an experiment of this kind on its training runs, not on the GenAI
# traces overview (its other kinds: "genai_development", ...)
_EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
_RETRY = {"retries": 2, "retry_delay_seconds": [1, 5], "cache_policy": NONE}


def _client(uri: str) -> MlflowClient:
    # MLflow prints "View run ... at: <the URI>" to stdout when a run on a server ends: a
    # credentialed URI's secret, and a second run link beside the one fedrec's summary gives
    if uri.startswith(("http://", "https://")) or redact_uri(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    # the fluent log_model/load_model calls read the global URIs: both point at this run's store
    # (a registry URI left by an earlier call in the process would register the model elsewhere)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def code_version() -> str:
    """The git commit of the code that trained, with ``-dirty`` when the tree has changes."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version

        return f"fedrec-{version('fedrec')}"
    return sha + ("-dirty" if dirty else "")


def _run_name(config: TrainingConfig, clients: int | None = None) -> str:
    """``als-k32-10c-10r``: the model, its width (factors; a network's latent units), the clients
    (``clients`` when given: the sites that enrolled) and the rounds (``3+2r`` with a re-ranker:
    the retrieval's rounds, then the re-ranker's)."""
    if clients is None and config.clients is None:  # by-key, one client per value
        n = f"by-{config.partition_key}"
    else:
        n = f"{config.clients if clients is None else clients}c"
    if config.implicit_model == "neural":  # mult-dae-z200-10c-10r
        return f"mult-{config.neural_network}-z{config.neural_latent}-{n}-{config.rounds}r"
    if config.feedback == "implicit":
        if config.ranker == "none":
            return f"ials+knn-k{config.ranking_config().n_factors}-{n}-{config.rounds}r"
        rounds = f"{config.rounds}+{config.ranker_rounds}r"
        return f"ials+knn+lgbm-k{config.ranking_config().n_factors}-{n}-{rounds}"
    return f"{config.algorithm}-k{config.mf_config().n_factors}-{n}-{config.rounds}r"


def _artifact_home(uri: str) -> str | None:
    """Artifacts beside a local SQLite store, not in ./mlruns of whatever folder runs us."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


@task(name="start-tracking", **_RETRY)
def start_run(
    config: TrainingConfig, fingerprint: str, flow_run_id: str | None, *, clients: int | None = None
) -> tuple[str, str]:
    """Create the MLflow run of this training (params = the flattened config; ``clients``, the
    sites that enrolled, names the run when given); returns (uri, run id)."""
    uri = resolve_tracking_uri(config.tracking_uri)
    client = _client(uri)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(
            config.experiment, artifact_location=_artifact_home(uri), tags=_EXPERIMENT_TAGS
        )
    else:
        experiment_id = experiment.experiment_id
        for key, value in _EXPERIMENT_TAGS.items():
            if experiment.tags.get(key) is None:  # an experiment made before, or by hand
                client.set_experiment_tag(experiment_id, key, value)
    tags = {
        "prefect.flow_run_id": flow_run_id or "",
        "fedrec.dataset_fingerprint": fingerprint,
        "fedrec.config_hash": config.config_hash(),
        "fedrec.code_version": code_version(),
        "mlflow.runName": _run_name(config, clients),
        # what --resume restarts from (credentials masked: resume is given the URI again)
        "fedrec.config": config.redacted().model_dump_json(),
    }
    run = client.create_run(experiment_id, tags=tags)
    params = [Param(k, v[:6000]) for k, v in config.flat_params().items()]
    for lo in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[lo : lo + 100])
    return uri, run.info.run_id


@dataclass(frozen=True)
class Interrupted:
    """What an interrupted run left in MLflow: its configuration and the last step it logged."""

    uri: str
    run_id: str
    config_json: str
    logged_through: int  # highest step with metrics (0 if none)
    champion_planned: bool = True  # a private run's plan counted a champion evaluation
    dp_not_covered: str = ""  # what the private run's DP does not cover (DP_NOT_COVERED)


class ResumeError(ValueError):
    """A run that ``--resume`` cannot continue (unknown, finished, not fedrec's, partitions gone)."""

    one_line = True  # the command line shows the message alone: it says all there is


#: tag of a private run: "1" when its privacy plan counted a champion evaluation, else "0"
CHAMPION_PLANNED = "fedrec.dp_champion_planned"
# on a private run and its version: what its (epsilon, delta) does not cover, in words
DP_NOT_COVERED = "fedrec.dp_not_covered"


def registered_version(client: MlflowClient, run_id: str) -> ModelVersion | None:
    """The model version a training run registered (None: it registered none)."""
    found = client.search_model_versions(f"run_id='{run_id}'")
    return found[0] if found else None


def resumable_run(uri: str, run_id: str) -> Run:
    """The MLflow run ``--resume run_id`` would continue. Refuses (:class:`ResumeError`) a run
    that is unknown, finished, not fedrec's, or that registered its version already (its
    workspace is removed then: it serves no resume), and a run of real sites (they keep no
    partitions in its workspace: training again is the way on). A missing SQLite store is
    refused without being created."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise ResumeError(
            f"--resume {run_id}: no MLflow store at {path}; give the run's --tracking-uri"
        )
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ResumeError(f"--resume {run_id}: no such MLflow run in {redact_uri(uri)}") from err
    if run.info.status == "FINISHED":
        raise ResumeError(f"--resume {run_id}: the run finished; there is nothing to resume")
    version = registered_version(client, run_id)
    if version is not None:  # it failed after registering (e.g. a server gone): a twin otherwise
        decided = {"true": "promoted to champion", "false": "not promoted"}.get(
            version.tags.get("fedrec.promoted", ""), "its promotion decision not recorded"
        )
        workspace = run.data.tags.get("fedrec.workspace")
        if workspace:  # its partitions and checkpoints serve no resume
            remove_workspace(workspace)
        raise ResumeError(
            f"--resume {run_id}: the run already registered {version.name} version "
            f"{version.version} ({decided}); there is nothing to resume"
            + ("; its workspace is removed" if workspace and not Path(workspace).exists() else "")
        )
    if "fedrec.config" not in run.data.tags:
        raise ResumeError(f"--resume {run_id}: not a fedrec training run (no fedrec.config tag)")
    if is_sites_run(run):
        workspace = run.data.tags.get("fedrec.workspace")
        if workspace:  # its catalogue and checkpoints serve no resume
            remove_workspace(workspace)
        raise ResumeError(
            f"--resume {run_id}: a run of real sites (--sites) is not resumed; train again with "
            "the same --sites (each site keeps its own records of what it already answered)"
        )
    return run


# a refused resume is not retried: the answer would be the same
@task(name="find-interrupted-run", **_RETRY, retry_condition_fn=retry_unless(ResumeError))
def interrupted_run(uri: str, run_id: str) -> Interrupted:
    """The run to resume; refuses what :func:`resumable_run` refuses."""
    run = resumable_run(uri, run_id)
    client = _client(uri)
    config_json = run.data.tags["fedrec.config"]
    steps = [m.step for key in run.data.metrics for m in client.get_metric_history(run_id, key)]
    planned = run.data.tags.get(CHAMPION_PLANNED) == "1"
    not_covered = run.data.tags.get(DP_NOT_COVERED, "")
    return Interrupted(uri, run_id, config_json, max(steps, default=0), planned, not_covered)


@task(name="tag-run", **_RETRY)
def tag_run(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    """Set tags on the training's run (e.g. where its client partitions and checkpoints are)."""
    client = _client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


#: on a run and its version: the champion version the run's training started from
WARM_START_TAG = "fedrec.warm_started_from"


def run_tag(uri: str, run_id: str, key: str) -> str | None:
    """The training run's tag ``key`` (None: not set)."""
    return _client(uri).get_run(run_id).data.tags.get(key)


def untag_run(uri: str, run_id: str, key: str) -> None:
    """Remove a tag that no longer holds (a removed workspace's folder)."""
    _client(uri).delete_tag(run_id, key)


@task(name="reopen-tracking", **_RETRY)
def reopen_run(uri: str, run_id: str, flow_run_id: str | None = None) -> None:
    """Mark a resumed run RUNNING again (a killed run says KILLED, a failed one FAILED), tagged
    with the flow run that now carries it (the ones before it kept in ``EARLIER_FLOW_RUNS_TAG``)
    and the time it spent ended (``PAUSED_TAG``, summed over its resumes); the ``fedrec.error``
    of its earlier end goes, so that it says only why this one ends, if it fails."""
    client = _client(uri)
    run = client.get_run(run_id)
    if ERROR_TAG in run.data.tags:
        client.delete_tag(run_id, ERROR_TAG)
    ended = run.info.end_time
    if ended is not None:
        paused = float(run.data.tags.get(PAUSED_TAG, 0)) + max(0, time.time() * 1000 - ended) / 1000
        client.set_tag(run_id, PAUSED_TAG, f"{paused:.1f}")
    client.update_run(run_id, status="RUNNING")
    if flow_run_id:
        before = run.data.tags.get("prefect.flow_run_id")
        if before and before != flow_run_id:
            earlier = run.data.tags.get(EARLIER_FLOW_RUNS_TAG, "").split()
            client.set_tag(run_id, EARLIER_FLOW_RUNS_TAG, " ".join([*earlier, before]))
        client.set_tag(run_id, "prefect.flow_run_id", flow_run_id)


#: the ``fedrec.error`` of a run whose process ended without reporting, closed by a later command
LOST = "its process ended without reporting (e.g. killed); closed by a later fedrec train"


def is_sites_run(run: Run) -> bool:
    """Whether ``run`` trained real sites (``--sites``): its ``fedrec.sites`` tag, set once they
    enrolled, or its recorded configuration, which names the sites file from the start."""
    if run.data.tags.get("fedrec.sites"):
        return True
    try:
        recorded = json.loads(run.data.tags.get("fedrec.config", "{}"))
    except ValueError:
        return False
    return isinstance(recorded, dict) and bool(recorded.get("sites"))


def close_lost_run(uri: str, flow_run_id: str) -> str | None:
    """Mark KILLED the training run of ``flow_run_id`` (a flow run whose process is gone) in this
    store if it still said RUNNING, tagged ``fedrec.error`` with why (:data:`LOST`), and say what
    is left to do: ``fedrec train --resume ID continues it``, that it registered its version
    already, or that a run of real sites is trained again (its workspace, which serves only a
    resume, is then removed). None when the store has no such run."""
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=1
    )
    if not runs:
        return None
    run = runs[0]
    run_id = run.info.run_id
    if run.info.status == "RUNNING":
        client.set_tag(run_id, ERROR_TAG, LOST)
        client.set_terminated(run_id, status="KILLED")
    version = registered_version(client, run_id)
    if version is not None:  # killed after registering: a resume would be refused
        return (
            f"run {run_id} registered {version.name} version {version.version}: nothing to resume"
        )
    if is_sites_run(run):
        workspace = run.data.tags.get("fedrec.workspace")
        if workspace and remove_workspace(workspace):
            client.delete_tag(run_id, "fedrec.workspace")
        return f"run {run_id}: {SITES_TRAINED_AGAIN}"
    return f"{resume_command(run_id, uri)} continues it"


def log_metrics(uri: str, run_id: str, step: int, metrics: Mapping[str, float], at: int) -> None:
    """All of one step's metrics in a single batch, at ``step``, timestamped ``at`` (ms since
    the epoch); non-finite values are left out. MLflow stores a metric row (key, timestamp,
    step, value) once, so a batch sent again with the same ``at`` adds nothing."""
    batch = [
        Metric(key, float(value), at, step) for key, value in metrics.items() if np.isfinite(value)
    ]
    _client(uri).log_batch(run_id, metrics=batch)


def _plot_learning_curve(history: Sequence[Mapping[str, float]], path: Path, k: int) -> None:
    from matplotlib.figure import Figure  # imported here: 0.5-1.5 s that most commands skip
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4))  # no pyplot: no global state, no display backend
    ax = fig.subplots()
    rounds = list(range(1, len(history) + 1))
    rating = any("valid/rmse" in h for h in history)
    keys = (
        ("train/rmse", "valid/rmse", "test/rmse")
        if rating
        else (f"valid/ndcg_at_{k}", f"select/ndcg_at_{k}", f"test/ndcg_at_{k}")
    )
    for key in keys:
        values = [h.get(key, np.nan) for h in history]
        if np.isfinite(values).any():
            ax.plot(rounds, values, marker="o", label=key)
    ax.set_xlabel("step (round)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("RMSE" if rating else f"NDCG@{k}")
    ax.set_title("Learning curve")
    if ax.lines:  # nothing was measured (no held-out rows): an empty plot, without a legend
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_clients(per_client: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2)
    ranking = [c for c in per_client if c.startswith("ndcg_at_")]  # at the run's K
    for ax, metric in zip(axes, ("rmse", ranking[0] if ranking else "ndcg_at_10"), strict=True):
        if metric in per_client:
            ax.bar(per_client["client"].astype(str), per_client[metric])
            ax.set_xlabel("client")
            ax.set_title(f"test {metric} per client")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_importance(importance: pd.Series, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ordered = importance.sort_values()
    ax.barh(ordered.index, ordered.to_numpy())
    ax.set_xlabel("total gain (weighted over the ensemble)")
    ax.set_title("Re-ranker feature importance")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@task(name="log-artifacts", **_RETRY)
def log_artifacts(
    uri: str,
    run_id: str,
    config: TrainingConfig,
    profile: pd.DataFrame,
    history: Sequence[Mapping[str, float]],
    per_client: pd.DataFrame,
    importance: pd.Series | None = None,
) -> None:
    """The config, the data profile, the learning curve, the per-client metric plots (the profile
    and the per-client metrics when not empty) and, with a re-ranker, its feature importance."""
    client = _client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(config.redacted().model_dump_json(indent=2))
        if history:  # the last step's metrics, all of them (the model version tags a few)
            (folder / "final_metrics.json").write_text(json.dumps(dict(history[-1]), indent=2))
        if len(profile):  # a private run logs no per-client counts
            profile.to_csv(folder / "data_profile.csv", index=False)
        _plot_learning_curve(history, folder / "learning_curve.png", config.top_k)
        if len(per_client):  # nor per-client metrics
            per_client.to_csv(folder / "client_metrics.csv", index=False)
            _plot_clients(per_client, folder / "client_metrics.png")
        if importance is not None:
            importance.rename("gain").to_csv(
                folder / "feature_importance.csv", index_label="feature"
            )
            _plot_importance(importance, folder / "feature_importance.png")
        client.log_artifacts(run_id, str(folder))


def _rated(recommender: Recommender) -> bool:
    """Whether the model predicts ratings from a user's own: its requests need them."""
    return getattr(recommender, "rating_scale", None) is not None


def _signature(recommender: Recommender) -> ModelSignature:
    """Inputs: user_id, history_items and the optional columns the recommender's kind declares,
    each of any type: the recommender checks every cell itself and refuses one it cannot read
    in one line naming the request row, the user, the column, the value and what is allowed
    (:func:`models.recommenders.check_requests`). MLflow's own types would refuse first, in
    its words, naming neither row nor value: a lone id as ``history_items``, whole-number
    ratings (``[5, 4]``, what JavaScript sends for 5.0) as "double", integer ids as "string",
    ``"old"`` as an age, and a rating model's request without ``history_ratings``. So every
    column is optional to MLflow, user_id and history_items too: a request without them (a
    misspelt ``userId``) is refused by the recommender's one line, not MLflow's page. ``score``
    is optional in the output: a row without a score has None there."""
    columns = [ColSpec(AnyType(), "user_id", required=False)]
    columns.append(ColSpec(AnyType(), "history_items", required=False))
    for name in recommender.request_columns:
        columns.append(ColSpec(AnyType(), name, required=False))
    outputs = Schema(
        [
            ColSpec("string", "user_id"),
            ColSpec("long", "rank"),
            ColSpec("string", "item_id"),
            ColSpec("double", "score", required=False),
            ColSpec("string", "reason"),
        ]
    )
    return ModelSignature(
        inputs=Schema(columns), outputs=outputs, params=ParamSchema([ParamSpec("k", "long", 10)])
    )


def _requirements(names: Sequence[str]) -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in names]


# errors of the artifact store a retry seconds later meets again (a read-only or full disk, a
# folder this user may not write): each try would leave one more FAILED logged model behind
_LASTING_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def _lasting_storage_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _LASTING_ERRNOS


@task(name="register-model", retry_condition_fn=retry_unless(_lasting_storage_error), **_RETRY)
def register_model(
    uri: str, run_id: str, recommender: Recommender, model_name: str, tags: Mapping[str, str]
) -> str:
    """Log the recommender as a models-from-code pyfunc and register it; returns the version."""
    _client(uri)
    history = list(recommender.known_items[:3])
    example = pd.DataFrame({"user_id": ["example-user"], "history_items": [history]})
    if _rated(recommender):  # a rating model answers from the user's ratings, on its scale
        top = float(recommender.rating_scale[1])  # type: ignore[attr-defined]
        example["history_ratings"] = [[top] * len(history)]
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        recommender.save(Path(tmp) / _STATE)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(_SERVING / "pyfunc.py"),
            artifacts={_STATE: str(Path(tmp) / _STATE)},
            code_paths=[str(_MODELS_PACKAGE)],
            pip_requirements=_requirements(("mlflow", *recommender.requirements)),
            signature=_signature(recommender),
            input_example=example,
        )
    # the version is created with its tags in one call, not one call per tag
    tags = dict(tags) | {"fedrec.code_version": code_version()}
    return str(mlflow.register_model(info.model_uri, model_name, tags=tags).version)


@dataclass(frozen=True)
class Champion:
    version: str
    recommender: Recommender
    epsilon: float | None = None  # the DP budget it was trained under (None: not private)
    source: str | None = None  # the data it was trained on, as logged (None: not recorded)
    promotion_metric: str | None = None  # the metric its promotion was decided on, as logged
    held_out: str | None = None  # which rows its run held out (None: not recorded)


def _is_missing(err: MlflowException) -> bool:
    # No such model, or (SQLite store) a model without that alias: INVALID_PARAMETER_VALUE there.
    return err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or (
        "alias" in err.message and "not found" in err.message
    )


def _champion_version(uri: str, model_name: str) -> ModelVersion | None:
    try:
        return _client(uri).get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as err:
        if _is_missing(err):  # no such model, or no champion alias yet
            return None
        raise


@task(name="load-champion", **_RETRY)
def load_champion(uri: str, model_name: str) -> Champion | None:
    """The current champion of ``model_name``, or None if there is none yet."""
    version = _champion_version(uri, model_name)
    if version is None:
        return None
    # by its version, not the alias again: the alias may move in between
    recommender = load_recommender(uri, f"models:/{model_name}/{version.version}")
    epsilon = version.tags.get("fedrec.epsilon") or None
    return Champion(
        str(version.version),
        recommender,
        None if epsilon is None else float(epsilon),
        version.tags.get("fedrec.source") or None,
        version.tags.get("fedrec.promotion_metric") or None,
        version.tags.get(HELD_OUT_TAG) or None,
    )


#: on a version an operator demoted (fedrec rollback): when, to which version, and why
ROLLED_BACK = "fedrec.rolled_back"
#: on the version made champion again by hand: when, in place of which version, and why
RESTORED = "fedrec.restored"


class RollbackError(ValueError):
    """A roll-back that cannot be made as asked (no champion, no such version, ...)."""


@dataclass(frozen=True)
class Repeat:
    """The version that these very data and this very config already gave, and why training
    them again would change nothing."""

    version: str
    champion: str | None  # the current champion's version
    why: str  # "champion", "rolled back" (by an operator) or "lost" (to the current champion)
    metrics: dict[str, float]  # the version's final metrics (fedrec.metrics_json, 6 digits)


@task(name="check-unchanged", **_RETRY)
def repeated_version(
    uri: str, model_name: str, fingerprint: str, config_hash: str
) -> Repeat | None:
    """The version trained on these very data with this very config, when a run would only
    repeat it: the champion itself; a version an operator rolled back (:func:`roll_back`: the
    comparison would promote it again over their choice); or one compared with the current
    champion and not promoted (it would lose again; a private run would spend budget to do so).
    None when a run may change something."""
    champion = _champion_version(uri, model_name)
    current = None if champion is None else str(champion.version)

    def alike(tags: Mapping[str, str]) -> bool:
        return (
            tags.get("fedrec.dataset_fingerprint") == fingerprint
            and tags.get("fedrec.config_hash") == config_hash
        )

    def repeat(version: ModelVersion, why: str) -> Repeat:
        try:
            metrics = json.loads(version.tags.get("fedrec.metrics_json", "{}"))
        except ValueError:  # cut at a character, as older fedrec wrote it: the artifact has them
            metrics = {}
        return Repeat(str(version.version), current, why, metrics)

    if champion is not None and alike(champion.tags):
        return repeat(champion, "champion")
    versions = [v for v in _client(uri).search_model_versions(f"name='{model_name}'")
                if alike(v.tags)]  # fmt: skip
    for version in versions:
        if ROLLED_BACK in version.tags:
            return repeat(version, "rolled back")
    for version in versions:
        tags = version.tags
        lost = tags.get("fedrec.promoted") == "false"
        if current is not None and lost and tags.get("fedrec.compared_with_version") == current:
            return repeat(version, "lost")
    return None


class RolledBack(NamedTuple):
    demoted: str
    restored: str
    was_champion: bool  # the restored version had been champion before (promoted or restored)


BY_HAND = "; by hand, "  # what a roll-back adds to a version's description starts so


def _by_hand(description: str | None, note: str) -> str:
    """``description`` with its roll-back note replaced by ``note`` (the latest only)."""
    return f"{(description or '').split(BY_HAND, 1)[0]}{BY_HAND}{note}"


def roll_back(uri: str, model_name: str, to: str | None = None, reason: str = "") -> RolledBack:
    """Move ``model_name``'s champion alias back to version ``to`` (default: the version the
    current champion replaced), under :func:`promotion_lock`. The demoted version is tagged
    ``ROLLED_BACK`` (a later run on its data and config trains nothing:
    :func:`repeated_version`), the restored one ``RESTORED``, and loses the
    ``fedrec.replaced_by_version`` that no longer holds; each one's description, which the
    registry shows, ends with what the roll-back did (its run's own verdict stays before it).

    Raises
    ------
    RollbackError
    """
    client = _client(uri)
    with promotion_lock(uri):
        current = _champion_version(uri, model_name)
        if current is None:
            raise RollbackError(f"{model_name}: no champion to roll back (fedrec models lists it)")
        demoted = str(current.version)
        if to is None:
            to = current.tags.get("fedrec.compared_with_version")
            if to is None:
                raise RollbackError(
                    f"{model_name}: champion version {demoted} replaced no earlier champion; "
                    "give --to VERSION"
                )
        known = {str(v.version) for v in client.search_model_versions(f"name='{model_name}'")}
        if str(to) not in known:
            raise RollbackError(
                f"--to {to}: {model_name} has no such version; allowed: "
                f"{', '.join(sorted(known - {demoted}, key=int)) or 'none'}"
            )
        to = str(to)
        if to == demoted:
            raise RollbackError(f"--to {to}: version {to} is the champion already")
        restored = client.get_model_version(model_name, to)
        was_champion = restored.tags.get("fedrec.promoted") == "true" or RESTORED in restored.tags
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        why = f": {reason}" if reason else ""
        client.set_registered_model_alias(model_name, CHAMPION, to)
        client.set_model_version_tag(
            model_name, demoted, ROLLED_BACK, f"{when}, champion moved back to version {to}{why}"
        )
        client.set_model_version_tag(
            model_name, to, RESTORED, f"{when}, champion again in place of version {demoted}{why}"
        )
        if "fedrec.replaced_by_version" in restored.tags:
            client.delete_model_version_tag(model_name, to, "fedrec.replaced_by_version")
        client.update_model_version(
            model_name, to, _by_hand(restored.description,
                                     f"{when}: champion in place of version {demoted}{why}."),
        )  # fmt: skip
        client.update_model_version(
            model_name, demoted, _by_hand(current.description,
                                          f"{when}: rolled back, champion moved to version {to}{why}."),
        )  # fmt: skip
    return RolledBack(demoted, to, was_champion)


@contextlib.contextmanager
def promotion_lock(uri: str) -> Iterator[None]:
    """Serialise promotions of one store on this machine: an exclusive lock on a file beside the
    SQLite store (else under FEDREC_HOME). Across machines the deployment's concurrency limit of
    one run at a time plays this part."""
    folder = (
        Path(uri.removeprefix("sqlite:///")).resolve().parent
        if uri.startswith("sqlite:///")
        else fedrec_home()
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".fedrec-promotion.lock"
    # No O_TRUNC, and O_NOFOLLOW: a symlink planted at the lock's path is refused, never followed
    # (opening it for writing would truncate or create whatever file it points to).
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RuntimeError(f"{path}: the promotion lock is a symbolic link; refused") from err
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


MODEL_DESCRIPTION = (
    "Trained by fedrec: each version is one federated training run (its description says on "
    "what, and why it was or was not promoted). The alias 'champion' marks the version in use: "
    "models:/NAME@champion."
)


@task(name="record-promotion", **_RETRY)
def record_promotion(
    uri: str,
    model_name: str,
    version: str,
    decision: PromotionDecision,
    champion_version: str | None,
    description: str = "",
) -> PromotionDecision:
    """Tag the version with the decision and, if promoted, move the champion alias to it. The
    version's description (the MLflow UI shows it) is ``description`` followed by the decision.

    Under :func:`promotion_lock`, the champion is read again first: if another run moved it
    since this one compared against it, this candidate is not promoted (it was not compared with
    the new champion). Returns the decision that was recorded.

    ``fedrec.promoted`` is written last, after the alias: a version without it had its decision
    cut short, and :func:`repair_orphans` finishes the record from where the alias points.
    """
    client = _client(uri)
    with promotion_lock(uri):
        current = _champion_version(uri, model_name)
        current_version = None if current is None else str(current.version)
        compared = None if champion_version is None else str(champion_version)
        # the alias on this very version: a retry of this call after the alias moved
        if decision.promote and current_version not in (compared, str(version)):
            decision = PromotionDecision(
                False,
                f"the champion changed to version {current_version} while this run trained "
                f"(it was compared with {champion_version}); not promoted",
            )
        client.set_model_version_tag(
            model_name, version, "fedrec.promotion_reason", decision.reason
        )
        if compared is not None:
            client.set_model_version_tag(
                model_name, version, "fedrec.compared_with_version", compared
            )
        verdict = "promoted to champion when registered" if decision.promote else "not promoted"
        client.update_model_version(
            model_name,
            version,
            description=f"{description}{'; ' if description else ''}{verdict}: {decision.reason}",
        )
        if decision.promote:
            client.set_registered_model_alias(model_name, CHAMPION, version)
            if compared is not None:  # its fedrec.promoted=true tells what it was
                client.set_model_version_tag(
                    model_name, compared, "fedrec.replaced_by_version", version
                )
        client.set_model_version_tag(
            model_name, version, "fedrec.promoted", str(decision.promote).lower()
        )
        if not client.get_registered_model(model_name).description:
            client.update_registered_model(model_name, description=MODEL_DESCRIPTION)
    return decision


@task(name="repair-orphan-versions", **_RETRY)
def repair_orphans(uri: str, model_name: str) -> dict[str, bool]:
    """Finish the promotion record of versions whose training ended before writing it (a crash
    between registration and the end of :func:`record_promotion`), so the registry says what
    each is. A version the champion alias points to, or that a later champion replaced, became
    champion: it gets ``fedrec.promoted=true`` (and the version it replaced its
    ``fedrec.replaced_by_version``). Any other never became champion: ``fedrec.promoted=false``,
    with an ``orphan`` reason and description. Versions of runs still RUNNING are left alone:
    they may be deciding right now (:func:`close_ended_runs`, run first, closes those whose flow
    run Prefect shows over). Returns each repaired version and whether it was promoted.
    """
    client = _client(uri)
    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException as err:
        if _is_missing(err):
            return {}
        raise
    repaired: dict[str, bool] = {}
    with promotion_lock(uri):
        champion = _champion_version(uri, model_name)
        # every version a run compared with held the alias then
        were_champions = {v.tags.get("fedrec.compared_with_version") for v in versions}
        for v in versions:
            if "fedrec.promoted" in v.tags or not v.run_id:
                continue
            try:
                run = client.get_run(v.run_id)
                status, workspace = run.info.status, run.data.tags.get("fedrec.workspace")
            except MlflowException:
                status, workspace = "GONE", None
            if status == "RUNNING":
                continue
            if status == "KILLED" and ERROR_TAG in run.data.tags:
                status = f"KILLED: {run.data.tags[ERROR_TAG]}"
            held = champion is not None and str(champion.version) == str(v.version)
            was = "fedrec.replaced_by_version" in v.tags or str(v.version) in were_champions
            if held or was:  # the alias moved to it, from the version it compared with
                replaced = v.tags.get("fedrec.compared_with_version")
                if replaced and replaced != str(v.version):
                    previous = client.get_model_version(model_name, replaced)
                    if "fedrec.replaced_by_version" not in previous.tags:
                        client.set_model_version_tag(
                            model_name, replaced, "fedrec.replaced_by_version", str(v.version)
                        )
                client.set_model_version_tag(model_name, v.version, "fedrec.promoted", "true")
            else:
                reason = (
                    f"orphan: its training (run {v.run_id}, {status}) ended between registration "
                    "and the promotion decision"
                )
                client.set_model_version_tag(model_name, v.version, "fedrec.promoted", "false")
                client.set_model_version_tag(
                    model_name, v.version, "fedrec.promotion_reason", reason
                )
                client.update_model_version(
                    model_name, v.version, description=f"not promoted: {reason}"
                )
            if workspace:  # a resume of its run is refused: its partitions serve nothing
                remove_workspace(workspace)
            repaired[str(v.version)] = held or was
    return repaired


@task(name="close-ended-runs", **_RETRY)
def close_ended_runs(uri: str) -> list[str]:
    """Mark KILLED the MLflow runs that still say RUNNING though Prefect shows their flow run
    over (a process killed under a worker or ``fedrec serve``, or found silent and crashed by
    the server), tagged with why; returns their ids. Runs of flow runs this server does not
    know, or that may still be running, are left alone."""
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    closed = []
    for run in client.search_runs(experiments, "attributes.status = 'RUNNING'"):
        over = _flow_run_over(run.data.tags.get("prefect.flow_run_id"))
        if over is None:
            continue
        state, ended = over
        # a cancel whose process was stopped before it could say so itself
        why = CANCELLED if state == "CANCELLED" else f"its flow run ended {state} in Prefect"
        client.set_tag(run.info.run_id, ERROR_TAG, why)
        # it ended when Prefect ended its flow run, not now: its duration says how long it ran
        end_time = None if ended is None else max(ended, run.info.start_time)
        client.set_terminated(run.info.run_id, status="KILLED", end_time=end_time)
        closed.append(run.info.run_id)
    return closed


def flow_run_state(flow_run_id: str | None) -> Any:
    """The state Prefect gives flow run ``flow_run_id`` now; None when it has none, or cannot
    say (no such flow run on this server, or no server)."""
    if not flow_run_id:
        return None
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as prefect:
            return prefect.read_flow_run(flow_run_id).state
    except Exception:
        return None


def _flow_run_over(flow_run_id: str | None) -> tuple[str, int | None] | None:
    """The final state (``CRASHED``, ...) Prefect gives the flow run that carried a training
    run, and when it took that state (epoch milliseconds; None: not said), or None while it may
    still be running, or when Prefect cannot say. A run killed under a worker or ``fedrec
    serve`` stays RUNNING in MLflow, since nothing of it is left to close it; its flow run's
    state tells that it decides nothing any more."""
    state = flow_run_state(flow_run_id)
    if state is None or not state.is_final():
        return None
    when = getattr(state, "timestamp", None)
    return state.type.value, None if when is None else int(when.timestamp() * 1000)


LEDGER_EXPERIMENT = "fedrec-privacy-ledger"
_LEGACY_LEDGER_TAG = "fedrec.epsilon_ledger"  # the ledger's former home: a JSON tag on the model


def _ledger_experiment(client: MlflowClient, uri: str, *, create: bool = True) -> str | None:
    """The ledger's experiment, created at first use (else None while there is none). Refuses
    when someone deleted it, when ledger entries stand in another experiment (the ledger was
    renamed: found by its entries' params, which MLflow cannot change), and when a SQLite
    store that had a ledger (:func:`_ledgered_stores`, a file beside it) holds none now (its
    entries were purged, or the store was replaced): each would start every user at zero."""
    experiment = client.get_experiment_by_name(LEDGER_EXPERIMENT)
    stray = _stray_ledger(client, None if experiment is None else experiment.experiment_id)
    if stray is not None:
        raise BudgetError(
            f"privacy ledger: experiment {stray.name!r} (id {stray.experiment_id}) holds ledger "
            f"entries, and the ledger is {LEDGER_EXPERIMENT!r}: it was renamed; rename it back "
            f"(mlflow experiments rename --experiment-id {stray.experiment_id} --new-name "
            f"{LEDGER_EXPERIMENT}): not started"
        )
    record, database = _ledgered_stores(uri)
    if experiment is None:
        if record is not None and database in _read_lines(record):
            raise BudgetError(
                f"privacy ledger: {record} says this store ({database}) had a ledger, and it "
                "holds none now: its entries were purged or the store was replaced, and every "
                "user would start at zero; restore the store (or remove its line from that file "
                "to start a new ledger on purpose): not started"
            )
        if not create:
            return None
        created = client.create_experiment(LEDGER_EXPERIMENT, artifact_location=_artifact_home(uri))
        _record_ledgered(record, database)
        return created
    if experiment.lifecycle_stage != "active":
        raise BudgetError(
            f"privacy ledger: the MLflow experiment {LEDGER_EXPERIMENT!r} was deleted; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}): not started"
        )
    if create:  # a ledger made before the record was kept is recorded at its next reservation
        _record_ledgered(record, database)
    return experiment.experiment_id


def _record_ledgered(record: Path | None, database: str) -> None:
    if record is not None and database not in _read_lines(record):
        with record.open("a") as file:
            file.write(f"{database}\n")


def _ledgered_stores(uri: str) -> tuple[Path | None, str]:
    """The file beside a SQLite store that names the stores of that folder which have had a
    privacy ledger, one database file name a line, and this store's name; (None, "") for any
    other store."""
    path = sqlite_path(uri)
    if path is None:
        return None, ""
    return path.resolve().parent / ".fedrec-ledgered-stores", path.name


def _read_lines(path: Path) -> set[str]:
    try:
        return set(path.read_text().split("\n")) - {""}
    except FileNotFoundError:
        return set()


def _stray_ledger(client: MlflowClient, ledger_id: str | None) -> Any:
    """An experiment other than the ledger's (``ledger_id``) that holds ledger entries, deleted
    ones included, else None."""
    others, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ALL, max_results=1000, page_token=token)
        others += [e for e in page if e.experiment_id != ledger_id]
        token = page.token
        if not token:
            break
    for kind in ("spend", "cap"):  # MLflow's filters have no OR
        for start in range(0, len(others), 100):
            chunk = others[start : start + 100]
            found = client.search_runs(
                [e.experiment_id for e in chunk], f"params.kind = '{kind}'",
                run_view_type=ViewType.ALL, max_results=1,
            )  # fmt: skip
            if found:
                return next(e for e in chunk if e.experiment_id == found[0].info.experiment_id)
    return None


def _ledger_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Any]:
    """Every entry matching the filter, deleted runs included: deleting one does not erase it."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, run_view_type=ViewType.ALL, max_results=1000,
            order_by=["attributes.start_time ASC"], page_token=token,
        )  # fmt: skip
        runs += list(page)
        token = page.token
        if not token:
            return runs


_USERS_ARTIFACT = "users.u64"  # an entry's user keys: sorted uint64, little-endian
LEDGER_SECRET = ".fedrec-ledger.key"


def ledger_secret_path(uri: str, configured: str | None = None) -> Path:
    """Where the ledger's secret lives: the configured file, else beside the SQLite store (so
    the secret travels with the store it names users in), else under FEDREC_HOME."""
    if configured:
        return Path(configured).expanduser()
    folder = (
        Path(uri.removeprefix("sqlite:///")).resolve().parent
        if uri.startswith("sqlite:///")
        else fedrec_home()
    )
    return folder / LEDGER_SECRET


def ledger_fingerprint(uri: str, configured: str | None, fingerprint: str) -> str | None:
    """:func:`keyed_fingerprint` under the ledger's secret for ``uri``; None while there is no
    secret (no private run has been ledgered with one here)."""
    try:
        return keyed_fingerprint(
            fingerprint, ledger_secret(ledger_secret_path(uri, configured), create=False)
        )
    except FileNotFoundError:
        return None


def _read_secret(path: Path) -> bytes | None:
    """The secret in ``path`` (None when there is no file); refuses what
    :func:`models.files.read_private` refuses (a link, a shared file or folder) and a file that
    is not 32 bytes."""
    try:
        secret = read_private(path, "ledger secret")
    except FileNotFoundError:
        return None
    except UnsafeFile as err:
        raise _unsafe_secret(err) from err
    if len(secret) != 32:
        raise BudgetError(f"{path}: a ledger secret is 32 bytes, this file has {len(secret)}")
    return secret


def _unsafe_secret(err: UnsafeFile) -> BudgetError:
    where = (
        " (keep the secret in a folder of your own and name it with --dp-ledger-secret, or use "
        "a FEDREC_HOME of your own; copy this one there only if you are sure no one replaced it)"
    )
    return BudgetError(f"{err}{'' if err.folder is None else where}")


def check_ledger_secret(uri: str, configured: str | None = None) -> None:
    """Refuse (:class:`BudgetError`) before a private run starts when the ledger's secret for
    ``uri``, or the folder a new one would be written in, is not private to this user."""
    try:
        check_private_path(ledger_secret_path(uri, configured), "ledger secret")
    except UnsafeFile as err:
        raise _unsafe_secret(err) from err


def ledger_secret(path: Path, *, create: bool) -> bytes:
    """The ledger's secret (32 bytes from the OS's entropy, in an owner-only file), created when
    ``create`` and absent; two processes creating it at once end with the same secret.

    Raises
    ------
    FileNotFoundError
        When there is no secret at ``path`` and ``create`` is false.
    """
    secret = _read_secret(path)
    if secret is not None:
        return secret
    if not create:
        raise FileNotFoundError(path)
    try:  # never write a secret where others could swap it
        check_private_folders(path, "ledger secret")
    except UnsafeFile as err:
        raise _unsafe_secret(err) from err
    make_private_folder(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:  # another process is creating it: use theirs once written
        for _ in range(100):
            time.sleep(0.02)
            with contextlib.suppress(BudgetError):
                if (secret := _read_secret(path)) is not None:
                    return secret
        return ledger_secret(path, create=False)
    with os.fdopen(fd, "wb") as file:
        file.write(os.urandom(32))
        file.flush()
        os.fsync(file.fileno())
    return ledger_secret(path, create=False)


def _as_entry(run: Any) -> Entry:
    p = run.data.params
    cap = None
    if p["kind"] == "cap":
        cap = Cap(float(p["cap_epsilon"]), float(p["cap_delta"]))
    return Entry(
        p["kind"], float(p.get("epsilon", 0)), float(p.get("delta", 0)), cap, run.info.start_time
    )


def _covered(client: MlflowClient, run: Any, cache: Path | None) -> np.ndarray | None:
    """The user keys an entry covers; None (every user) for an entry that names none, or whose
    stored set is missing or does not match the digest in its (immutable) params: a lost or
    altered set over-counts, it never frees anyone's budget. Sets already read are kept in
    ``cache`` under their digest (and checked against it when read back)."""
    digest = run.data.params.get("users_sha256")
    if digest is None:
        return None
    kept = None if cache is None else cache / f"{digest}.u64"
    data = kept.read_bytes() if kept is not None and kept.is_file() else None
    if data is None or hashlib.sha256(data).hexdigest() != digest:
        try:
            with tempfile.TemporaryDirectory() as folder:
                local = client.download_artifacts(run.info.run_id, _USERS_ARTIFACT, folder)
                data = Path(local).read_bytes()
        except (MlflowException, OSError):
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            return None
        if kept is not None:
            write_private(kept, data)
    if len(data) % USER_KEY.itemsize:
        return None
    return np.frombuffer(data, dtype=USER_KEY).astype(np.uint64)


def _ledger_entries(
    client: MlflowClient, experiment_id: str, cache: Path | None = None
) -> tuple[list[Stored], set[str]]:
    """Every entry of the ledger (deleted runs included) and the ids of the secrets that named
    their users."""
    runs = _ledger_runs(client, experiment_id, "")
    secrets = {r.data.params["secret_id"] for r in runs if "secret_id" in r.data.params}
    return [Stored(_as_entry(r), _covered(client, r, cache)) for r in runs], secrets


def ledger_groups(
    client: MlflowClient, experiment_id: str, users: np.ndarray, cache: Path | None = None
) -> list[Group]:
    """The users' balances as the ledger holds them now (:func:`~models.privacy.ledger.standing`)."""
    return standing(users, _ledger_entries(client, experiment_id, cache)[0])


def _write_entry(
    client: MlflowClient, experiment_id: str, stored: Stored, about: Mapping[str, str]
) -> str:
    """Append one entry: a run whose params (immutable in MLflow) are the entry, and the keys of
    the users it covers as an artifact whose digest is one of those params."""
    entry = stored.entry
    values = {"kind": entry.kind, "epsilon": repr(entry.epsilon), "delta": repr(entry.delta)}
    if entry.cap is not None:
        values |= {"cap_epsilon": repr(entry.cap.epsilon), "cap_delta": repr(entry.cap.delta)}
    data = b""
    if stored.users is None:
        values["users"] = "all"
    else:
        data = np.sort(stored.users).astype(USER_KEY).tobytes()
        values |= {
            "users": str(len(stored.users)),
            "users_sha256": hashlib.sha256(data).hexdigest(),
        }
    name = f"{entry.kind} eps {entry.cap.epsilon if entry.cap else entry.epsilon:.3g}"
    run = client.create_run(experiment_id, start_time=entry.at, run_name=name)
    client.log_batch(
        run.info.run_id, params=[Param(k, v[:6000]) for k, v in (dict(about) | values).items()]
    )
    if stored.users is not None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / _USERS_ARTIFACT
            path.write_bytes(data)
            client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _unledgered_private_spending(
    client: MlflowClient, experiment_id: str | None, model_name: str
) -> list[float]:
    """The epsilons of ``model_name``'s private versions when the ledger (``experiment_id``, None
    when it does not exist) has no entry for that model at all (it was lost, or they predate
    it); else an empty list."""
    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException as err:
        if _is_missing(err):
            return []
        raise
    private = [float(v.tags["fedrec.epsilon"]) for v in versions if v.tags.get("fedrec.epsilon")]
    if not private or (
        experiment_id is not None
        and _ledger_runs(client, experiment_id, f"params.model_name = '{model_name}'")
    ):
        return []
    # (a recovered list may end with the former tag's surplus: runs that registered nothing)
    try:  # the former JSON tag may hold spending of runs that never registered a version
        legacy = json.loads(
            client.get_registered_model(model_name).tags.get(_LEGACY_LEDGER_TAG, "{}")
        )
    except (MlflowException, ValueError):
        legacy = {}
    total = sum(float(v) for v in legacy.values())
    return private if sum(private) >= total else [*private, total - sum(private)]


def _recovered(
    unledgered: list[float], request: Request, model_name: str, *, at: int
) -> Stored | None:
    """The entry that records ``model_name``'s private versions the ledger has no entry for (their
    users are unknown, so it covers everyone), or None when there are none. Refused unless the
    operator sets the cap.

    Raises
    ------
    BudgetError
    """
    if not unledgered:
        return None
    if not request.set_cap:
        raise BudgetError(
            f"privacy ledger: {model_name!r} has private versions (epsilon "
            f"{sum(unledgered):.3g} in all) but the "
            f"ledger ({LEDGER_EXPERIMENT!r}) has no entry for it: their spending is unknown; "
            "not started (an operator can record it as spent with --dp-ledger-set-cap)"
        )
    return Stored(recovered_spend(unledgered, request.delta, at=at), None)


@dataclass(frozen=True)
class Standing:
    """The privacy ledger as a private run would find it: how many entries it holds, the run's
    users grouped by history (tightest first), and the private spending of the model that the
    ledger has no entry for."""

    entries: int
    groups: list[Group]
    unledgered: list[float]

    def plan(self, request: Request, model_name: str) -> list[Stored]:
        """The entries a run asking ``request`` would write (its new caps, then its spend).

        Raises
        ------
        BudgetError
            With the line the run would be refused with.
        """
        groups = self.groups
        recovered = _recovered(self.unledgered, request, model_name, at=0)
        if recovered is not None:  # it covers every user: each group's balance grows by it
            spent = recovered.entry
            groups = [
                Group(g.members, Balance(g.balance.epsilon + spent.epsilon,
                                         g.balance.delta + spent.delta, g.balance.cap,
                                         g.balance.spends + 1))
                for g in groups
            ]  # fmt: skip
        return plan_user_reservation(groups, request, at=0)


def ledger_standing(
    uri: str, user_ids: np.ndarray, *, model_name: str, secret_path: str | None = None
) -> Standing:
    """The users' balances in the ledger of ``uri``, read as :func:`reserve_privacy_budget` reads
    them, with nothing written to the store: no experiment, entry or secret is created.

    Raises
    ------
    BudgetError
        When the ledger's experiment was deleted, or its entries name users with a secret this
        machine does not hold (or one that is not private to this user).
    """
    client = _client(uri)
    experiment_id = _ledger_experiment(client, uri, create=False)
    stored: list[Stored] = []
    secret = os.urandom(32)  # entries that name no users cover every user, whatever the key
    if experiment_id is not None:
        path = ledger_secret_path(uri, secret_path)
        stored, written_with = _ledger_entries(
            client, experiment_id, path.parent / ".fedrec-ledger-cache"
        )
        if written_with:
            secret = _secret_for(path, written_with)
    unledgered = _unledgered_private_spending(client, experiment_id, model_name)
    users = user_keys(np.asarray(user_ids, dtype=str), secret)
    return Standing(len(stored), standing(users, stored), unledgered)


def ledger_request(config: TrainingConfig, n_users: int) -> Request:
    """What a private run asks of the ledger: its epsilon and delta, and the cap it names."""
    assert config.dp_epsilon is not None
    return Request(
        config.dp_epsilon,
        run_delta(config.dp_delta, n_users),
        config.dp_budget,
        config.dp_budget_delta,
        config.dp_ledger_set_cap,
    )


def _secret_for(path: Path, written_with: set[str]) -> bytes:
    """This run's ledger secret, refusing when the ledger's entries were written with another:
    a run that cannot name the users as the ledger does would find no history for them."""
    if not written_with:
        return ledger_secret(path, create=True)
    try:
        secret: bytes | None = ledger_secret(path, create=False)
    except FileNotFoundError:
        secret = None
    mine = None if secret is None else secret_id(secret)
    if secret is None or written_with != {mine}:
        have = "no file is there" if secret is None else f"that file is secret {mine}"
        raise BudgetError(
            f"privacy ledger: its entries name users with secret {', '.join(sorted(written_with))} "
            f"and {have} ({path}): copy the secret from the machine that wrote them, or point "
            "--dp-ledger-secret at it: not started"
        )
    return secret


@task(name="reserve-privacy-budget", retries=0, cache_policy=NONE)
def reserve_privacy_budget(
    uri: str,
    request: Request,
    *,
    user_ids: np.ndarray,
    model_name: str,
    fingerprint: str,
    about: Mapping[str, str],
    secret_path: str | None = None,
) -> Balance:
    """Append this run's (epsilon, delta) to the ledger of each of its users before it trains.

    The ledger is the MLflow experiment ``fedrec-privacy-ledger``: one run per entry, its params
    the entry, the data's fingerprint keyed with the ledger's secret (:func:`keyed_fingerprint`)
    and its artifact the keyed hashes of the users it covers (the key stays in a local file,
    :func:`ledger_secret_path`). Refuses, writing nothing, when the run would take any user
    past their cap or names another cap than a user's stored one, when ``model_name`` has
    private versions but the ledger has no entry for it (unless an operator sets the cap, which
    records their epsilons as spent), or when the entries were written with another secret.
    Under :func:`promotion_lock`, so processes on this machine reserve one at a time; the
    balances are read again after writing, and a reservation that a concurrent one (another
    machine, same remote store) pushed past a cap is refused and stays counted. Returns the
    balance of the users closest to their cap, after this run.
    """
    client = _client(uri)
    about = {"model_name": model_name, **about}
    path = ledger_secret_path(uri, secret_path)
    cache = path.parent / ".fedrec-ledger-cache"
    with promotion_lock(uri):
        experiment_id = _ledger_experiment(client, uri)
        assert experiment_id is not None  # created when missing
        now = int(time.time() * 1000)
        stored, written_with = _ledger_entries(client, experiment_id, cache)
        secret = _secret_for(path, written_with)
        users = user_keys(user_ids, secret)
        about |= {
            "secret_id": secret_id(secret),
            "dataset_fingerprint": keyed_fingerprint(fingerprint, secret),
        }
        recovered = _recovered(
            _unledgered_private_spending(client, experiment_id, model_name), request, model_name,
            at=now - 1,
        )  # fmt: skip
        if recovered is not None:
            _write_entry(client, experiment_id, recovered, about | {"reason": "recovered"})
            stored.append(recovered)
        writes = plan_user_reservation(standing(users, stored), request, at=now)
        written = [_write_entry(client, experiment_id, w, about) for w in writes]
        try:
            return check_groups_after_writing(ledger_groups(client, experiment_id, users, cache))
        except BudgetError:
            client.set_tag(written[-1], "fedrec.ledger_outcome", "refused: concurrent reservation")
            raise


ERROR_TAG = "fedrec.error"
HELD_OUT_TAG = (
    "fedrec.held_out"  # which rows a version's run held out (TrainingConfig.held_out_rows)
)


def failure(err: BaseException, private: bool = False) -> str:
    """One line that says why a run failed, for its ``fedrec.error`` tag: the error's type and
    first line, credentials redacted, at most 500 characters. A private run's tag names the type
    only: a message can quote a row or a user, which DP does not cover (the flow's log, the
    server's, has it)."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if private:
        return f"{type(err).__name__} (a private run: the message is in the flow's log)"
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return redact_text(text)[:500]


#: the ``fedrec.error`` of a run its operator cancelled in Prefect (the UI, the API or
#: ``prefect flow-run cancel``): not a failure, and marked KILLED
CANCELLED = "cancelled in Prefect"


@task(name="finish-tracking", **_RETRY)
def finish_run(uri: str, run_id: str, succeeded: bool, error: str | None = None) -> None:
    """Mark the MLflow run FINISHED, or FAILED when the flow raised (KILLED when its operator
    cancelled it: ``error`` is :data:`CANCELLED`), tagged with ``error`` (why, in one line) so
    that the run says it where its readers look."""
    client = _client(uri)
    status = RunStatus.FINISHED if succeeded else RunStatus.FAILED
    if error == CANCELLED:
        status = RunStatus.KILLED
    if error is not None:
        client.set_tag(run_id, ERROR_TAG, error)
    client.set_terminated(run_id, RunStatus.to_string(status))


def version_description(config: TrainingConfig, source: str, metrics: Mapping[str, float]) -> str:
    """One line for the registry: the model family, what it was trained on, its privacy and the
    metric that decides promotion."""
    family = config.algorithm + ("" if config.ranker == "none" else f" + {config.ranker} re-ranker")
    privacy = "not private" if config.dp_epsilon is None else f"epsilon {config.dp_epsilon:g}"
    if config.simulated_attack:
        privacy += f"; under a simulated attack ({config.simulated_attack})"
    metric = config.promotion
    value = f"{metrics[metric]:.4f}" if metric in metrics else "not measured"
    return (
        f"{family} ({config.feedback} feedback), {config.rounds} round{'s' * (config.rounds != 1)}; "
        f"data: {source}; {privacy}; {metric} {value}"
    )


# MLflow's longest model-version tag value until 3.x raised it to 100,000: fedrec's own store
# takes more, a tracking server it is pointed at may be older
METRICS_TAG_LIMIT = 5000


def version_tags(
    metrics: Mapping[str, float], extra: Mapping[str, str], promotion_metric: str
) -> dict[str, str]:
    """Model-version tags: identifying tags, the final metrics the promotion rule reads
    (``metric.<name>``, rounded: the promotion metric, its worst client and its baseline), and
    the final metrics in one JSON tag (the last ones left out, whole, when they would not fit in
    ``METRICS_TAG_LIMIT`` characters). The run's ``final_metrics.json`` artifact holds them all
    at full precision."""
    m = promotion_metric
    decisive = (m, worst_client_metric(m), baseline_metric(m))
    tags = {f"metric.{k}": f"{metrics[k]:.6g}" for k in decisive if k in metrics}
    kept = {k: round(v, 6) for k, v in metrics.items()}
    while len(text := json.dumps(kept)) > METRICS_TAG_LIMIT:  # cut at a character: not JSON
        kept.popitem()
    return tags | dict(extra) | {"fedrec.metrics_json": text}
