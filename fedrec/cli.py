"""The ``fedrec`` command line: train (the Prefect flow), predict and recommend (a registered
model), serve (the nightly schedule) and server (the local Prefect server they report to).

Every flag of ``fedrec train`` is a field of :class:`~fedrec.config.TrainingConfig`, generated from
it, so the flags, the YAML keys and the flow's parameters cannot drift apart. User errors print one
line on stderr and exit with status 2; ``--debug`` shows the traceback instead.

Start-up is kept short: this module imports only click and the standard library; each command
imports the libraries it needs (pandas, Prefect, MLflow, the models) when it runs, after its
inputs have been checked.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from fedrec import local_server
from fedrec.cli_errors import (
    UNKNOWN_KEY,
    OneLineError,
    OneLineGroup,
    RunFailed,
    ServerDown,
    UserError,
    classify,
    debug_option,
    friendly_errors,
    one_line_config_error,
    store_error,
    unknown_key_hint,
)
from fedrec.config_flags import ConfigCommand, config_defaults
from fedrec.inputs import absolute_paths, file_relative_paths

MLFLOW_PORT_ENV = "MLFLOW_PORT"  # where `make mlflow-ui` serves the local store
DEFAULT_MLFLOW_PORT = 5000
#: a sites run's client tasks at once: proxies that wait on the sites' answers, not compute
SITE_PROXY_WORKERS = 32
# MLflow 3's UI shows an experiment as model training, not as a GenAI app (its default view),
# when the page's address asks for it; the experiment's mlflow.experimentKind tag says the same
# to UIs that read the tag
_TRAINING_VIEW = "?workflowType=machine_learning"


class _NoErrorRecords(logging.Filter):
    """Drop Prefect's error records (with their tracebacks) and its line about the failed state:
    the CLI reports the error itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return False
        return not str(record.msg).startswith("Finished in state Failed")


