"""`fedrec workspaces`: the client partitions that runs which did not finish keep for --resume."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import click

from fedrec.cli_errors import UserError, debug_option, friendly_errors
from fedrec.home import fedrec_home

DAY = 86400.0


@dataclass(frozen=True)
class Workspace:
    path: Path
    size: int  # bytes
    written: float  # the newest file's modification time (a run checkpoints every round)


def _is_workspace(path: Path) -> bool:
    """A folder (not a link to one) holding a fedrec partition manifest."""
    from models.data.partitions import read_manifest

    if path.is_symlink() or not path.is_dir():
        return False
    try:
        read_manifest(path)
    except (OSError, ValueError, KeyError, TypeError):  # none, or another program's
        return False
    return True


def find_workspaces(root: Path) -> tuple[list[Workspace], list[Path]]:
    """The run workspaces under ``root``, oldest write first, and the other entries there
    (no fedrec manifest, or a symbolic link: left alone)."""
    found, others = [], []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not _is_workspace(path):
            others.append(path)
            continue
        size, written = 0, path.stat().st_mtime
        for folder, _, files in os.walk(path):
            for name in files:
                stat = Path(folder, name).stat()
                size += stat.st_size
                written = max(written, stat.st_mtime)
        found.append(Workspace(path, size, written))
    return sorted(found, key=lambda w: w.written), others


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@click.command()
@click.option(
    "--prune",
    is_flag=True,
    help="delete the workspaces not written for --older-than days (those runs cannot be resumed "
    "after)",
)
@click.option(
    "--older-than",
    "days",
    type=click.FloatRange(min=0),
    default=7.0,
    show_default=True,
    help="days since a workspace was last written; a running run writes a checkpoint every "
    "round, so 0 would delete a running run's workspace too",
)
@click.option(
    "--remove",
    "remove",
    multiple=True,
    metavar="RUN_ID",
    help="delete the workspace of this run now, whatever its age (repeatable); the run cannot be "
    "resumed after, and a run still going would fail: `fedrec runs` shows which are running",
)
@debug_option
@friendly_errors
def workspaces(prune: bool, days: float, remove: tuple[str, ...]) -> None:
    """The client partitions and checkpoints of runs that failed or were killed, kept in
    FEDREC_HOME/workspaces/RUN_ID for `fedrec train --resume RUN_ID`. A run that succeeds
    removes its own (unless --keep-workspace); these stay until pruned or removed.

    \b
    fedrec workspaces                      each one's run id, size and last write
    fedrec workspaces --prune              delete those not written for 7 days
    fedrec workspaces --prune --older-than 1
    fedrec workspaces --remove RUN_ID      delete one run's workspace
    """
    from fedrec.model_store import recorded_store, resume_command, run_in_store
    from models.data.partitions import is_finished, read_manifest, remove_workspace

    given = click.get_current_context().get_parameter_source("days")
    if not prune and given is click.core.ParameterSource.COMMANDLINE:
        raise UserError(
            "--older-than sets the age --prune deletes from; without --prune it would do "
            "nothing: add --prune (the listing shows every workspace's age)"
        )
    root = fedrec_home() / "workspaces"
    found, others = find_workspaces(root)
    if remove:
        _remove(root, found, remove, prune)
        return
    if not found:
        click.echo(f"no run workspaces in {root}")
    now = time.time()
    freed = removed = 0
    for w in found:
        age = (now - w.written) / DAY
        line = f"{w.path.name}  {_megabytes(w.size):>10}  written {age:.1f} days ago"
        if prune and age >= days and remove_workspace(w.path):
            removed, freed = removed + 1, freed + w.size
            click.echo(f"{line}  removed")
        elif is_finished(w.path):
            click.echo(f"{line}  finished (kept by --keep-workspace): nothing to resume")
        elif read_manifest(w.path).source.startswith("sites:"):
            click.echo(f"{line}  a run of real sites: not resumed (train again with --sites)")
        else:
            store = recorded_store(w.path)  # the run's own (none: it cannot tell)
            in_store = None if store is None else run_in_store(store, w.path.name)
            if in_store is False:  # deleted, or removed by mlflow gc: --resume would not find it
                click.echo(f"{line}  its MLflow run is gone from its store (deleted): nothing "
                           f"to resume; fedrec workspaces --remove {w.path.name} frees it")  # fmt: skip
            else:
                click.echo(f"{line}  resume: {resume_command(w.path.name, store)}")
    for path in others:
        click.echo(f"{path.name}  not a run workspace (no fedrec manifest): left alone")
    if prune:
        click.echo(
            f"removed {removed} workspace(s) not written for {days:g} days, {_megabytes(freed)}"
        )


def _remove(root: Path, found: list[Workspace], names: tuple[str, ...], prune: bool) -> None:
    """Delete the workspaces of the runs ``names``, after checking that each one is there."""
    from models.data.partitions import remove_workspace

    if prune:
        raise UserError("--remove and --prune: give one (--remove deletes the runs named)")
    by_name = {w.path.name: w for w in found}
    for name in names:
        if name not in by_name:
            there = ", ".join(sorted(by_name)) or "none"
            raise UserError(
                f"--remove {name}: no run workspace of that name in {root}; there are: {there}"
            )
    for name in dict.fromkeys(names):
        workspace = by_name[name]
        if remove_workspace(workspace.path):
            click.echo(f"{name}  {_megabytes(workspace.size):>10}  removed")
