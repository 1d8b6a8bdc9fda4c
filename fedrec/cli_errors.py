"""How the fedrec commands report user errors: one line on stderr, exit status 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from fedrec.local_server import STARTUP_TIMEOUT_ENV, LocalServerError
from models.data.errors import DataValidationError

# Prefect's words when its temporary (ephemeral) API server does not start in time
_EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


class UserError(click.ClickException):
    """A problem the user can fix; shown as one line."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"fedrec: error: {self.message}", err=True)


class OneLineGroup(click.Group):
    """Click's own usage errors (a bad choice, a missing value) as one line, like ours, instead
    of the usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:  # a bare `fedrec`: the help, not an error
            click.echo(err.format_message())
            raise SystemExit(0) from err
        except click.UsageError as err:
            command = (
                f"fedrec {err.ctx.info_name} --help"
                if err.ctx and err.ctx.parent
                else "fedrec --help"
            )
            click.echo(f"fedrec: error: {err.format_message()} (see {command})", err=True)
            raise SystemExit(2) from err
        except click.ClickException as err:
            err.show()
            raise SystemExit(err.exit_code) from err
        except click.exceptions.Exit as err:
            raise SystemExit(err.exit_code) from err
        except click.Abort as err:
            click.echo("Aborted!", err=True)
            raise SystemExit(1) from err


def _one_line(err: Any) -> str:
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
            raise UserError(_describe(err)) from err

    return wrapper


def _describe(err: Exception) -> str:
    """One line for an error; libraries that are not loaded cannot have raised it."""
    if "pydantic" in sys.modules:
        from pydantic import ValidationError

        if isinstance(err, ValidationError):
            return f"invalid configuration: {_one_line(err)}"
    if isinstance(err, DataValidationError | FileNotFoundError | LocalServerError):
        return str(err)
    if getattr(err, "one_line", False):  # an error whose message says all (QuorumError, ...)
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    if "mlflow" in sys.modules:
        from mlflow.exceptions import MlflowException

        if isinstance(err, MlflowException):
            return f"MLflow: {err.message.splitlines()[0]}"
    if _EPHEMERAL_TIMEOUT in str(err):
        return (
            "Prefect's temporary API server did not start in time (a busy machine?): run "
            "`fedrec server start` once and every command reuses it, or raise "
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (and {STARTUP_TIMEOUT_ENV})"
        )
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def debug_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--debug", is_flag=True, help="show full tracebacks instead of one-line errors"
    )(fn)