def _quiet_prefect(debug: bool) -> None:
    """Per-round progress is the flow's own log; hide Prefect's per-task chatter and, unless
    debugging, the tracebacks of failed runs; keep Prefect's files in FEDREC_HOME.

    Call before Prefect is imported: its logging settings are read then.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    # a failed flow run's result file goes beside the local server's database, not to
    # ~/.prefect/storage (Prefect's default when PREFECT_HOME is not set)
    storage = ("PREFECT_HOME", "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOCAL_STORAGE_PATH")
    if not any(name in os.environ for name in storage):
        os.environ[storage[1]] = str(local_server.fedrec_home() / "prefect" / "storage")
    # --task-runner dask: the local cluster's start and stop, worker by worker
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    if debug:
        return
    # A temporary API server (only when PREFECT_API_URL names none and fedrec's local server is
    # not used) logs a cancelled event flush as an error when it is stopped at exit.
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL", "CRITICAL")
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NoErrorRecords())


def _note(message: str) -> None:
    """A progress line on stderr (stdout carries results: CSV, the --json summary)."""
    click.echo(f"fedrec: {message}", err=True)


@contextlib.contextmanager
def _step(label: str) -> Iterator[None]:
    """Name a start-up step as it begins and say how long it took when it ends."""
    stream = sys.stderr
    started, ended = time.perf_counter(), " failed\n"
    try:  # the line ends whatever ends the step, a signal during its first write too
        stream.write(f"fedrec: {label} ...")
        stream.flush()
        yield
        ended = f" {time.perf_counter() - started:.1f} s\n"
    finally:
        stream.write(ended)
        stream.flush()


@contextlib.contextmanager
def _status(label: str) -> Iterator[None]:
    """A step whose outcome may still be a one-line error: shown while it lasts on a terminal
    only, and erased after, so that an error stays the only line."""
    stream = sys.stderr
    shown = stream.isatty()
    if shown:
        stream.write(f"fedrec: {label} ...")
        stream.flush()
    try:
        yield
    finally:
        if shown:
            stream.write("\r\033[K")
            stream.flush()


# Commands defined in other modules: name -> (module, one-line help shown by `fedrec --help`)
_LAZY_COMMANDS = {
    "recommend": ("fedrec.cli_models", "Top-K unseen items per user from a registered model."),
    "predict": ("fedrec.cli_models", "Predicted scores for given (user, item) pairs."),
    "models": ("fedrec.cli_models", "Registered models: versions, champion, why promoted."),
    "runs": ("fedrec.cli_models", "Newest training runs: status, version, promotion or error."),
    "rollback": ("fedrec.cli_models", "Make an earlier version the champion again."),
    "budget": (
        "fedrec.cli_budget",
        "Privacy budget of a dataset's users: spent, cap, left; would a run start.",
    ),
    "site": ("fedrec.sites.cli", "A site's process of a real federation, next to its data."),
    "keygen": ("fedrec.sites.cli", "Write an Ed25519 identity key pair (site or coordinator)."),
    "stores": (
        "fedrec.cli_stores",
        "PostgreSQL, Prefect and MLflow servers for a real federation.",
    ),
    "workspaces": (
        "fedrec.cli_workspaces",
        "Workspaces that failed runs keep for --resume (--prune deletes old ones).",
    ),
}


class LazyGroup(OneLineGroup):
    """Commands defined in other modules are imported only when run. Their one-line help is kept
    here, so that listing the commands (``fedrec --help``) imports none of their libraries."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS and cmd_name not in self.commands:
            module = importlib.import_module(_LAZY_COMMANDS[cmd_name][0])
            self.add_command(getattr(module, cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = 200  # a command's first sentence whole: write_dl wraps it, cutting loses words
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is None:
                rows.append((name, _LAZY_COMMANDS[name][1]))
            elif not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def config_values(
    config_file: str | None, overrides: dict[str, Any]
) -> tuple[dict[str, Any], set[str]]:
    """The YAML file's keys (if any; its relative paths taken from its folder), then the flags
    given on the command line (not yet checked; their relative paths are the current folder's);
    and the keys whose value comes from the file."""
    import yaml

    from models.data.errors import reencoding_advice

    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if path.is_dir():
            raise UserError(f"{config_file}: is a folder; allowed: a YAML config file")
        if not path.is_file():
            raise UserError(f"{config_file}: no such config file")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"{config_file}: byte 0x{raw[err.start]:02x} at byte offset {err.start} is not "
                f"valid UTF-8; allowed: {reencoding_advice(raw)}"
            ) from err
        try:
            # a SafeLoader: plain data only
            loaded = yaml.load(text, Loader=_unique_key_loader()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or " ".join(str(err).split())
            raise UserError(f"{config_file}{where}: not valid YAML ({problem})") from err
        if not isinstance(loaded, dict):
            raise UserError(
                f"{config_file}: must be a mapping of config keys, got {type(loaded).__name__}"
            )
        _check_file_keys(config_file, loaded)
        values.update(file_relative_paths(loaded, path.resolve().parent))
    flags = {k: v for k, v in overrides.items() if v is not None}
    from_file = set(values) - set(flags)
    values.update(flags)
    return values, from_file


def _check_file_keys(config_file: str, loaded: dict[str, Any]) -> None:
    """Refuse a key of the config file that is no setting, before any setting is used: a
    misspelt column key (``usr_col``) left the default column in force, and the data check
    then blamed the data file for a column it does not have."""
    known = config_defaults()
    for key, value in loaded.items():
        if key not in known:
            raise UserError(
                f"invalid configuration: {config_file}: {key}: {UNKNOWN_KEY}"
                f"{unknown_key_hint(key, known)} (got {value!r})"
            )


def _unique_key_loader() -> type:
    """PyYAML's safe loader, refusing a key written twice in one mapping (the last one would
    silently win)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


# what a resumed run may still be told: where its run is, and how to run its tasks
_RESUME_TAKES = frozenset({"resume", "tracking_uri", "task_runner", "dask_address"})


def check_resume(values: dict[str, Any]) -> None:
    """Refuse settings beside ``--resume``: the run continues with the configuration it started
    with, so they would be silently ignored."""
    if not values.get("resume"):
        return
    ignored = sorted(set(values) - _RESUME_TAKES)
    if ignored:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in ignored)
        raise UserError(
            f"--resume continues run {values['resume']} with the configuration it started with; "
            f"drop {flags} (they would be ignored), or start a new run without --resume"
        )


def check_inputs(values: dict[str, Any], named: dict[str, Any] | None = None) -> None:
    """Check the run's data files with the core's readers before anything heavy starts.

    Bad data and missing paths end the command here, in one line; a problem with a setting
    that ``named`` maps to its --config file names that file first. Any other surprise (such as
    an option of the wrong type) is left to the configuration's own checks, which follow.
    """
    from fedrec.inputs import InputError, check_synthetic_data, data_sources
    from fedrec.inputs import check_inputs as check_sources
    from models.data.errors import DataValidationError
    from models.data.validate import OUTSIDE_SCALE

    merged = config_defaults() | values
    if isinstance(merged.get("sites"), str) and Path(merged["sites"]).is_file():
        from models.sites.registry import RegistryError, read_registry

        try:  # a sites file that cannot be used ends here, before any flow run
            read_registry(merged["sites"])
        except RegistryError as err:
            raise UserError(str(err)) from err
    if isinstance(merged.get("catalogue"), str):
        from models.data.readers import read_item_list

        try:  # an item list that cannot be read ends here, in one line
            read_item_list(merged["catalogue"], str(merged.get("item_col") or "item_id"))
        except DataValidationError as err:
            raise UserError(str(err)) from err
    spec = {name: merged.get(name) for name in ("data", "train", "valid", "test")}
    if not all(isinstance(v, str | None) for v in spec.values()) or merged.get("sites"):
        return  # a sites run reads no data: the configuration refuses data settings with it
    try:
        if not data_sources(**spec) and spec["valid"] is None and spec["test"] is None:
            if spec["data"] in (None, "synthetic"):
                with _status("checking the synthetic data"):
                    check_synthetic_data(merged)
            return
        with _status("checking the data files"):
            check_sources(merged)
    except (InputError, DataValidationError) as err:
        # a setting out of its own bounds (--key-prefix -1) is named for itself, not through
        # what the data check made of it (too many clients for the keys it cut); a problem of
        # settings together (no field's own) is the configuration's to report after the data's
        try:
            training_config(values, named or {})
        except UserError as config_err:
            fields = getattr(config_err.__cause__, "errors", None)
            if fields is not None and all(e["loc"] for e in fields()):
                raise
        except Exception:  # the data's problem stands
            pass
        source = (named or {}).get(getattr(err, "setting", None) or "")
        message = f"{source}: {err}" if source else str(err)
        if getattr(err, "problem", "").startswith(OUTSIDE_SCALE):
            message += (
                "; --rating-scale LOW,HIGH sets the scale, --rating-scale data takes the data's"
            )
        raise UserError(message) from err
    except Exception:  # reported by TrainingConfig next, in its own words
        return


def prefect_api(*, sites: bool = False) -> str:
    """The Prefect API that runs report to: the one configured (``PREFECT_API_URL`` in the
    environment or Prefect's profile, or a test harness), else fedrec's local server, started
    here when none runs, except for a run of real ``sites``: no site can be connected to a
    server started now, so that is refused. Imports Prefect (call ``_quiet_prefect`` first)."""
    from prefect.settings import get_current_settings

    configured = get_current_settings().api.url
    if configured:
        url = str(configured).rstrip("/")
        for _ in range(10):  # a busy SQLite-backed server answers 503 for a while
            if local_server.is_healthy(url, timeout=5):
                return url
            time.sleep(1)
        raise ServerDown(
            f"the Prefect API at {url} (PREFECT_API_URL) does not answer: start that server, "
            "or unset PREFECT_API_URL to use fedrec's local server"
        )
    state = local_server.read_state()
    if state is None and sites:
        raise UserError(
            "--sites: no Prefect API is set and no local Prefect server runs, so none of the "
            "sites can be waiting for this run's requests; allowed: PREFECT_API_URL set to the "
            "API the sites' `fedrec site run --prefect-api` names (`fedrec stores start` prints "
            "it)"
        )
    if state is None:
        _note(
            "no local Prefect server is running: starting one; it stays up for the next "
            "commands (`fedrec server stop` ends it)"
        )
    state, started = local_server.start()
    if not started:
        _note(f"reporting to the local Prefect server at {state.url} (pid {state.pid})")
    return state.api_url


@contextlib.contextmanager
def using_api(url: str) -> Iterator[None]:
    """Prefect calls in this process, and processes it starts (Dask workers), go to ``url``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def prefect_flow_run_url(flow_run_id: Any) -> str:
    """The flow run's page in the Prefect UI of the current API."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    base = settings.ui_url or str(settings.api.url or "").removesuffix("/api")
    return f"{str(base).rstrip('/')}/runs/flow-run/{flow_run_id}"


def mlflow_run_url(tracking_uri: str, run_id: str) -> tuple[str, str]:
    """The run's page in an MLflow UI, and how to open that UI (empty when it is a server)."""
    from mlflow.tracking import MlflowClient

    from fedrec.home import fedrec_home

    try:
        experiment = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # the run is trained and registered: a missing link is no reason to fail
        return f"run {run_id} in {tracking_uri}", ""
    if tracking_uri.startswith(("http://", "https://")):
        return (
            f"{tracking_uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}{_TRAINING_VIEW}",
            "",
        )
    port = os.environ.get(MLFLOW_PORT_ENV, str(DEFAULT_MLFLOW_PORT))
    local = f"sqlite:///{fedrec_home() / 'mlflow.db'}"
    how = (
        "make mlflow-ui"
        if tracking_uri == local
        else f"mlflow ui --backend-store-uri {tracking_uri} --port {port}"
    )
    return f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{run_id}{_TRAINING_VIEW}", how


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(package_name="fedrec", message="fedrec %(version)s")
def main() -> None:
    """fedrec: federated recommender training with Prefect and MLflow.

    \b
    fedrec train --data synthetic --rounds 10          train, register, promote if better
    fedrec recommend --model models:/fedrec-mf@champion --history h.csv --k 10
    fedrec predict --model models:/fedrec-mf@champion --history h.csv --pairs p.csv
    fedrec models                                      versions, champion, why promoted
    fedrec server status                               the local Prefect server and its UI

    Errors are one line on stderr. Exit status: 0 done; 2 the input, a flag or a name is wrong
    (fix it and run again); 1 the run failed on its way, or a server it needs does not answer
    (e.g. too few clients answered; running it again may succeed). A command's --debug shows the traceback.
    """
    import fedrec

    # the store this command finds by default, as the environment names it when the command
    # starts: MLflow's set_tracking_uri rewrites MLFLOW_TRACKING_URI in this process later
    fedrec.USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None


class Terminated(BaseException):
    """SIGTERM reached ``fedrec train`` (not an ``Exception``: nothing may swallow it)."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_ends_the_command() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the block. Prefect's engine marks its flow run
    crashed on SIGTERM, then passes the signal on to the handler it found: this one. (Signals
    go to the main thread only; elsewhere nothing changes.)"""
    try:
        previous = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ends_on_sigterm(fn: Callable[..., Any]) -> Callable[..., Any]:
    """SIGTERM anywhere in the command ends it with one line and exit status 1; the command
    itself says how to resume when it reaches the flow."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _sigterm_ends_the_command():
            try:
                return fn(*args, **kwargs)
            except Terminated as err:
                raise RunFailed("terminated (SIGTERM)") from err

    return wrapper


@main.command(cls=ConfigCommand)
@click.option(
    "--config",
    "config_file",
    type=str,
    default=None,
    help="YAML file with TrainingConfig keys (its relative paths: from its folder); flags "
    "override it",
)
@click.option(
    "--json", "as_json", is_flag=True, help="print one machine-readable JSON summary on stdout"
)
@click.option(
    "--max-workers",
    type=click.IntRange(min=1),
    default=None,
    help="client tasks run at once: threads, or worker processes of the local Dask cluster "
    f"[default: CPU count, at most 8; Dask: 2; --sites: {SITE_PROXY_WORKERS}, as they wait on "
    "the sites]",
)
@debug_option
@friendly_errors
@_ends_on_sigterm
def train(
    config_file: str | None, as_json: bool, max_workers: int | None, debug: bool, **overrides: Any
) -> None:
    """Train a federated model as a Prefect flow, log it to MLflow, register it and promote it
    to champion if it beats the current one.

    Data: --data synthetic (default), ml-100k / ml-1m (under $FEDREC_DATASETS), a MovieLens folder,
    or a CSV (also .csv.gz) or Parquet file with user_id,item_id[,rating][,timestamp]; or
    --train/--test files.

    Runs report to the Prefect server named by PREFECT_API_URL or, without one, to fedrec's local
    server (`fedrec server start`), which this command starts when it is not running.
    """
    started = time.perf_counter()
    values, from_file = config_values(config_file, overrides)
    check_resume(values)
    if values.get("resume") is None:  # a resumed run reads its own data, not these defaults
        # a bad file ends here, before any library or server is loaded
        check_inputs(values, named=dict.fromkeys(from_file, config_file))
    config = training_config(values, dict.fromkeys(from_file, config_file))
    _check_tracking(config.tracking_uri)
    _quiet_prefect(debug)
    if config.resume is not None:  # before the flow loads, a server starts or a run is made
        with _status("checking the run to resume (loads MLflow)"):
            _check_resumable(config)
    _note(f"data and configuration checked ({time.perf_counter() - started:.1f} s)")
    with _step("loading Prefect, MLflow and the training flow"):
        from flows.training import training_flow
    from prefect.exceptions import TerminationSignal

    from fedrec.runtime import foreground_flow, keep_freed_memory

    keep_freed_memory()
    flow = training_flow(config.task_runner, config.dask_address, task_workers(config, max_workers))
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)  # "no pip in a uv venv"
    if config.sites is not None:  # the sites reach MLflow's artifact proxy: a server's URL
        from fedrec.model_store import resolve_tracking_uri
        from models.privacy.redaction import redact_uri

        uri = resolve_tracking_uri(config.tracking_uri, create=False)
        if not uri.startswith(("http://", "https://")):
            raise UserError(
                f"--sites: the tracking URI {redact_uri(uri)} is not an MLflow server the sites "
                "can reach; allowed: --tracking-uri http://HOST:PORT of an MLflow server with "
                "the artifact proxy (`fedrec stores start` prints it)"
            )
    if config.resume is None:  # before a server starts or a run is made
        from flows.training import check_private_places

        check_private_places(config)
    api_url = prefect_api(sites=config.sites is not None)
    started = time.perf_counter()
    # MLflow prints registry notices on stdout; with --json, stdout carries the summary only.
    with (
        using_api(api_url),
        foreground_flow(),
        contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext(),
    ):
        _crash_lost_runs(config.tracking_uri)
        try:
            state = flow(**config.model_dump(), return_state=True)
            flow_run_url = prefect_flow_run_url(state.state_details.flow_run_id)
            summary = state.result()
        except KeyboardInterrupt as err:
            raise _with_resume_hint(RunFailed("interrupted"), config) from err
        except (TerminationSignal, Terminated) as err:  # systemd, Kubernetes, `timeout` stop it
            raise _with_resume_hint(RunFailed("terminated (SIGTERM)"), config) from err
        except Exception as err:
            if debug:
                raise
            raise _with_resume_hint(classify(err), config) from err
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["prefect_flow_run_url"] = flow_run_url
    mlflow_url, open_mlflow = (
        mlflow_run_url(summary["tracking_uri"], summary["run_id"])
        if summary.get("run_id")
        else ("", "")
    )
    summary["mlflow_run_url"] = mlflow_url or None  # a run that trained nothing has no run
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    if summary.get("skipped"):
        click.echo(f"\n{summary['reason']} (model {summary['model_name']})")
        click.echo(f"Prefect flow run: {flow_run_url}")
        return
    click.echo(
        f"\nmodel {summary['model_name']} version {summary['model_version']}: "
        f"{'promoted to champion' if summary['promoted'] else 'not promoted'} ({summary['reason']})"
    )
    click.echo(metrics_line(summary))
    if summary.get("dp_not_covered"):  # the run's log warned at its start; said again here
        click.echo(f"not covered by DP: {summary['dp_not_covered']}")
    if summary.get("sites"):
        click.echo("\n".join(sites_lines(summary["sites"])))
    click.echo(
        f"MLflow run:       {mlflow_url}" + (f"  (UI: {open_mlflow})" if open_mlflow else "")
    )
    click.echo(f"Prefect flow run: {flow_run_url}")


def task_workers(config: Any, max_workers: int | None) -> int | None:
    """How many client tasks the run of ``config`` (a TrainingConfig) runs at once:
    ``--max-workers`` when given; else for a run of real sites :data:`SITE_PROXY_WORKERS`, so
    that every site is asked at once, and for a simulated run None (the task runner's default:
    CPU count, at most 8; Dask: 2)."""
    if max_workers is None and config.sites is not None:
        return SITE_PROXY_WORKERS
    return max_workers


def metrics_line(summary: dict[str, Any]) -> str:
    """The summary's line of headline metrics (each released one with its DP noise's standard
    deviation) and the run's seconds."""
    from models.promotion import noise_metric

    metrics = summary["metrics"]
    k = summary.get("top_k", 10)  # the run's K: its ranking metrics are *_at_K
    shown = {"valid RMSE": "valid/rmse", "test RMSE": "test/rmse", f"select NDCG@{k}": f"select/ndcg_at_{k}",
             f"test Recall@{k}": f"test/recall_at_{k}", f"test NDCG@{k}": f"test/ndcg_at_{k}"}  # fmt: skip
    parts = [
        f"{label} {metrics[key]:.4f}"
        + (f" ± {metrics[noise]:.4f}" if (noise := noise_metric(key)) in metrics else "")
        for label, key in shown.items()
        if key in metrics
    ]
    return f"{', '.join(parts)}  ({summary['seconds']} s)"


def sites_lines(sites: dict[str, Any]) -> list[str]:
    """The summary's lines on a run of real sites: those that enrolled and each one left out
    with its reason, then each site's missed steps (the run's ``fedrec.sites_missed`` tag)."""
    line = f"sites: {len(sites['enrolled'])} enrolled ({', '.join(sites['enrolled'])})"
    if sites["left_out"]:
        line += "; left out: " + "; ".join(f"{n} ({why})" for n, why in sites["left_out"].items())
    missed = sites.get("missed") or {}
    return [line, *(f"{name} missed: {'; '.join(steps)}" for name, steps in missed.items())]


def training_config(values: dict[str, Any], named: dict[str, Any]) -> Any:
    """The TrainingConfig of checked ``values`` (their paths made absolute), or one line naming
    what is wrong; ``named`` maps the keys that came from a YAML file to that file."""
    values = absolute_paths(values)
    with _status("checking the configuration (loads pandas)"):
        from pydantic import ValidationError

        from fedrec.config import TrainingConfig

        try:
            return TrainingConfig(**values)
        except ValidationError as err:  # keys from the YAML file are named as its keys
            line = one_line_config_error(err, named, known=TrainingConfig.model_fields)
            raise UserError(f"invalid configuration: {line}") from err


def _check_tracking(tracking_uri: str | None) -> None:
    """A tracking store that cannot be used ends the command in one line, before anything
    starts (MLflow alone would retry an absent server for minutes). The default store's folder
    is made by the run itself, so a command refused later leaves no empty FEDREC_HOME behind."""
    from fedrec.model_store import (
        TRACKING_URI_ENV,
        TrackingStoreError,
        check_tracking_uri,
        resolve_tracking_uri,
        tracking_uri_source,
    )

    if not tracking_uri and not os.environ.get(TRACKING_URI_ENV):
        return  # fedrec's own SQLite store under FEDREC_HOME
    try:
        uri = resolve_tracking_uri(tracking_uri, create=False)
        check_tracking_uri(uri, name=tracking_uri_source(tracking_uri))
    except TrackingStoreError as err:
        raise store_error(err) from err


def _check_resumable(config: Any) -> None:
    """Refuse in one line a ``--resume`` of a run there is nothing to continue in."""
    from fedrec.model_store import resolve_tracking_uri
    from tasks.tracking import ResumeError, resumable_run

    try:
        resumable_run(resolve_tracking_uri(config.tracking_uri), config.resume)
    except ResumeError as err:
        raise UserError(str(err)) from err


def _with_resume_hint(error: OneLineError, config: Any) -> OneLineError:
    """``error``, saying how to continue the run when it can be resumed (the ``--json`` error
    then carries its ``run_id``), or what became of the version it registered."""
    from fedrec.model_store import resolve_tracking_uri, resume_command
    from tasks.secure import MASKED_ONCE

    run_id = _resumable_run(config)
    if run_id is not None and MASKED_ONCE in error.message:  # its clients refuse a resume
        return error
    if run_id is not None:
        command = resume_command(run_id, resolve_tracking_uri(config.tracking_uri))
        error.message = f"{error.message}; {command} continues it"
        if getattr(config, "secure_aggregation", False):  # a masked round is not repeated
            error.message += " unless its clients had masked the round it stopped in (then "
            error.message += "start a new run)"
        error.details = {"run_id": run_id}
    else:
        decided = _record_a_cut_short_decision(config)
        if decided is not None:
            error.message = f"{error.message}; {decided}"
    return error


def _this_run(config: Any) -> tuple[Any, Any] | None:
    """(MLflow client, run) of this command's flow run, or of the run it resumes."""
    from mlflow.tracking import MlflowClient

    from fedrec.model_store import resolve_tracking_uri
    from fedrec.runtime import last_flow_run_id

    uri = resolve_tracking_uri(config.tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if config.resume is not None:
        return client, client.get_run(config.resume)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None or last_flow_run_id is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{last_flow_run_id}'",
        max_results=1,
    )
    return (client, found[0]) if found else None


def _resumable_run(config: Any) -> str | None:
    """The MLflow run of this command's flow run if ``--resume`` can continue it: not finished,
    its clients' partitions kept. None when there is none, or it cannot be told."""
    if config.sites is not None:  # real sites: a new run, not a resumed one
        return None
    try:
        from fedrec.model_store import resume_possible
        from tasks.tracking import registered_version

        found = _this_run(config)
        if found is None:
            return None
        client, run = found
        # a run that registered its model before failing has nothing left to resume
        if not resume_possible(run, registered_version(client, run.info.run_id)):
            return None
    except Exception:  # a hint, not a second error
        return None
    return run.info.run_id


def _record_a_cut_short_decision(config: Any) -> str | None:
    """When this command's run registered a version and stopped before recording its promotion
    decision (Ctrl-C between the two): record it now, as the model's next training would, and
    say what it is. None when there is no such version, or it cannot be told."""
    try:
        from fedrec.model_store import resolve_tracking_uri
        from tasks.tracking import registered_version, repair_orphans

        found = _this_run(config)
        if found is None:
            return None
        client, run = found
        version = registered_version(client, run.info.run_id)
        if version is None or "fedrec.promoted" in version.tags:
            return None
        uri = resolve_tracking_uri(config.tracking_uri)
        promoted = repair_orphans.fn(uri, version.name).get(str(version.version))
    except Exception:  # a hint, not a second error
        return None
    if promoted is None:  # its run still says RUNNING: the next training decides
        return None
    named = f"{version.name} version {version.version}"
    if promoted:
        return f"{named} was registered and is the champion"
    return (
        f"{named} was registered, but the stop came before its promotion decision: it is "
        "recorded as not promoted, and the champion is unchanged (train again to compare anew)"
    )


def _crash_lost_runs(tracking_uri: str | None) -> None:
    """Mark earlier foreground training runs whose process died as crashed in Prefect and
    killed in MLflow (where this run's store holds them), and say how to resume each; a failure
    here is reported and does not stop the run."""
    from fedrec.runtime import crash_lost_runs
    from tasks.tracking import close_lost_run, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)

    def tracking_run_of(flow_run_id: str) -> str | None:
        return close_lost_run(uri, flow_run_id)

    try:
        lost = crash_lost_runs("federated-training", tracking_run_of)
    except Exception as err:  # housekeeping: the run itself reports a server that cannot be used
        _note(f"could not look for runs whose process is gone: {type(err).__name__}: {err}")
        return
    if lost:
        named = [f"{name} ({what or 'its MLflow run is not in this store'})" for name, what in lost]
        _note(
            f"marked {len(lost)} earlier run(s) as crashed, their process gone: {'; '.join(named)}"
        )


_DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"


def nightly_deployment(path: Path = _DEPLOYMENTS) -> dict[str, Any]:
    """The `nightly` entry of deployments/prefect.yaml: the one place its schedule is written."""
    import yaml

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
    deployments/prefect.yaml; reports to the Prefect server named by PREFECT_API_URL, else to
    fedrec's local server (started if needed). Runs can be triggered like the worker-based
    deployment's, by the name 'federated-training/nightly-serve' (its own name, so that it never
    takes over the worker deployment 'federated-training/nightly'). Refused while that worker
    deployment's schedule is active on the same server: the two would train at once.
    """
    import yaml

    from fedrec.config import TrainingConfig

    spec = nightly_deployment()
    parameters = dict(spec.get("parameters", {}))
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--param {item!r}: expected KEY=VALUE")
        parameters[key] = yaml.safe_load(value)
    TrainingConfig(**parameters)  # fail here, not at 2 a.m.
    from fedrec.deployment_check import schema_refusal

    refused = schema_refusal(parameters)  # the locked deployment would refuse its own runs
    if refused:
        raise UserError(f"--param: {refused}")
    schedule = spec["schedules"][0]
    _quiet_prefect(debug=False)
    from prefect.schedules import Cron

    try:  # before any server is reached
        when = Cron(cron or schedule["cron"], timezone=schedule.get("timezone", "UTC"))
    except ValueError as err:
        raise UserError(
            f"--cron {cron or schedule['cron']!r}: not a cron schedule; allowed: five fields, "
            "minute hour day-of-month month day-of-week (e.g. '0 2 * * *': 02:00 every day)"
        ) from err
    from fedrec.silent_runs import crash_silent_runs
    from flows.training import federated_training

    limit = spec.get("concurrency_limit", {}).get("limit", 1)
    api = prefect_api()
    with using_api(api):
        from fedrec.lock_parameters import DEPLOYMENT, SERVED, schedule_active

        if schedule_active(DEPLOYMENT):
            raise UserError(
                f"the worker deployment '{DEPLOYMENT}' on this Prefect server has an "
                "active schedule: its runs and this one's would train at the same time and both "
                "register a version (each deployment queues only its own runs); pause its "
                "schedule (the Prefect UI, or `prefect deployment schedule pause "
                f"{DEPLOYMENT} SCHEDULE_ID`) or serve from that deployment's worker"
            )
        try:  # this process killed with its run's: the run is not left Running for good
            crash_silent_runs()
        except Exception as err:  # a safeguard: serving goes on without it, and says so
            _note(f"could not create the automation that crashes silent runs: {err}")
        _lock_served_parameters()
        _serve(
            federated_training,
            api,
            name=SERVED.split("/")[1],
            limit=limit,
            schedules=[when],
            parameters=parameters,
            description=spec.get("description"),
            tags=spec.get("tags"),
        )


def _serve(training: Any, api: str, *, name: str, limit: int, **deployment: Any) -> None:
    """``flow.serve`` with one difference: Ctrl-C or SIGTERM ends serving at once, in one line,
    when the Prefect server at ``api`` no longer answers. Prefect's shutdown pauses the schedule
    through that server, and its retries of every call held the process for minutes (301 s
    measured after Ctrl-C). With the server up, both stop serving as Prefect's SIGTERM does:
    the schedule is paused, a flow run in progress is cancelled. Left alone, the runner gives
    up on a gone server after three failed polls (each retried by Prefect's client), and
    serving then ends with the same line, not the client's error."""
    import asyncio

    from prefect.runner import Runner

    def end_if_the_server_is_gone() -> None:
        if local_server.is_healthy(api, timeout=2):
            return
        # a flow run in progress is a subprocess: without its server it cannot report, and it
        # must not train on, holding the store and the CPUs, after this process exits
        ended = local_server.end_descendants(grace=5.0)
        click.echo(
            f"fedrec: error: the Prefect server at {api} no longer answers: stopped without "
            f"pausing the schedule of '{training.name}/{name}' there (pause it, or it is "
            "replaced when fedrec serve starts again)"
            + (f"; ended the flow run in progress (process {', '.join(map(str, ended))})"
               if ended else ""),
            err=True,
        )  # fmt: skip
        os._exit(1)

    class Serving(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            end_if_the_server_is_gone()
            super().handle_sigterm(*args, **kwargs)

        async def _pause_schedules(self) -> None:
            # every shutdown passes here, also the runner's own when its polls of a gone
            # server failed: pausing through that server would retry for minutes more
            end_if_the_server_is_gone()
            await super()._pause_schedules()

    runner = Serving(name=name, pause_on_shutdown=True, limit=limit)
    signal.signal(signal.SIGTERM, runner.handle_sigterm)  # the runner's, from its start on
    runner.add_flow(training, name=name, concurrency_limit=limit, **deployment)
    click.echo(
        f"serving '{training.name}/{name}': its scheduled runs start in this process; trigger "
        f"one with: PREFECT_API_URL={api} prefect deployment run '{training.name}/{name}' "
        "(without the variable, prefect starts a server of its own that knows no deployment); "
        "Ctrl-C stops serving and pauses its schedule"
    )

    async def serving() -> None:
        # Ctrl-C shuts down as SIGTERM does, from the event loop: the runner stops polling,
        # cancels a run in progress and pauses the schedule (a second Ctrl-C exits at once)
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, runner.handle_sigterm)
        await runner.start()

    try:
        asyncio.run(serving())
    except Exception:  # a call to a gone server that failed outside the polls
        end_if_the_server_is_gone()
        raise
    click.echo(f"stopped serving '{training.name}/{name}'; its schedule is paused")


def _lock_served_parameters() -> None:
    """In a thread, once ``fedrec serve``'s deployment is scheduled: make it refuse unknown
    parameter names at creation (HTTP 409), as ``make deploy`` does the worker deployment's;
    without it a misspelt name made a run that crashed on a signature error."""
    import contextvars
    import threading

    from fedrec.lock_parameters import SERVED, last_written, lock_when_scheduled

    try:
        since = last_written(SERVED)  # before serving writes it
    except Exception as err:  # serving goes on; a misspelt parameter fails its run
        _note(f"could not make {SERVED} refuse unknown parameters: {err}")
        return

    def lock() -> None:
        try:
            if lock_when_scheduled(SERVED, since) is None:
                _note(f"{SERVED} was not scheduled in time: unknown parameters not refused")
        except Exception as err:  # serving goes on; a misspelt parameter fails its run
            _note(f"could not make {SERVED} refuse unknown parameters: {err}")

    context = contextvars.copy_context()  # the Prefect API this command uses
    threading.Thread(target=context.run, args=(lock,), name="lock-parameters", daemon=True).start()


@main.group()
def server() -> None:
    """The local Prefect server (API and UI on 127.0.0.1) that fedrec's commands report to.

    State, PID file and log live in FEDREC_HOME/server (FEDREC_HOME defaults to ./.fedrec); the
    server's database in PREFECT_HOME (default FEDREC_HOME/prefect). A PREFECT_API_URL set in the
    environment takes precedence: commands then report there and start nothing.
    """


@server.command("start")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help=f"port to listen on [default: ${local_server.PORT_ENV}, else {local_server.DEFAULT_PORT} "
    "if free, else any free port]",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=None,
    help=f"seconds to wait for the server to answer [default: ${local_server.STARTUP_TIMEOUT_ENV}, "
    f"else {local_server.DEFAULT_STARTUP_TIMEOUT:.0f}]",
)
@debug_option
@friendly_errors
def server_start(port: int | None, timeout: float | None) -> None:
    """Start the local Prefect server in the background (or find it running) and wait until it
    answers."""
    state, started = local_server.start(port=port, timeout=timeout)
    asked, named = port, f"--port {port}"
    if asked is None and os.environ.get(local_server.PORT_ENV, "").strip().isdigit():
        asked = int(os.environ[local_server.PORT_ENV])
        named = f"{local_server.PORT_ENV}={asked}"
    if not started and asked is not None and asked != state.port:
        raise UserError(
            f"{named}: the local Prefect server is already running at {state.url} (pid "
            f"{state.pid}); stop it first (fedrec server stop) to move it to port {asked}"
        )
    if not started:
        click.echo(f"a local Prefect server is already running at {state.url} (pid {state.pid})")
    click.echo(f"Prefect UI:  {state.url}")
    click.echo(f"API:         {state.api_url}  (used by fedrec train and fedrec serve)")
    click.echo(f"log:         {local_server.log_path()}")
    click.echo("stop it:     fedrec server stop")
    if os.environ.get("PREFECT_API_URL", "").rstrip("/") not in ("", state.api_url):
        _note(
            f"PREFECT_API_URL is set to {os.environ['PREFECT_API_URL']}: commands report there, "
            "not to this server"
        )


