"""How the fedrec commands report errors: one line on stderr. Exit status 2 means the command
was given something it cannot use (a file, a value, a flag, a name): fix it and run again (bad
input is refused before anything is written). Exit status 1 means a run that was set up correctly failed on its way
(too few clients answered, a server went away or does not answer, an unexpected error):
running it again may succeed. With ``--json`` the line is also printed on stdout as ``{"error": ..., "exit_status":
...}``, so that a script reading stdout sees the failure too."""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click

from fedrec.local_server import STARTUP_TIMEOUT_ENV, LocalServerError
from models.data.errors import DataValidationError

# Prefect's words when its temporary (ephemeral) API server does not start in time
_EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


class OneLineError(click.ClickException):
    """An error shown as one line on stderr; ``details`` go into the ``--json`` error too."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}

    def show(self, file: Any = None) -> None:
        click.echo(f"fedrec: error: {self.message}", err=True)


class UserError(OneLineError):
    """A problem the user can fix: the input, a flag, a name."""

    exit_code = 2


class RunFailed(OneLineError):
    """A correctly set-up run that failed on its way."""

    exit_code = 1


class ServerDown(OneLineError):
    """A server the command needs (Prefect's API, MLflow's) does not answer: the same command
    may succeed once it does, so the exit status is a failure's, not bad input's."""

    exit_code = 1


def store_error(err: OSError) -> OneLineError:
    """The command's error for a tracking store it cannot use: a server that does not answer
    (:class:`ServerDown`), else a URI to fix (:class:`UserError`)."""
    from fedrec.model_store import TrackingServerDown

    return (ServerDown if isinstance(err, TrackingServerDown) else UserError)(str(err))


class OneLineGroup(click.Group):
    """Click's own usage errors (a bad choice, a missing value) as one line, like ours, instead
    of the usage block; with ``--json`` among the arguments, every error on stdout too."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            return super().main(argv, *rest, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:  # a bare `fedrec`: the help, not an error
            click.echo(err.format_message())
            raise SystemExit(0) from err
        except click.UsageError as err:
            # the full path of a nested command (fedrec server start), whatever the program name
            command = "fedrec --help"
            if err.ctx and err.ctx.parent:
                command = f"fedrec {err.ctx.command_path.split(' ', 1)[1]} --help"
            message = f"{err.format_message()} (see {command})"
            click.echo(f"fedrec: error: {message}", err=True)
            _json_error(argv, message, 2)
            raise SystemExit(2) from err
        except click.ClickException as err:
            err.show()
            _json_error(argv, err.format_message(), err.exit_code, getattr(err, "details", {}))
            raise SystemExit(err.exit_code) from err
        except click.exceptions.Exit as err:
            raise SystemExit(err.exit_code) from err
        except click.Abort as err:  # Ctrl-C outside a run's own handling (or a second one)
            message = (
                "interrupted (fedrec runs lists a training run it stopped, and how to continue it)"
            )
            click.echo(f"fedrec: error: {message}", err=True)
            _json_error(argv, message, 1)
            raise SystemExit(1) from err


def _json_error(
    argv: list[str], message: str, status: int, details: Mapping[str, Any] | None = None
) -> None:
    """The error as one JSON line on stdout, for a command run with ``--json``: a script that
    reads the summary from stdout sees the failure there too."""
    if "--json" in argv:
        click.echo(json.dumps({"error": message, "exit_status": status, **(details or {})}))


UNKNOWN_KEY = "Extra inputs are not permitted"  # pydantic's words for a key that is no field


def unknown_key_hint(key: object, known: Iterable[str]) -> str:
    """``; did you mean 'rounds'?`` for the closest of the ``known`` keys, or nothing."""
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def one_line_config_error(
    err: Any, files: Mapping[str, str | None] | None = None, known: Iterable[str] = ()
) -> str:
    """A configuration's validation errors on one line, each naming its key as the YAML file
    and the flag spell it (``rounds (--rounds): ... (got -1)``), or as the file that gave it
    when ``files`` maps the key to one (``run.yaml: rounds: ...``); an unknown key gets the
    closest of the ``known`` ones as a suggestion."""
    parts = []
    for e in err.errors():
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
            e = e | {"msg": e["msg"] + unknown_key_hint(e["loc"][0], known)}
        where = ".".join(str(p) for p in e["loc"])
        # the key the YAML file or a flag gave (rating_scale of rating_scale.1)
        top = e["loc"][0] if e["loc"] and isinstance(e["loc"][0], str) else None
        if top is not None and (files or {}).get(top):
            where = f"{(files or {})[top]}: {where}"
        elif top is not None and e["type"] != "extra_forbidden":
            where = f"{where} (--{top.replace('_', '-')})"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        message = f"{e['msg'].removeprefix('Value error, ')}{shown}"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors into one line: exit status 2 for what the user gave, 1 for a run that failed
    (a traceback instead with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.pop("debug", False)
        try:
            return (
                fn(*args, debug=debug, **kwargs)
                if "debug" in inspect.signature(fn).parameters
                else fn(*args, **kwargs)
            )
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(141) from None
        except Exception as err:
            if debug:
                raise
            raise classify(err) from err

    return wrapper


def classify(err: Exception) -> OneLineError:
    """The one-line error for an exception: the user's to fix when fedrec knows it as such,
    else a run failure (as is an error that says ``exit_status = 1``, a quorum failure)."""
    message, fixable = _describe(err)
    fixable = fixable and getattr(err, "exit_status", 2) != 1
    return UserError(message) if fixable else RunFailed(message)


def _describe(err: Exception) -> tuple[str, bool]:
    """One line for an error, and whether it is the user's to fix; libraries that are not
    loaded cannot have raised it."""
    if "pydantic" in sys.modules:
        from pydantic import ValidationError

        if isinstance(err, ValidationError):
            return f"invalid configuration: {one_line_config_error(err)}", True
    if isinstance(err, DataValidationError | FileNotFoundError | LocalServerError):
        return str(err), True
    if getattr(err, "one_line", False):  # an error whose message says all (QuorumError, ...)
        return (str(err).splitlines()[0] if str(err) else type(err).__name__), True
    if "mlflow" in sys.modules:
        from mlflow.exceptions import MlflowException

        if isinstance(err, MlflowException):
            # a 4xx code names something wrong in the request (a model, a run, a value); a 5xx
            # one (INTERNAL_ERROR, also a server that does not answer) is a failure of the run
            fixable = 400 <= err.get_http_status_code() < 500
            return f"MLflow: {err.message.splitlines()[0]}", fixable
    if _EPHEMERAL_TIMEOUT in str(err):
        return (
            "Prefect's temporary API server did not start in time (a busy machine?): run "
            "`fedrec server start` once and every command reuses it, or raise "
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (and {STARTUP_TIMEOUT_ENV})"
        ), False
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", False


class NoInputTracebacks(logging.Filter):
    """Drops the traceback from a log record of an error that is the user's to fix (bad input:
    :func:`classify` makes it a :class:`UserError`): its message says all there is. The record
    itself, with its one line, is kept; any other error keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, Exception) and isinstance(classify(err), UserError):
            record.exc_info, record.exc_text = None, None
        return True


def hide_input_tracebacks() -> None:
    """Install :class:`NoInputTracebacks` on Prefect's flow-run and task-run loggers (once per
    process), so that a worker's log and the Prefect UI show a bad input in one line, as the
    command line does, not under two tracebacks."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoInputTracebacks) for f in logger.filters):
            logger.addFilter(NoInputTracebacks())


def debug_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--debug", is_flag=True, help="show full tracebacks instead of one-line errors"
    )(fn)
