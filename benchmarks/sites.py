"""Seconds per round and bytes per site per round of a real federation of sites on ML-1M, beside
the in-process simulation of the same partition, in one run.

For each partition (default: 3 sites by user occupation, as ``--partition by-key
--partition-key occupation --clients 3``, and 10 iid sites, as the CLI's default ``--clients
10``; users assigned by the same function and seed as ``fedrec train``), the benchmark:

1. starts the production stores once (:func:`fedrec.stores.start_stores`: PostgreSQL, a Prefect
   server and an MLflow server with the artifact proxy, on loopback);
2. writes each site's ML-1M rows to its own CSV, generates the coordinator's and each site's
   key (``fedrec keygen``) and starts one ``fedrec site run`` process per site (separate
   processes on this machine, talking HTTP only);
3. runs the coordinator, ``fedrec train --sites sites.yaml --tracking-uri <mlflow> --json``,
   once per ``--precisions`` value (``precision:`` in sites.yaml), against the same sites;
4. runs the simulation of the same partition on the same stores: ``fedrec train --data ml-1m
   --partition ... --clients N``, client tasks in the coordinator's process (same users per
   client; each client's random train/valid/test cut is drawn from another generator than a
   site's, so the rows held out differ, not their number);
5. runs the reference loop (:func:`models.federation.loop.run_family`) on exactly the sites'
   clients (their rows, the catalogue union, their own split) to check the sites' model.

It reads each run's ``system/round_seconds`` and metrics from MLflow, the bytes each site sent
(its log line per answer) and the global states the coordinator published (the artifact proxy's
folder), prints a table and writes ``results/sites_ml-1m.json``. Everything it started is
stopped by process id, whatever happens.

    nice -n 10 uv run --frozen python -m benchmarks.sites [--rounds 5]
        [--partitions 3:by-key:occupation 10:iid] [--precisions float64 float32] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import HelpFormatter, machine, median, print_table, write_json

SEED = 0
SITE_READY = "polling"  # what `fedrec site run` logs once its rows are loaded
# `fedrec site run` logs one line per answer:
# "<site> answered <kind> [<phase>] round <r> (<n> bytes up) (<s> s; sent: <what the answer holds>)"
ANSWERED = re.compile(
    r"(?P<site>[a-z0-9-]+) answered (?P<kind>\w+) (?P<phase>\S*) ?round (?P<round>\d+) "
    r"\((?P<bytes>\d+) bytes up\) \((?P<seconds>[\d.]+) s[;)]"
)
STATE_FILE = re.compile(r"state-[0-9a-f]{16}\.npz")


class BenchmarkError(RuntimeError):
    """A step failed; the message names it and the log to read."""


@dataclass(frozen=True)
class Partition:
    sites: int
    strategy: str
    key: str | None = None

    @classmethod
    def parse(cls, text: str) -> Partition:
        parts = text.split(":")
        return cls(int(parts[0]), parts[1], parts[2] if len(parts) > 2 else None)

    def label(self) -> str:
        return f"{self.sites} {self.strategy}" + (f" {self.key}" if self.key else "")

    def train_flags(self) -> list[str]:
        flags = ["--partition", self.strategy, "--clients", str(self.sites)]
        return flags + (["--partition-key", self.key] if self.key else [])


# ---- processes --------------------------------------------------------------------------------


def fedrec_command() -> str:
    beside = Path(sys.executable).parent / "fedrec"
    return str(beside) if beside.exists() else "fedrec"


def missing_commands() -> str | None:
    """What this checkout lacks of the sites' commands, or None."""
    fedrec = fedrec_command()

    def help_of(*args: str) -> str:
        done = subprocess.run(
            [fedrec, *args, "--help"], capture_output=True, text=True, check=False
        )
        return done.stdout if done.returncode == 0 else ""

    top = help_of()
    for needed in ("keygen", "site", "stores"):
        if f"  {needed} " not in top:
            return f"`fedrec {needed}`"
    if "--sites" not in help_of("train"):
        return "`fedrec train --sites`"
    return None