@server.command("stop")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=local_server.STOP_GRACE,
    show_default=True,
    help="seconds between SIGTERM and SIGKILL",
)
@debug_option
@friendly_errors
def server_stop(grace: float) -> None:
    """Stop the local Prefect server (SIGTERM, then SIGKILL after a grace period)."""
    state = local_server.stop(grace=grace)
    if state is None:
        click.echo(f"no local Prefect server is running (FEDREC_HOME={local_server.fedrec_home()})")
    else:
        click.echo(f"stopped the local Prefect server at {state.url} (pid {state.pid})")


def configured_api() -> str | None:
    """The Prefect API that ``PREFECT_API_URL`` names (the environment, else Prefect's profile),
    which fedrec's commands use instead of the local server; None when none is set."""
    url = os.environ.get("PREFECT_API_URL")
    if url is None:  # Prefect's profile: an import of about a second
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
    return str(url).rstrip("/") if url else None


@server.command("status")
def server_status() -> None:
    """URL and health of the Prefect server fedrec's commands report to: the one PREFECT_API_URL
    names, else the local server (with its PID); exit status 0 only when it answers."""
    configured = configured_api()
    state = local_server.read_state()
    if configured is not None:
        healthy = local_server.is_healthy(configured)
        click.echo(f"api:     {configured}  (PREFECT_API_URL: fedrec's commands report to it)")
        click.echo(f"health:  {'healthy' if healthy else 'not answering'}")
        if state is not None and state.api_url != configured:
            click.echo(
                f"also:    fedrec's local server at {state.api_url} (pid {state.pid}), unused"
            )
        if not healthy:
            raise SystemExit(1)
        return
    if state is None:
        click.echo(f"no local Prefect server is running (FEDREC_HOME={local_server.fedrec_home()})")
        raise SystemExit(1)
    healthy = local_server.is_healthy(state.api_url)
    click.echo(f"url:     {state.url}")
    click.echo(f"api:     {state.api_url}")
    click.echo(f"pid:     {state.pid}")
    click.echo(f"uptime:  {time.time() - state.started_at:.0f} s")
    click.echo(f"health:  {'healthy' if healthy else 'not answering (starting, or busy)'}")
    click.echo(f"log:     {local_server.log_path()}")
    if not healthy:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
