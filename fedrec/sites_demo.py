"""``make sites-demo``: a real federation on this one machine.

The demo plays every party of a cross-silo deployment:

1. the coordinator's operator starts the stores (:mod:`fedrec.stores`: PostgreSQL, a Prefect
   server and an MLflow server with the artifact proxy) and generates the coordinator's key;
2. ML-100K is split by user occupation into three groups of about equal row counts, one per
   site: the stand-in for three sites that each already hold their own rows;
3. each site generates its key (``fedrec keygen``) and starts ``fedrec site run`` in a mount
   namespace of its own (``unshare -m``), on a private tmpfs holding only its rows: the copy
   the demo wrote is deleted as the site takes it, and outside the namespace the tmpfs's mount
   point stays an empty folder;
4. the coordinator runs ``fedrec train --sites sites.yaml`` against the stores, which registers
   the model and promotes it when it beats the champion;
5. one JSON line summarises the run; every process the demo started is stopped by its pid,
   whatever happened (the stores too).

What the namespaces show is the data path, not a boundary against root: every site runs as the
same user here, and root can still reach a process's files through ``/proc/<pid>/root``. Real
sites run on their own machines.

Runs as root (``unshare -m``) or, where the kernel allows user namespaces, as any user
(``unshare -Urm``). Imports only the standard library and click at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from fedrec.cli_errors import UserError, debug_option, friendly_errors
from fedrec.stores import Stores, StoresError, start_stores, stop_stores
from models.files import make_private_folder

SITE_NAMES = ("site-a", "site-b", "site-c")
MODEL_NAME = "fedrec-sites-demo"
TMPFS_SIZE = "64m"
STOP_GRACE = 10.0
# What `fedrec site run` logs once its rows are loaded and it polls for requests
SITE_READY = "polling"
ROWS_FILE = "ratings.csv"

# Runs in the site's new mount namespace: $1 mount point, $2 the rows handed over, then the
# site's command. The copy outside is removed once the private copy exists.
_ISOLATE = (
    f'umask 077 && mount -t tmpfs -o size={TMPFS_SIZE},mode=0700 none "$1" '
    f'&& cp "$2" "$1/{ROWS_FILE}" && rm -f "$2" && shift 2 && exec "$@"'
)


class DemoError(RuntimeError):
    """A step of the demo failed; the message is one line that names the step."""


@dataclass(frozen=True)
class SiteShare:
    """One site's part of the split: which occupations, how many rows and users."""

    name: str
    occupations: tuple[str, ...]
    rows: int
    users: int


def occupation_groups(rows_per_occupation: dict[str, int], groups: int) -> list[list[str]]:
    """Occupations in ``groups`` sets of about equal row counts: largest occupation first, each
    to the set with the fewest rows so far (ties to the first set).

    Raises
    ------
    DemoError
        When there are fewer occupations than groups.
    """
    if len(rows_per_occupation) < groups:
        raise DemoError(f"{len(rows_per_occupation)} occupations cannot fill {groups} sites")
    sets: list[list[str]] = [[] for _ in range(groups)]
    totals = [0] * groups
    for occupation, count in sorted(rows_per_occupation.items(), key=lambda kv: (-kv[1], kv[0])):
        lightest = totals.index(min(totals))
        sets[lightest].append(occupation)
        totals[lightest] += count
    return [sorted(s) for s in sets]


def split_by_occupation(dataset: Path, out: Path, names: Sequence[str]) -> list[SiteShare]:
    """Write ``out/<name>.csv`` (user_id,item_id,rating,timestamp; 0600) for each site: the
    ML-100K rows of the users whose occupation falls in that site's group.

    Raises
    ------
    DemoError
        When ``dataset`` lacks ``u.data`` or ``u.user``.
    """
    import pandas as pd

    ratings_file, users_file = dataset / "u.data", dataset / "u.user"
    for path in (ratings_file, users_file):
        if not path.is_file():
            raise DemoError(f"{path}: missing (is FEDREC_DATASETS the folder holding ml-100k/?)")
    ratings = pd.read_csv(
        ratings_file, sep="\t", names=["user_id", "item_id", "rating", "timestamp"]
    )
    users = pd.read_csv(
        users_file, sep="|", names=["user_id", "age", "gender", "occupation", "zip"],
        encoding="latin-1",
    )  # fmt: skip
    rows = ratings.merge(users[["user_id", "occupation"]], on="user_id", validate="many_to_one")
    counts = rows["occupation"].value_counts().to_dict()
    make_private_folder(out)
    shares = []
    for name, occupations in zip(names, occupation_groups(counts, len(names)), strict=True):
        part = rows[rows["occupation"].isin(occupations)].drop(columns="occupation")
        path = out / f"{name}.csv"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            part.to_csv(handle, index=False)
        shares.append(SiteShare(name, tuple(occupations), len(part), part["user_id"].nunique()))
    return shares


