"""The ``fedrec`` command line: train (the Prefect flow), predict and recommend (a registered model).

Every flag of ``fedrec train`` is a field of :class:`~fedrec.config.TrainingConfig`, generated from
it, so the flags, the YAML keys and the flow's parameters cannot drift apart. User errors print one
line on stderr and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
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
import yaml

from fedrec.cli_errors import OneLineGroup, UserError, debug_option, friendly_errors
from fedrec.cli_models import predict, recommend
from fedrec.config import TrainingConfig

# Config fields without a flag of their own: set them in the --config YAML file.
_FILE_ONLY = {"synthetic_users", "synthetic_items", "synthetic_interactions", "local_epochs", "local_lr",
              "batch_size", "prox_mu", "server_lr", "relevance_threshold", "task_retries", "max_client_regression",
              "user_col", "item_col", "rating_col", "timestamp_col", "rating_scale", "fault_clients",
              "fault_dropout_clients"}  # fmt: skip


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
    # --task-runner dask: the local cluster's start and stop, worker by worker
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
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
        if annotation is bool:  # --secure-aggregation / --no-secure-aggregation
            fn = click.option(
                f"{flag}/--no-{flag[2:]}", name, default=None,
                help=f"{field.description} [default: {'on' if default else 'off'}]",
            )(fn)  # fmt: skip
            continue
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


@click.group(
    cls=OneLineGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
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
    help="client tasks run at once: threads, or worker processes of the local Dask cluster "
    "[default: CPU count, at most 8; Dask: 2]",
)
@debug_option
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
    from flows.training import training_flow

    flow = training_flow(config.task_runner, config.dask_address, max_workers)
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
    shown = {"valid RMSE": "valid_rmse", "test RMSE": "test_rmse", "test Recall@10": "test_recall_at_10",
             "test NDCG@10": "test_ndcg_at_10"}  # fmt: skip
    parts = [f"{label} {metrics[key]:.4f}" for label, key in shown.items() if key in metrics]
    click.echo(f"{', '.join(parts)}  ({summary['seconds']} s)")
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
@debug_option
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


main.add_command(recommend)
main.add_command(predict)

if __name__ == "__main__":
    main()
