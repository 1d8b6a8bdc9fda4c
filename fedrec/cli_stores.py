"""`fedrec stores start|stop|status`: the coordinator's PostgreSQL, Prefect and MLflow servers."""

from __future__ import annotations

from pathlib import Path

import click

from fedrec.cli_errors import UserError, debug_option, friendly_errors
from fedrec.stores import StoresError, health, read_stores, start_stores, stop_stores

_DIR = click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="folder holding the cluster, the logs, the artifacts and stores.json",
)


@click.group()
def stores() -> None:
    """The coordinator's stores for a real federation: PostgreSQL, a Prefect server and an MLflow
    server (artifact proxy) on it, all on 127.0.0.1, started in the background and stopped by
    process id.

    \b
    fedrec stores start --dir /srv/fedrec-stores     prints PREFECT_API_URL and the MLflow URI
    fedrec stores status --dir /srv/fedrec-stores
    fedrec stores stop --dir /srv/fedrec-stores      the data stays; start resumes on it
    """


@stores.command("start")
@_DIR
@click.option(
    "--port-base",
    type=click.IntRange(1024, 65533),
    default=None,
    help="PostgreSQL on N, Prefect on N+1, MLflow on N+2 [default: free ports]",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=180.0,
    show_default=True,
    help="seconds to wait for each service to answer",
)
@debug_option
@friendly_errors
def start(folder: Path, port_base: int | None, timeout: float) -> None:
    """Start the stores in DIR (creating the cluster the first time) and wait until they answer."""
    try:
        running = start_stores(folder, timeout=timeout, port_base=port_base)
    except StoresError as err:
        raise UserError(str(err)) from err
    click.echo(f"PREFECT_API_URL={running.prefect_api}")
    click.echo(f"MLFLOW_TRACKING_URI={running.mlflow_uri}")
    click.echo(f"PostgreSQL:  {running.postgres_url} (password in {running.passfile})")
    click.echo(f"stop them:   fedrec stores stop --dir {folder}")


@stores.command("stop")
@_DIR
@debug_option
@friendly_errors
def stop(folder: Path) -> None:
    """Stop the stores recorded in DIR by process id (the servers, then PostgreSQL)."""
    try:
        stopped = stop_stores(folder)
    except StoresError as err:
        raise UserError(str(err)) from err
    if stopped is None:
        click.echo(f"no stores are recorded in {folder}")
        return
    pids = ", ".join(f"{name} {pid}" for name, pid in stopped.pids.items())
    click.echo(f"stopped the stores in {folder} ({pids})")


@stores.command("status")
@_DIR
@debug_option
@friendly_errors
def status(folder: Path) -> None:
    """Each service's address, process id and health; exit status 0 only when all answer."""
    try:
        running = read_stores(folder)
    except StoresError as err:
        raise UserError(str(err)) from err
    if running is None:
        click.echo(f"no stores are recorded in {folder}")
        raise SystemExit(1)
    up = health(running)
    where = {
        "postgres": running.postgres_url,
        "prefect": running.prefect_api,
        "mlflow": running.mlflow_uri,
    }
    for name, url in where.items():
        state = "up" if up[name] else "DOWN"
        click.echo(f"{name:9} {state:5} pid {running.pids.get(name)}  {url}")
    if not all(up.values()):
        raise SystemExit(1)
