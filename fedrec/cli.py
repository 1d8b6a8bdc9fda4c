"""The ``fedrec`` command line: train (the Prefect flow), predict and recommend (a registered model).

Every flag of ``fedrec train`` is a field of :class:`~fedrec.config.TrainingConfig`, generated from
it, so the flags, the YAML keys and the flow's parameters cannot drift apart. User errors print one
line on stderr and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pandas as pd
import yaml
from pydantic import ValidationError

from fedrec.config import TrainingConfig
from models.data.errors import DataValidationError

# Flags of `fedrec train` that are not config fields, and config fields left to --config files.
_FILE_ONLY = {"synthetic_users", "synthetic_items", "synthetic_interactions", "local_epochs", "local_lr",
              "batch_size", "prox_mu", "server_lr", "relevance_threshold", "task_retries", "max_client_regression",
              "user_col", "item_col", "rating_col", "timestamp_col", "rating_scale"}  # fmt: skip


class UserError(click.ClickException):
    """A problem the user can fix; shown as one line."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"fedrec: error: {self.message}", err=True)


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        parts.append(f"{where}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "; ".join(parts)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn known user errors into one line and exit status 2 (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.pop("debug", False)
        try:
            return (
                fn(*args, debug=debug, **kwargs)
                if "debug" in fn.__code__.co_varnames
                else fn(*args, **kwargs)
            )
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            if debug:
                raise
            from mlflow.exceptions import MlflowException

            if isinstance(err, ValidationError):
                raise UserError(f"invalid configuration: {_one_line(err)}") from err
            if isinstance(err, DataValidationError | FileNotFoundError):
                raise UserError(str(err)) from err
            if isinstance(err, MlflowException):
                raise UserError(f"MLflow: {err.message.splitlines()[0]}") from err
            raise UserError(
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from err

    return wrapper


def _debug_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--debug", is_flag=True, help="show full tracebacks instead of one-line errors"
    )(fn)


class _NoErrorRecords(logging.Filter):
    """Drop Prefect's error records (with their tracebacks): the CLI reports the error in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _quiet_prefect(debug: bool) -> None:
    """Per-round progress is the flow's own log; hide Prefect's per-task chatter and, unless
    debugging, the tracebacks of failed runs and of the temporary server's shutdown.

    Call before Prefect is imported: its logging settings are read then.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    if debug:
        return
    # The temporary API server that `fedrec train` starts logs a cancelled event flush as an
    # error when it is stopped at exit; the run itself is complete by then.
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL", "CRITICAL")
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NoErrorRecords())


def _config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One option per TrainingConfig field (help and defaults come from the field)."""
    for name, field in reversed(list(TrainingConfig.model_fields.items())):
        if name in _FILE_ONLY:
            continue
        annotation = field.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
            annotation = args[0]
        if typing.get_origin(annotation) is typing.Literal:
            kind: Any = click.Choice([str(a) for a in typing.get_args(annotation)])
        else:
            kind = annotation if annotation in (int, float, str) else str
        flag = "--" + name.replace("_", "-")
        default = field.default
        fn = click.option(
            flag, name, type=kind, default=None, help=f"{field.description} [default: {default}]"
        )(fn)
    return fn


def build_config(config_file: str | None, overrides: dict[str, Any]) -> TrainingConfig:
    """The YAML file's keys (if any), then the flags given on the command line."""
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"{config_file}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(
                f"{config_file}: not valid YAML ({' '.join(str(err).split())})"
            ) from err
        if not isinstance(loaded, dict):
            raise UserError(
                f"{config_file}: must be a mapping of config keys, got {type(loaded).__name__}"
            )
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainingConfig(**values)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """fedrec: federated recommender training with Prefect and MLflow.

    \b
    fedrec train --data synthetic --rounds 10          train, register, promote if better
    fedrec recommend --model models:/fedrec-mf@champion --history h.csv --k 10
    fedrec predict --model models:/fedrec-mf@champion --history h.csv --pairs p.csv
    """


