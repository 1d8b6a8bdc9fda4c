"""Orchestration overhead: the Prefect flow (with MLflow tracking, registry and promotion) against
the same core calls in a plain Python loop, on ML-100K with 10 clients x 20 rounds.

A real ``prefect server`` is started on a free loopback port first; its start-up is timed and
reported separately, not charged to the flow. Flow and loop runs alternate, and medians are
reported (2-core machines are noisy).

    uv run python -m benchmarks.overhead [--repeats 3] [--rounds 20] [--data ml-100k]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import machine, median, print_table, write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str, float]:
    """`prefect server start` on 127.0.0.1; returns the process, its API URL and seconds to healthy."""
    port = _free_port()
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = started + 120
    while time.perf_counter() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return proc, url, time.perf_counter() - started
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.terminate()
    raise RuntimeError("prefect server did not become healthy within 120 s")


def plain_loop(config) -> float:
    """The flow's core work without Prefect or MLflow: load, shard, rounds with evaluation, test."""
    from models.mf.federated import run_federated
    from tasks.data import load_interactions, plan_clients

    started = time.perf_counter()
    data, split = load_interactions.fn(config)
    clients = plan_clients(data, split, config)
    mf = config.mf_config()
    # the flow evaluates valid and test on every client each round; so does this loop
    run_federated(
        clients,
        data.n_items,
        mf,
        rounds=config.rounds,
        seed=config.seed,
        eval_splits=("valid", "test"),
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    ns = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="fedrec-overhead-"))
    server, api_url, startup = start_prefect_server(scratch / "prefect")
    os.environ.update(
        {
            "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "FEDREC_HOME": str(scratch / "home"),
        }
    )
    try:
        from fedrec.config import TrainingConfig
        from fedrec.runtime import keep_freed_memory
        from flows.training import federated_training

        keep_freed_memory()
        config = TrainingConfig(
            data=ns.data,
            rounds=ns.rounds,
            clients=ns.clients,
            tracking_uri=f"sqlite:///{scratch / 'mlflow.db'}",
            skip_if_unchanged=False,  # every repeat trains; otherwise repeats 2+ would be no-ops
        )
        plain_loop(config)  # warm-up: imports, page cache, allocator
        flow_s, loop_s = [], []
        for i in range(ns.repeats):
            started = time.perf_counter()
            federated_training(**config.model_dump())
            flow_s.append(time.perf_counter() - started)
            loop_s.append(plain_loop(config))
            print(
                f"repeat {i + 1}: flow {flow_s[-1]:.2f} s, plain loop {loop_s[-1]:.2f} s",
                flush=True,
            )
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(scratch, ignore_errors=True)

    ratios = [f / p for f, p in zip(flow_s, loop_s, strict=True)]
    row = {
        "data": ns.data,
        "clients": ns.clients,
        "rounds": ns.rounds,
        "flow_s": median(flow_s),
        "loop_s": median(loop_s),
        "ratio": median(ratios),
        "server_start_s": startup,
    }
    print()
    print_table([row], list(row))
    path = write_json(
        f"overhead_{ns.data}",
        {
            "machine": machine(),
            "args": vars(ns),
            "summary": row,
            "flow_seconds": flow_s,
            "loop_seconds": loop_s,
            "ratios": ratios,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