class Started:
    """Processes this benchmark started, each in its own session; stopped by pid."""

    def __init__(self) -> None:
        self.processes: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, name: str, command: list[str], log: Path, env: dict[str, str]) -> None:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=env,
            )  # fmt: skip
        self.processes[name] = (process, log)

    def check_alive(self) -> None:
        for name, (process, log) in self.processes.items():
            if process.poll() is not None:
                raise BenchmarkError(f"{name} exited with status {process.returncode} (log {log})")

    def stop(self) -> None:
        for process, _ in self.processes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.processes.clear()


def run_command(command: list[str], what: str, log: Path, env: dict[str, str] | None = None,
                cwd: Path | None = None, timeout: float = 7200) -> str:  # fmt: skip
    """Run to completion; stdout returned, stderr appended to ``log``."""
    with open(log, "ab") as err:
        done = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=cwd,
            timeout=timeout, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise BenchmarkError(f"{what} failed with status {done.returncode} (log {log})")
    return done.stdout


# ---- data ---------------------------------------------------------------------------------------


def write_site_rows(data, partition: Partition, folder: Path) -> list[Path]:
    """One CSV of original ids per site (``user_id,item_id,rating,timestamp``), users assigned as
    ``fedrec train`` assigns them to clients."""
    import pandas as pd

    from models.data.schema import ITEM, RATING, TIMESTAMP, USER
    from models.data.sharding import assign_clients

    client_of_user = assign_clients(
        data, n_clients=partition.sites, strategy=partition.strategy,  # type: ignore[arg-type]
        rng=np.random.default_rng([SEED, 1]), key=partition.key,
    )  # fmt: skip
    frame = data.frame
    rows = pd.DataFrame({
        "user_id": np.asarray(data.user_ids)[frame[USER].to_numpy()],
        "item_id": np.asarray(data.item_ids)[frame[ITEM].to_numpy()],
        "rating": frame[RATING].to_numpy(),
        "timestamp": frame[TIMESTAMP].to_numpy(),
    })  # fmt: skip
    site_of_row = client_of_user[frame[USER].to_numpy()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for site in range(partition.sites):
        path = folder / f"site-{site}.csv"
        rows[site_of_row == site].to_csv(path, index=False)
        paths.append(path)
    return paths


def reference_run(paths: list[Path], rounds: int, factors: int | None) -> dict[str, Any]:
    """The reference loop on exactly the sites' clients: each site's rows as ``fedrec site run``
    reads and splits them, numbered against the catalogue union."""
    from fedrec.config import TrainingConfig
    from fedrec.sites.process import load_site_data
    from models.federation.loop import run_family
    from models.mf.family import ExplicitMF
    from models.sites.catalogue import item_set, site_client, union_catalogue

    config = TrainingConfig(data="ml-1m", seed=SEED, rounds=rounds, factors=factors)
    options = {"user_col": "user_id", "item_col": "item_id", "rating_col": "rating",
               "timestamp_col": "timestamp", "rating_scale": (1.0, 5.0)}  # fmt: skip
    datasets = [load_site_data(str(p), options) for p in paths]
    catalogue = union_catalogue(item_set(d) for d in datasets)
    clients = [
        site_client(d, catalogue, client_id=i, method=config.split,
                    valid_fraction=config.valid_fraction, test_fraction=config.test_fraction)
        for i, d in enumerate(datasets)
    ]  # fmt: skip
    family = ExplicitMF(config.mf_config(), catalogue, ranking=False, baseline=False)
    started = time.perf_counter()
    _, history = run_family(
        family, clients, len(catalogue), rounds=rounds, seed=SEED, eval_splits=("valid", "test")
    )
    return {
        "seconds": time.perf_counter() - started,
        "round_seconds": [h["system/round_seconds"] for h in history],
        "valid_rmse": history[-1]["valid/rmse"],
        "test_rmse": history[-1]["test/rmse"],
        "bytes_uploaded": [h["system/bytes_uploaded"] for h in history],
    }


# ---- reading what a run did ----------------------------------------------------------------------


def mlflow_run(uri: str, run_id: str) -> dict[str, Any]:
    """A run's per-step round seconds and uploads, and its final metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    history = {
        key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in ("system/round_seconds", "system/bytes_uploaded", "system/clients")
    }
    final = client.get_run(run_id).data.metrics
    return {"history": history, "metrics": {k: final[k] for k in sorted(final)}}


def answered_lines(logs: dict[str, Path], since: dict[str, int]) -> list[dict[str, Any]]:
    """The sites' answer lines written after byte offset ``since[site]`` of each log."""
    found = []
    for site, log in logs.items():
        with open(log, "rb") as handle:
            handle.seek(since.get(site, 0))
            text = handle.read().decode(errors="replace")
        for match in ANSWERED.finditer(text):
            found.append({
                # a phase named like its kind is said once ("answered train round 3")
                "site": match["site"], "kind": match["kind"], "phase": match["phase"] or match["kind"],
                "round": int(match["round"]), "bytes": int(match["bytes"]),
                "seconds": float(match["seconds"]),
            })  # fmt: skip
    return found


def exchange_files(artifacts: Path) -> dict[str, int]:
    """Sizes of every file the sites and the coordinator exchanged through the artifact proxy."""
    return {
        str(p.relative_to(artifacts)): p.stat().st_size
        for p in artifacts.rglob("*")
        if p.is_file() and "fedrec-sites" in p.parts
    }


def log_sizes(logs: dict[str, Path]) -> dict[str, int]:
    return {site: log.stat().st_size if log.exists() else 0 for site, log in logs.items()}


# ---- one partition --------------------------------------------------------------------------------


def run_partition(partition: Partition, data, stores, folder: Path, args) -> dict[str, Any]:
    from fedrec.stores import Stores

    assert isinstance(stores, Stores)
    fedrec = fedrec_command()
    home = folder / partition.label().replace(" ", "-")
    keys = home / "coordinator" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    paths = write_site_rows(data, partition, home / "rows")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    env |= {
        "PREFECT_API_URL": stores.prefect_api,
        "FEDREC_HOME": str(home / "coordinator" / "home"),
    }
    log = home / "benchmark.log"
    run_command([fedrec, "keygen", "--name", "coordinator", "--out", str(keys)], "keygen", log)
    names = [f"site-{i}" for i in range(partition.sites)]

    def common(model_name: str) -> list[str]:
        return ["--tracking-uri", stores.mlflow_uri, "--rounds", str(args.rounds),
                "--seed", str(SEED), "--json", "--experiment", "benchmark-sites",
                "--model-name", model_name,
                *(["--factors", str(args.factors)] if args.factors else [])]  # fmt: skip

    sites, logs = Started(), {}
    result: dict[str, Any] = {"partition": partition.label(), "site_rows": []}
    try:
        for name, rows in zip(names, paths, strict=True):
            site_home = home / "sites" / name
            run_command([fedrec, "keygen", "--name", name, "--out", str(site_home)], "keygen", log)
            shutil.copy(site_home / f"{name}.pub", keys / f"{name}.pub")
            logs[name] = site_home / "site.log"
            sites.start(name, [
                fedrec, "site", "run", "--name", name, "--data", str(rows),
                "--prefect-api", stores.prefect_api, "--mlflow", stores.mlflow_uri,
                "--identity", str(site_home / f"{name}.key"),
                "--coordinator-key", str(keys / "coordinator.pub"),
                "--state-dir", str(site_home / "state"), "--allow-exact",  # runs without DP
                *(["--poll", str(args.poll)] if args.poll else []),
            ], logs[name], env)  # fmt: skip
            result["site_rows"].append(len(rows.read_text().splitlines()) - 1)
        wait_ready(sites, logs, args.timeout)
        artifacts = Path(stores.folder) / "artifacts"
        for precision in args.precisions:
            yaml = home / "coordinator" / f"sites-{precision}.yaml"
            yaml.write_text(
                "coordinator_key: keys/coordinator.key\n"
                f"precision: {precision}\nsites:\n"
                + "".join(f"  - name: {n}\n    public_key: keys/{n}.pub\n" for n in names)
            )
            before_files, before_logs = exchange_files(artifacts), log_sizes(logs)
            # --keep-workspace keeps the run's exchange files in the store, to be measured
            command = [fedrec, "train", "--sites", str(yaml), "--keep-workspace",
                       *common("benchmark-sites")]  # fmt: skip
            run = timed_run(command, f"{partition.label()} sites ({precision})", log, env, stores)
            if "error" not in run:
                sites.check_alive()
                files = {
                    k: v for k, v in exchange_files(artifacts).items() if k not in before_files
                }
                run |= {
                    "answers": answered_lines(logs, before_logs),
                    "states": {k: v for k, v in files.items() if STATE_FILE.search(k)},
                    "exchanged_bytes": sum(files.values()),
                }
            result[f"sites_{precision}"] = run
    finally:
        sites.stop()
    command = [fedrec, "train", "--data", str(args.data), *partition.train_flags(),
               *common("benchmark-simulation")]  # fmt: skip
    result["simulation"] = timed_run(command, f"{partition.label()} simulation", log, env, stores)
    result["reference"] = reference_run(paths, args.rounds, args.factors)
    return result


def timed_run(command: list[str], what: str, log: Path, env: dict[str, str], stores) -> dict:
    """One ``fedrec train --json`` run: its wall time, summary and MLflow record, or the error."""
    started = time.perf_counter()
    try:
        out = run_command(command, what, log, env, log.parent / "coordinator")
    except BenchmarkError as err:
        print(f"  {what}: FAILED: {err}", flush=True)
        return {"error": str(err), "error_line": _last_error(log)}
    wall = time.perf_counter() - started
    summary = json.loads(out.strip().splitlines()[-1])
    print(f"  {what}: {wall:.0f} s", flush=True)
    return {
        "wall_seconds": wall,
        "summary": summary,
        "mlflow": mlflow_run(stores.mlflow_uri, summary["run_id"]),
    }


def _last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "error" in ln.lower()]
    return lines[-1][:500] if lines else ""