@main.command()
@_config_options
@click.option(
    "--config",
    "config_file",
    type=str,
    default=None,
    help="YAML file with TrainingConfig keys; flags override it",
)
@click.option(
    "--json", "as_json", is_flag=True, help="print one machine-readable JSON summary on stdout"
)
@click.option(
    "--max-workers",
    type=click.IntRange(min=1),
    default=None,
    help="client tasks run at once [default: CPU count, at most 8]",
)
@_debug_option
@friendly_errors
def train(
    config_file: str | None, as_json: bool, max_workers: int | None, debug: bool, **overrides: Any
) -> None:
    """Train a federated model as a Prefect flow, log it to MLflow, register it and promote it
    to champion if it beats the current one.

    Data: --data synthetic (default), ml-100k / ml-1m (under $FEDREC_DATASETS), a MovieLens folder,
    or a CSV/Parquet file with user_id,item_id[,rating][,timestamp]; or --train/--test files.
    """
    from fedrec.runtime import keep_freed_memory

    config = build_config(config_file, overrides)
    _quiet_prefect(debug)
    keep_freed_memory()
    from flows.training import federated_training

    flow = federated_training
    if max_workers is not None:
        from prefect.task_runners import ThreadPoolTaskRunner

        flow = federated_training.with_options(
            task_runner=ThreadPoolTaskRunner(max_workers=max_workers)
        )
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)  # "no pip in a uv venv"
    started = time.perf_counter()
    # MLflow prints registry notices on stdout; with --json, stdout carries the summary only.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        summary = flow(**config.model_dump())
    summary["seconds"] = round(time.perf_counter() - started, 2)
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    if summary.get("skipped"):
        click.echo(f"\n{summary['reason']} (model {summary['model_name']})")
        return
    metrics = summary["metrics"]
    click.echo(
        f"\nmodel {summary['model_name']} version {summary['model_version']}: "
        f"{'promoted to champion' if summary['promoted'] else 'not promoted'} ({summary['reason']})"
    )
    click.echo(
        f"valid RMSE {metrics.get('valid_rmse', float('nan')):.4f}, test RMSE {metrics.get('test_rmse', float('nan')):.4f}, "
        f"test NDCG@10 {metrics.get('test_ndcg_at_10', float('nan')):.4f}  ({summary['seconds']} s)"
    )
    click.echo(f"MLflow run {summary['run_id']} in {summary['tracking_uri']}")


_DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"


def nightly_deployment(path: Path = _DEPLOYMENTS) -> dict[str, Any]:
    """The `nightly` entry of deployments/prefect.yaml: the one place its schedule is written."""
    spec = yaml.safe_load(path.read_text())
    for deployment in spec.get("deployments", []):
        if deployment.get("name") == "nightly":
            return deployment
    raise UserError(f"{path}: no deployment named 'nightly'")


@main.command()
@click.option(
    "--cron", default=None, help="cron schedule [default: the one in deployments/prefect.yaml]"
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="override a default parameter (repeatable), e.g. --param rounds=5",
)
@_debug_option
@friendly_errors
def serve(cron: str | None, params: tuple[str, ...]) -> None:
    """Run the nightly retraining schedule in this one process (no worker or work pool needed).

    Uses the schedule, default parameters and concurrency limit of the `nightly` deployment in
    deployments/prefect.yaml; needs a Prefect server (PREFECT_API_URL, e.g. `make server`).
    Runs can be triggered like the worker-based deployment's, by the name 'federated-training/nightly'.
    """
    spec = nightly_deployment()
    parameters = dict(spec.get("parameters", {}))
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--param {item!r}: expected KEY=VALUE")
        parameters[key] = yaml.safe_load(value)
    TrainingConfig(**parameters)  # fail here, not at 2 a.m.
    schedule = spec["schedules"][0]
    _quiet_prefect(debug=False)
    from prefect.schedules import Cron

    from flows.training import federated_training

    limit = spec.get("concurrency_limit", {}).get("limit", 1)
    federated_training.serve(
        name="nightly",
        schedules=[Cron(cron or schedule["cron"], timezone=schedule.get("timezone", "UTC"))],
        parameters=parameters,
        limit=limit,
        global_limit=limit,
        description=spec.get("description"),
        tags=spec.get("tags"),
    )


