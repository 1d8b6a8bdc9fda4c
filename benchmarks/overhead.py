"""Orchestration overhead: the Prefect flow (with MLflow tracking, registry and promotion) against
the same core calls in a plain Python loop, on ML-100K with 10 clients x 20 rounds.

A real ``prefect server`` is started on a free loopback port first; its start-up is timed and
reported separately, not charged to the flow. Both sides are warmed up first (imports, page
cache, and the flow's MLflow store created and migrated: a store's first run pays that once),
the warm-up flow's time reported apart. Flow and loop runs alternate, and medians are reported
(2-core machines are noisy). Besides wall time, the CPU seconds of each side are counted (the
flow's include the Prefect server's), which a loaded machine distorts less; the machine's load
average is recorded with the results.

``--breakdown`` times every task run of the flow: its body (the task's function) and its whole
run through Prefect's task engine, summed by task name.

    uv run python -m benchmarks.overhead [--repeats 3] [--rounds 20] [--data ml-100k] [--breakdown]
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its live descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # after the name: state, ppid, ..., utime (11), stime (12) counted from state = 0
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats.get(current, (0, 0.0))[1]
        todo += [child for child, (parent, _) in stats.items() if parent == current]
    return total


def own_cpu() -> float:
    """CPU seconds of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class TaskTimes:
    """Per task name: the seconds of each run's body and of each whole run through Prefect's
    task engine (state changes, events, parameter resolution around the body)."""

    def __init__(self) -> None:
        self.body: dict[str, list[float]] = defaultdict(list)
        self.engine: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()

    def install(self) -> None:
        import prefect.task_engine as engine
        from prefect.context import TaskRunContext
        from prefect.tasks import Task

        import tasks.clients
        import tasks.data
        import tasks.reporting
        import tasks.secure
        import tasks.server
        import tasks.tracking

        def add(table: dict[str, list[float]], name: str, seconds: float) -> None:
            with self._lock:
                table[name].append(seconds)

        modules = (tasks.clients, tasks.data, tasks.reporting, tasks.secure, tasks.server,
                   tasks.tracking)  # fmt: skip
        for task in {v for m in modules for v in vars(m).values() if isinstance(v, Task)}:
            fn = task.fn

            @functools.wraps(fn)
            def timed(*args, _fn=fn, _name=task.name, **kwargs):
                if TaskRunContext.get() is None:  # called as a function (the plain loop)
                    return _fn(*args, **kwargs)
                started = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    add(self.body, _name, time.perf_counter() - started)

            task.fn = timed
        run_sync = engine.run_task_sync

        def run_task_sync(task, *args, **kwargs):
            started = time.perf_counter()
            try:
                return run_sync(task, *args, **kwargs)
            finally:
                add(self.engine, task.name, time.perf_counter() - started)

        engine.run_task_sync = run_task_sync  # looked up at each call by the engine and runners

    def clear(self) -> None:
        self.body.clear()
        self.engine.clear()

    def rows(self, repeats: int) -> list[dict[str, object]]:
        """Per task name and flow run (sums divided by ``repeats``), most expensive first."""
        rows = []
        for name in sorted(self.engine, key=lambda n: -sum(self.engine[n])):
            body, whole = sum(self.body.get(name, [])), sum(self.engine[name])
            runs = len(self.engine[name])
            rows.append({"task": name, "runs": runs // repeats, "body_s": body / repeats,
                         "run_s": whole / repeats, "prefect_s": (whole - body) / repeats,
                         "prefect_ms_per_run": 1000 * (whole - body) / max(runs, 1)})  # fmt: skip
        return rows


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
    parser.add_argument("--breakdown", action="store_true", help="time every task run")
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
    times = TaskTimes()
    loads = [os.getloadavg()[0]]
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
        if ns.breakdown:
            times.install()
        plain_loop(config)  # warm-up: imports, page cache, allocator
        started = time.perf_counter()
        federated_training(**config.model_dump())  # warm-up: imports, the MLflow store created
        first_flow = time.perf_counter() - started
        print(f"warm-up: first flow run {first_flow:.2f} s", flush=True)
        times.clear()
        flow_s, loop_s, flow_cpu, loop_cpu, server_cpus = [], [], [], [], []
        for i in range(ns.repeats):
            cpu, server_cpu = own_cpu(), cpu_seconds(server.pid)
            started = time.perf_counter()
            federated_training(**config.model_dump())
            flow_s.append(time.perf_counter() - started)
            server_cpus.append(cpu_seconds(server.pid) - server_cpu)
            flow_cpu.append(own_cpu() - cpu + server_cpus[-1])
            cpu = own_cpu()
            loop_s.append(plain_loop(config))
            loop_cpu.append(own_cpu() - cpu)
            loads.append(os.getloadavg()[0])
            print(
                f"repeat {i + 1}: flow {flow_s[-1]:.2f} s ({flow_cpu[-1]:.1f} CPU s), "
                f"plain loop {loop_s[-1]:.2f} s ({loop_cpu[-1]:.1f} CPU s), load {loads[-1]:.1f}",
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
    cpu_ratios = [f / p for f, p in zip(flow_cpu, loop_cpu, strict=True)]
    row = {
        "data": ns.data,
        "clients": ns.clients,
        "rounds": ns.rounds,
        "flow_s": median(flow_s),
        "loop_s": median(loop_s),
        "ratio": median(ratios),
        "cpu_ratio": median(cpu_ratios),
        "server_cpu_s": median(server_cpus),
        "first_flow_s": first_flow,
        "server_start_s": startup,
        "load": median(loads),
    }
    print()
    print_table([row], list(row))
    breakdown = times.rows(ns.repeats) if ns.breakdown else []
    if breakdown:
        print("\nper flow run, by task (seconds summed over its runs):\n")
        print_table(breakdown, list(breakdown[0]))
    path = write_json(
        f"overhead_{ns.data}",
        {
            "machine": machine(),
            "args": vars(ns),
            "summary": row,
            "flow_seconds": flow_s,
            "loop_seconds": loop_s,
            "ratios": ratios,
            "flow_cpu_seconds": flow_cpu,
            "loop_cpu_seconds": loop_cpu,
            "cpu_ratios": cpu_ratios,
            "server_cpu_seconds": server_cpus,
            "load_average_1min": loads,
            "breakdown": breakdown,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
