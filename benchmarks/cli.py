"""The command line from a newcomer's seat: does a first training run survive a busy machine, and
how long do everyday commands take in a fresh process?

(a) ``fedrec train --data synthetic --rounds 2`` ten times in a row in a fresh FEDREC_HOME (the
    first run starts fedrec's local Prefect server, the others reuse it) while three CPU-bound
    processes, started and stopped here, compete for the cores. Each run has its own seed, so each
    trains and registers a model. Counted: runs that exit 0.
(b) cold processes, medians of 5 (after one untimed warm-up): ``fedrec --help``,
    ``fedrec train --help``, ``fedrec train --data missing.csv``, ``fedrec train`` on a CSV with a
    bad header, and ``fedrec recommend`` for one user from the store (a) filled.

Prints a table and writes ``benchmarks/results/cli.json``. Run: ``make bench-cli``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import HelpFormatter
from fedrec import local_server

RESULTS = Path(__file__).resolve().parent / "results" / "cli.json"
FEDREC = str(Path(sys.executable).parent / "fedrec")


def _env(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}  # fmt: skip
    return env | {"FEDREC_HOME": str(home), "FEDREC_PREFECT_PORT": str(port),
                  "PREFECT_HOME": str(home / "prefect")}  # fmt: skip


def _run(args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"exit": None, "seconds": round(time.perf_counter() - started, 2),
                "error": f"no answer in {timeout:.0f} s"}  # fmt: skip
    seconds = round(time.perf_counter() - started, 2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("fedrec: error:")]
    return {"exit": done.returncode, "seconds": seconds, "error": errors[-1] if errors else None,
            "stderr": done.stderr, "stdout": done.stdout}  # fmt: skip


def _hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def train_under_load(home: Path, port: int, *, runs: int, hogs: int, rounds: int) -> dict[str, Any]:
    """(a): ``runs`` trainings in a row while ``hogs`` busy loops run."""
    env = _env(home, port)
    busy = _hogs(hogs)
    load_before = os.getloadavg()
    results = []
    try:
        time.sleep(2)  # let the busy loops take the cores first
        for seed in range(runs):
            args = [FEDREC, "train", "--data", "synthetic", "--rounds", str(rounds),
                    "--seed", str(seed), "--json"]  # fmt: skip
            outcome = _run(args, env, timeout=1800)
            summary = {}
            if outcome["exit"] == 0:
                summary = json.loads(outcome["stdout"].strip().splitlines()[-1])
            ready = [line for line in outcome["stderr"].splitlines() if "ready in" in line]
            results.append({
                "seed": seed, "exit": outcome["exit"], "seconds": outcome["seconds"],
                "error": outcome["error"], "started_server": bool(ready),
                "server_start": ready[0].rsplit("ready in", 1)[1].strip() if ready else None,
                "promoted": summary.get("promoted"), "valid/rmse": summary.get("metrics", {}).get("valid/rmse"),
            })  # fmt: skip
            row = results[-1]
            print(f"  run {seed + 1:2d}/{runs}: exit {row['exit']}, {row['seconds']:6.1f} s"
                  + (f", started the server ({row['server_start']})" if row["started_server"] else "")
                  + (f"  {row['error']}" if row["error"] else ""), flush=True)  # fmt: skip
    finally:
        for hog in busy:
            hog.kill()
            hog.wait()
    return {
        "command": f"fedrec train --data synthetic --rounds {rounds} --seed N",
        "busy_processes": hogs,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "successes": sum(r["exit"] == 0 for r in results),
        "runs": results,
    }


def cold_timings(home: Path, port: int, scratch: Path, *, repeats: int) -> dict[str, Any]:
    """(b): medians of ``repeats`` fresh processes per command (after one warm-up each)."""
    env = _env(home, port)
    bad = scratch / "bad.csv"
    bad.write_text("user_id,movie,rating\n" + "".join(f"{u},{u % 7},4\n" for u in range(50)))
    history = scratch / "history.csv"  # one user of the synthetic catalogue (ids 0..999)
    history.write_text("user_id,item_id,rating\n7,1,5\n7,2,4\n7,3,5\n")
    commands = {
        "fedrec --help": ([FEDREC, "--help"], 0),
        "fedrec train --help": ([FEDREC, "train", "--help"], 0),
        "fedrec train --data missing.csv": ([FEDREC, "train", "--data", str(scratch / "missing.csv")], 2),
        "fedrec train --data bad.csv (bad header)": ([FEDREC, "train", "--data", str(bad)], 2),
        "fedrec recommend (one user, local store)": (
            [FEDREC, "recommend", "--history", str(history), "--k", "10"], 0),
    }  # fmt: skip
    timings = {}
    for label, (args, expected) in commands.items():
        _run(args, env, timeout=600)  # warm-up: page cache, bytecode, the train-flag cache
        runs = [_run(args, env, timeout=600) for _ in range(repeats)]
        seconds = [r["seconds"] for r in runs]
        timings[label] = {
            "median_seconds": round(statistics.median(seconds), 2),
            "min_seconds": min(seconds), "max_seconds": max(seconds), "seconds": seconds,
            "exits_as_expected": all(r["exit"] == expected for r in runs),
            "answer": (runs[-1]["error"] or runs[-1]["stdout"].strip().splitlines()[:2]),
        }  # fmt: skip
        print(f"  {label:42s} median {timings[label]['median_seconds']:5.2f} s "
              f"(min {min(seconds):.2f}, max {max(seconds):.2f})", flush=True)  # fmt: skip
    return {"repeats": repeats, "load_average": [round(x, 2) for x in os.getloadavg()],
            "commands": timings}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--hogs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedrec-bench-cli-") as tmp:
        scratch = Path(tmp)
        home, port = scratch / "home", local_server.free_port()
        try:
            print(f"(a) {args.runs} trainings with {args.hogs} CPU-bound processes running "
                  f"({os.cpu_count()} cores), fresh FEDREC_HOME", flush=True)  # fmt: skip
            load = train_under_load(home, port, runs=args.runs, hogs=args.hogs, rounds=args.rounds)
            print(f"(b) cold processes, medians of {args.repeats}", flush=True)
            cold = cold_timings(home, port, scratch, repeats=args.repeats)
        finally:
            subprocess.run([FEDREC, "server", "stop"], env=_env(home, port), capture_output=True)

    result = {
        "benchmark": "cli", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "shared machine: other engineers' processes ran too (see load averages)"},
        "command": "python -m benchmarks.cli " + " ".join(sys.argv[1:]),
        "train_under_load": load, "cold": cold,
    }  # fmt: skip
    print(f"\n{'what':48s} {'result':>20s}")
    print(f"{'train under load: successes':48s} {load['successes']:>17d}/{args.runs}")
    first = load["runs"][0] if load["runs"] else {}
    print(f"{'  first run (starts the server)':48s} {first.get('seconds', 0):>18.1f} s")
    later = [r["seconds"] for r in load["runs"][1:] if r["exit"] == 0]
    if later:
        print(f"{'  later runs, median':48s} {statistics.median(later):>18.1f} s")
    for label, timing in cold["commands"].items():
        print(f"{label:48s} {timing['median_seconds']:>18.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