def _requests(history: str, users: str | None) -> pd.DataFrame:
    """One request row per user from a history file (user_id,item_id[,rating])."""
    from models.data.readers import read_interactions

    data = read_interactions(history, rating_scale=None)
    frame = data.frame
    rows = pd.DataFrame(
        {
            "user_id": data.user_ids[frame["user"].to_numpy()].astype(str),
            "item": data.item_ids[frame["item"].to_numpy()].astype(str),
            "rating": frame["rating"].to_numpy(),
        }
    )
    grouped = rows.groupby("user_id", sort=False).agg(
        history_items=("item", list), history_ratings=("rating", list)
    )
    requests = grouped.reset_index()
    if users:
        wanted = pd.read_csv(users, dtype=str)
        if "user_id" not in wanted:
            raise UserError(f"{users}: needs a user_id column, has {', '.join(wanted.columns)}")
        wanted = wanted[["user_id"]].drop_duplicates()
        requests = wanted.merge(requests, on="user_id", how="left")
        requests["history_items"] = requests["history_items"].apply(
            lambda v: v if isinstance(v, list) else []
        )
        requests["history_ratings"] = requests["history_ratings"].apply(
            lambda v: v if isinstance(v, list) else []
        )
    return requests


def _load_model(model_uri: str, tracking_uri: str | None) -> Any:
    """The registered recommender; a missing local store is a user error, not a new empty store."""
    from tasks.tracking import load_recommender, resolve_tracking_uri

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}: train first (fedrec train) or pass --tracking-uri"
        )
    return load_recommender(uri, model_uri)


def _report_reasons(result: pd.DataFrame) -> None:
    """Fallbacks and ignored items go to stderr, one line per user, so stdout stays clean CSV."""
    notes = result.loc[result["reason"] != "", ["user_id", "reason"]].drop_duplicates("user_id")
    for user, reason in notes.itertuples(index=False):
        click.echo(f"fedrec: note: user {user}: {reason}", err=True)


def _write(frame: pd.DataFrame, out: str | None) -> None:
    if out:
        frame.to_csv(out, index=False)
    else:
        frame.to_csv(sys.stdout, index=False)


def _model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--tracking-uri",
        default=None,
        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else FEDREC_HOME's SQLite)",
    )(fn)
    fn = click.option(
        "--model",
        "model_uri",
        default="models:/fedrec-mf@champion",
        show_default=True,
        help="model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model",
    )(fn)
    return fn


@main.command()
@_model_options
@click.option(
    "--history",
    required=True,
    help="CSV/Parquet of user_id,item_id[,rating]: what each user has rated",
)
@click.option(
    "--users",
    default=None,
    help="CSV with a user_id column: recommend for these (default: every user in --history)",
)
@click.option(
    "--k", default=10, show_default=True, type=click.IntRange(min=1), help="items per user"
)
@click.option("--out", default=None, help="output CSV (default: stdout)")
@_debug_option
@friendly_errors
def recommend(
    model_uri: str,
    tracking_uri: str | None,
    history: str,
    users: str | None,
    k: int,
    out: str | None,
) -> None:
    """Top-K unseen items per user: CSV user_id,rank,item_id,score."""
    requests = _requests(history, users)
    recommender = _load_model(model_uri, tracking_uri)
    result = recommender.recommend(requests, k=k)
    _report_reasons(result)
    _write(result[["user_id", "rank", "item_id", "score"]], out)


@main.command()
@_model_options
@click.option(
    "--history", required=True, help="CSV/Parquet of user_id,item_id[,rating] to fold users in from"
)
@click.option("--pairs", required=True, help="CSV of user_id,item_id pairs to score")
@click.option("--out", default=None, help="output CSV (default: stdout)")
@_debug_option
@friendly_errors
def predict(
    model_uri: str, tracking_uri: str | None, history: str, pairs: str, out: str | None
) -> None:
    """Predicted scores for given (user, item) pairs: CSV user_id,item_id,score."""
    wanted = pd.read_csv(pairs, dtype=str) if Path(pairs).is_file() else None
    if wanted is None:
        raise UserError(f"{pairs}: no such file")
    missing = {"user_id", "item_id"} - set(wanted.columns)
    if missing:
        raise UserError(
            f"{pairs}: missing column(s) {', '.join(sorted(missing))}; has {', '.join(wanted.columns)}"
        )
    requests = _requests(history, None)
    candidates = (
        wanted.groupby("user_id", sort=False)["item_id"].agg(list).rename("items").reset_index()
    )
    requests = candidates.merge(requests, on="user_id", how="left")
    for column in ("history_items", "history_ratings"):
        requests[column] = requests[column].apply(lambda v: v if isinstance(v, list) else [])
    recommender = _load_model(model_uri, tracking_uri)
    result = recommender.recommend(requests)
    _report_reasons(result)
    _write(result[["user_id", "item_id", "score"]], out)


if __name__ == "__main__":
    main()