def wait_ready(sites: Started, logs: dict[str, Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(logs)
    while waiting:
        sites.check_alive()
        waiting = {n for n in waiting if SITE_READY not in logs[n].read_text(errors="replace")}
        if waiting and time.monotonic() > deadline:
            raise BenchmarkError(f"{', '.join(sorted(waiting))} not ready in {timeout:.0f} s")
        time.sleep(0.5)


# ---- the table ------------------------------------------------------------------------------------


def rows_of(result: dict[str, Any], precisions: list[str]) -> list[dict[str, Any]]:
    """One row per way of running the partition: medians over the training rounds after the
    first (the first also builds each client's row layout)."""
    rows = []
    for precision in precisions:
        run = result[f"sites_{precision}"]
        if "error" in run:
            rows.append({"partition": result["partition"], "run": f"sites {precision}: FAILED"})
            continue
        seconds = run["mlflow"]["history"]["system/round_seconds"]
        up = [a["bytes"] for a in run["answers"] if a["kind"] == "train" and a["phase"] == "train"]
        states = list(run["states"].values())
        rows.append({
            "partition": result["partition"], "run": f"sites {precision}",
            "s_per_round": median(seconds[1:] or seconds),
            "first_round_s": seconds[0] if seconds else float("nan"),
            "wall_s": run["wall_seconds"],
            "up_MB_per_site_round": median(up) / 1e6,
            "down_MB_per_site_round": median(states) / 1e6,
            "site_answer_s": median([a["seconds"] for a in run["answers"] if a["kind"] == "train"]),
            "update_MB_metric": _metric_mb(run["mlflow"]),
            "test_rmse": run["mlflow"]["metrics"].get("test/rmse", float("nan")),
        })  # fmt: skip
    if "error" in result["simulation"]:
        rows.append({"partition": result["partition"], "run": "simulation: FAILED"})
    else:
        rows.append(_simulation_row(result))
    ref = result["reference"]
    rows.append({
        "partition": result["partition"], "run": "reference loop, sites' clients",
        "s_per_round": median(ref["round_seconds"][1:] or ref["round_seconds"]),
        "first_round_s": ref["round_seconds"][0], "wall_s": ref["seconds"],
        "up_MB_per_site_round": None, "down_MB_per_site_round": None, "site_answer_s": None,
        "update_MB_metric": median(ref["bytes_uploaded"]) / 1e6 / len(result["site_rows"]),
        "test_rmse": ref["test_rmse"],
    })  # fmt: skip
    return rows


def _simulation_row(result: dict[str, Any]) -> dict[str, Any]:
    sim = result["simulation"]["mlflow"]
    sim_seconds = sim["history"]["system/round_seconds"]
    return {
        "partition": result["partition"], "run": "simulation (in-process tasks)",
        "s_per_round": median(sim_seconds[1:] or sim_seconds),
        "first_round_s": sim_seconds[0] if sim_seconds else float("nan"),
        "wall_s": result["simulation"]["wall_seconds"],
        "up_MB_per_site_round": None,
        "down_MB_per_site_round": None,
        "site_answer_s": None,
        "update_MB_metric": _metric_mb(sim),
        "test_rmse": sim["metrics"].get("test/rmse", float("nan")),
    }  # fmt: skip


def _metric_mb(run: dict[str, Any]) -> float:
    """The flow's ``system/bytes_uploaded`` per client per round (the updates' array bytes, as
    :meth:`models.protocol.ClientUpdate.nbytes` counts them), median over rounds, in MB."""
    history = run["history"]
    pairs = zip(history["system/bytes_uploaded"], history["system/clients"], strict=True)
    per_client = [b / c for b, c in pairs if c]
    return median(per_client) / 1e6


def code_version() -> dict[str, Any]:
    """The commit measured, and which files of the sites' code differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    paths = ["fedrec", "flows", "tasks", "models"]
    return {"head": git("rev-parse", "HEAD"), "uncommitted": git("status", "--short", *paths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--factors", type=int, default=None, help="default: the CLI's")
    parser.add_argument("--partitions", nargs="+", default=["3:by-key:occupation", "10:iid"])
    parser.add_argument("--precisions", nargs="+", default=["float64", "float32"])
    parser.add_argument(
        "--poll", type=float, default=None, help="the sites' poll interval (s; default: theirs)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="for stores and site start")
    parser.add_argument("--dir", type=Path, default=None, help="default: a new folder in /tmp")
    parser.add_argument("--dataset", default="ml-1m", choices=["ml-1m", "ml-100k"])
    parser.add_argument("--output", default=None, help="default: sites_<dataset>")
    args = parser.parse_args()
    from benchmarks.common import load_movielens
    from models.data.readers import datasets_dir

    args.data = datasets_dir() / args.dataset
    if not args.data.is_dir():
        print(f"skipping: {args.dataset} not found under {datasets_dir()} (set FEDREC_DATASETS)")
        return
    missing = missing_commands()
    if missing is not None:
        print(f"skipping: {missing} is not available in this checkout yet")
        sys.exit(2)
    from fedrec.stores import start_stores, stop_stores

    data = load_movielens(args.dataset)
    folder = (args.dir or Path(tempfile.mkdtemp(prefix="fedrec-bench-sites-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o711)  # the postgres user runs the cluster inside it under root
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop everything
    load_before, code = os.getloadavg(), code_version()
    results: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []

    def save() -> Path:
        args_out = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        load = {"load_before": load_before, "load_after": os.getloadavg()}
        return write_json(args.output or f"sites_{args.dataset}", {
            "machine": machine() | load, "args": args_out, "code": code, "summary": rows,
            "results": results, "folder": str(folder),
        })  # fmt: skip

    try:
        stores = start_stores(folder / "stores", timeout=args.timeout)
        for text in args.partitions:
            result = run_partition(Partition.parse(text), data, stores, folder, args)
            results.append(result)
            rows += rows_of(result, args.precisions)
            save()  # what is measured so far survives a later failure
    finally:
        with contextlib.suppress(Exception):
            stop_stores(folder / "stores")
    print(f"\n{args.dataset}, {args.rounds} rounds (load {load_before[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}):")  # fmt: skip
    print_table(rows, list(rows[0]))
    print(f"\nwrote {save()} (logs under {folder})")


if __name__ == "__main__":
    main()