def namespace_prefix() -> list[str]:
    """``unshare`` with a private mount namespace: plain as root, inside a user namespace
    (mapped to root) otherwise."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise DemoError("`unshare` not found: install util-linux")
    flags = ["-m"] if os.geteuid() == 0 else ["-U", "-r", "-m"]
    return [unshare, *flags, "--propagation", "private"]


def check_namespaces() -> None:
    """Raises DemoError, with unshare's reason, when this process cannot make a private mount
    namespace."""
    try:
        probe = subprocess.run(
            [*namespace_prefix(), "true"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DemoError(f"unshare failed: {err}") from err
    if probe.returncode != 0:
        reason = (
            probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "no reason given"
        )
        raise DemoError(
            f"private mount namespaces are not available ({reason}): run as root, or allow "
            "user namespaces"
        )


def isolated_command(rows: Path, mount: Path, command: Sequence[str]) -> list[str]:
    """The command that gives ``command`` a private tmpfs at ``mount`` holding only ``rows``
    (as ``mount/ratings.csv``), deletes ``rows`` and then runs ``command`` in its place."""
    return [*namespace_prefix(), "sh", "-c", _ISOLATE, "isolate", str(mount), str(rows), *command]


def _stop(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process's group, SIGKILL after ``grace`` s; reaps it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)  # started as the leader of its own session
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:300]
    return ""


class Processes:
    """Processes the demo started, each with its log; :meth:`stop_all` ends them by pid, each
    with ``grace`` seconds between SIGTERM and SIGKILL."""

    def __init__(self, grace: float = STOP_GRACE) -> None:
        self.grace = grace
        self.started: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, name: str, command: Sequence[str], log: Path, **kwargs) -> subprocess.Popen:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                list(command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **kwargs,
            )  # fmt: skip
        self.started[name] = (process, log)
        return process

    def check_alive(self) -> None:
        """Raises DemoError naming the first started process that has exited."""
        for name, (process, log) in self.started.items():
            if process.poll() is not None:
                raise DemoError(
                    f"{name} exited (status {process.returncode}): {_last_line(log)} (log: {log})"
                )

    def stop_all(self) -> None:
        for process, _ in reversed(list(self.started.values())):
            _stop(process, self.grace)


def _fedrec() -> str:
    """The ``fedrec`` entry point of this environment."""
    beside = Path(sys.executable).parent / "fedrec"
    return str(beside) if beside.exists() else "fedrec"


def _run(command: Sequence[str], what: str, **kwargs) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, check=False, **kwargs)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise DemoError(f"{what} failed: {lines[-1] if lines else f'status {done.returncode}'}")
    return done.stdout


def _require_commands() -> None:
    """Fail before starting anything when this checkout lacks the commands the demo drives."""
    fedrec = _fedrec()
    commands = _run([fedrec, "--help"], "fedrec --help")
    for needed in ("keygen", "site"):
        if f"  {needed} " not in commands:
            raise DemoError(f"`fedrec {needed}` is not available in this checkout")
    if "--sites" not in _run([fedrec, "train", "--help"], "fedrec train --help"):
        raise DemoError("`fedrec train --sites` is not available in this checkout")


def _wait_until_ready(processes: Processes, shares: Sequence[SiteShare], split: Path,
                      logs: dict[str, Path], timeout: float) -> None:  # fmt: skip
    """Until each site has taken its rows (the demo's copy is gone) and logs that it polls."""
    deadline = time.monotonic() + timeout
    waiting = {share.name for share in shares}
    while waiting:
        processes.check_alive()
        for name in list(waiting):
            taken = not (split / f"{name}.csv").exists()
            if taken and SITE_READY in logs[name].read_text(errors="replace"):
                waiting.discard(name)
        if waiting and time.monotonic() > deadline:
            raise DemoError(f"{', '.join(sorted(waiting))} not ready within {timeout:.0f} s")
        time.sleep(0.5)


def _write_catalogue(dataset: Path, coordinator: Path) -> Path:
    """The coordinator's published catalogue: MovieLens' public movie list (``u.item``'s ids).
    Sites that answer only private runs send no item ids of their own, so a private run needs
    one."""
    import pandas as pd

    ids = pd.read_csv(dataset / "u.item", sep="|", header=None, usecols=[0], encoding="latin-1")
    path = coordinator / "catalogue.csv"
    pd.DataFrame({"item_id": ids[0]}).to_csv(path, index=False)
    return path


def _write_sites_yaml(
    coordinator: Path, names: Sequence[str], catalogue: Path | None = None
) -> Path:
    lines = ["coordinator_key: keys/coordinator.key", "sites:"]
    if catalogue is not None:
        lines.insert(1, f"catalogue: {catalogue.name}")
    for name in names:
        lines += [f"  - name: {name}", f"    public_key: keys/{name}.pub"]
    path = coordinator / "sites.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _site_epsilon(folder: Path, names: Sequence[str], flow_run_id: str) -> dict[str, float]:
    """What each site counted for the run against its users' budget, from its own state folder
    (the demo is every site's operator too)."""
    from fedrec.sites.budget import ENTRIES

    spent = {}
    for name in names:
        path = folder / "sites" / name / "state" / "budget" / ENTRIES
        lines = path.read_text().splitlines() if path.is_file() else []
        entries = [json.loads(line) for line in lines if line.strip()]
        spent[name] = round(sum(e["epsilon"] for e in entries if e["run"] == flow_run_id), 4)
    return spent


def run_demo(
    folder: Path, dataset: Path, *, rounds: int, timeout: float, dp_epsilon: float | None = None
) -> dict:
    """Run the whole demo in ``folder``; returns the summary. Stops what it started, always.
    With ``dp_epsilon`` the run is private: the sites answer private runs only and the
    coordinator publishes MovieLens' movie list as the catalogue."""
    fedrec = _fedrec()
    _require_commands()
    check_namespaces()
    split = folder / "split"
    coordinator = folder / "coordinator"
    keys = coordinator / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    seconds: dict[str, float] = {}
    processes = Processes()
    stores: Stores | None = None
    try:
        stores = start_stores(folder / "stores", timeout=timeout)
        seconds["stores"] = round(time.monotonic() - started, 1)
        _run([fedrec, "keygen", "--name", "coordinator", "--out", str(keys)], "coordinator keygen")
        shares = split_by_occupation(dataset, split, SITE_NAMES)
        logs = {}
        for share in shares:
            home = folder / "sites" / share.name
            mount = home / "rows"
            mount.mkdir(parents=True, exist_ok=True)
            _run(
                [fedrec, "keygen", "--name", share.name, "--out", str(home)], f"{share.name} keygen"
            )
            shutil.copy(home / f"{share.name}.pub", keys / f"{share.name}.pub")
            site = [fedrec, "site", "run", "--name", share.name, "--data", str(mount / ROWS_FILE),
                    "--prefect-api", stores.prefect_api, "--mlflow", stores.mlflow_uri,
                    "--identity", str(home / f"{share.name}.key"),
                    "--coordinator-key", str(keys / "coordinator.pub"),
                    "--state-dir", str(home / "state")]  # fmt: skip
            if dp_epsilon is None:  # a run without DP: the sites give exact answers
                site.append("--allow-exact")
            logs[share.name] = home / "site.log"
            processes.start(
                share.name,
                isolated_command(split / f"{share.name}.csv", mount, site),
                logs[share.name],
            )
        _wait_until_ready(processes, shares, split, logs, timeout)
        visible = {s.name: sorted(p.name for p in (folder / "sites" / s.name / "rows").iterdir())
                   for s in shares}  # fmt: skip
        if any(visible.values()):
            raise DemoError(f"a site's rows are visible outside its namespace: {visible}")
        seconds["sites"] = round(time.monotonic() - started - seconds["stores"], 1)
        catalogue = None if dp_epsilon is None else _write_catalogue(dataset, coordinator)
        summary = _train(fedrec, coordinator, stores, rounds=rounds, timeout=timeout * 10,
                         dp_epsilon=dp_epsilon, catalogue=catalogue)  # fmt: skip
        processes.check_alive()
    finally:
        processes.stop_all()
        shutil.rmtree(split, ignore_errors=True)
        if stores is not None:
            stop_stores(Path(stores.folder))
    seconds["total"] = round(time.monotonic() - started, 1)
    metrics = summary.get("metrics", {})
    private = {}
    if dp_epsilon is not None:
        flow_run_id = str(summary.get("prefect_flow_run_url", "")).rstrip("/").rsplit("/", 1)[-1]
        private = {
            "dp_epsilon": dp_epsilon,
            "privacy": {k: metrics.get(f"privacy/{k}") for k in ("epsilon", "delta")},
            "site_epsilon": _site_epsilon(folder, SITE_NAMES, flow_run_id),
        }
    return {
        "run_id": summary.get("run_id"),
        "model_name": summary.get("model_name"),
        "model_version": summary.get("model_version"),
        "promoted": summary.get("promoted"),
        "reason": summary.get("reason"),
        "valid_rmse": metrics.get("valid/rmse"),
        "test_rmse": metrics.get("test/rmse"),
        **private,
        "sites": [asdict(s) for s in shares],
        "rows_visible_outside_sites": False,
        "prefect_api": stores.prefect_api,
        "mlflow": stores.mlflow_uri,
        "seconds": seconds | {"training": summary.get("seconds")},
        "folder": str(folder),
    }


def _train(
    fedrec: str,
    coordinator: Path,
    stores: Stores,
    *,
    rounds: int,
    timeout: float,
    dp_epsilon: float | None = None,
    catalogue: Path | None = None,
) -> dict:
    """``fedrec train --sites`` as the coordinator; its --json summary."""
    sites_yaml = _write_sites_yaml(coordinator, SITE_NAMES, catalogue)
    private = [] if dp_epsilon is None else ["--dp-epsilon", str(dp_epsilon)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"PREFECT_API_URL": stores.prefect_api, "FEDREC_HOME": str(coordinator / "home")}
    log = coordinator / "train.log"
    with open(log, "wb") as err:
        done = subprocess.run(
            [fedrec, "train", "--sites", str(sites_yaml), "--tracking-uri", stores.mlflow_uri,
             "--rounds", str(rounds), "--model-name", MODEL_NAME, "--json", *private],
            cwd=coordinator, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise DemoError(f"the coordinator's training failed: {_last_line(log)} (log: {log})")
    return json.loads(done.stdout.strip().splitlines()[-1])


@click.command()
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="where the stores, keys, site states and logs go [default: a new folder under /tmp]",
)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--dp-epsilon",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="train privately at this epsilon: the sites answer private runs only, the coordinator "
    "publishes MovieLens' movie list as the catalogue, and the summary gives what each site "
    "counted for the run against its users' budget",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="seconds to wait for the stores and for each site to be ready",
)
@debug_option
@friendly_errors
def main(folder: Path | None, rounds: int, timeout: float, dp_epsilon: float | None) -> None:
    """Train on ML-100K split by occupation across three isolated site processes, register and
    promote, print one JSON summary line, and stop everything that was started."""
    from models.data.readers import datasets_dir

    dataset = datasets_dir() / "ml-100k"
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="fedrec-sites-demo-"))
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o711)  # searchable by the postgres user, which runs the cluster under root
    # `kill` or a closed terminal still runs the clean-up in run_demo's `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        summary = run_demo(folder, dataset, rounds=rounds, timeout=timeout, dp_epsilon=dp_epsilon)
    except (DemoError, StoresError) as err:
        raise UserError(f"{err} (logs under {folder})") from err
    click.echo(json.dumps(summary))
    click.echo(
        f"fedrec: everything the demo started is stopped; its runs and model stay in {folder}: "
        f"`uv run fedrec stores start --dir {folder / 'stores'}` serves them again",
        err=True,
    )


if __name__ == "__main__":
    main()
