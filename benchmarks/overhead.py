"""Orchestration overhead: the Prefect flow (with MLflow tracking, registry and promotion) against
the same core calls in a plain Python loop, on ML-100K with 10 clients x 20 rounds.

A real ``prefect server`` is started on a free loopback port first, with the settings fedrec's
local server uses (:data:`fedrec.local_server.SERVER_SETTINGS`); its start-up is timed and
reported separately, not charged to the flow. Both sides are warmed up first (imports, page
cache, and the flow's MLflow store created and migrated: a store's first run pays that once),
the warm-up flow's time reported apart. Flow and loop runs alternate, and medians are reported
(2-core machines are noisy). Besides wall time, the CPU seconds of each side are counted (the
flow's include the Prefect server's), which a loaded machine distorts less; the machine's load
average is recorded with the results. The flow runs as ``fedrec train`` runs it: in the
foreground, without Prefect's flow run heartbeat (:func:`fedrec.runtime.foreground_flow`).

``--side LABEL:SETTINGS[:CODE]`` (repeatable) compares flows side by side in one run: each side
has its own Prefect server with ``SETTINGS`` (``fedrec``: fedrec's local server; ``prefect``:
Prefect's defaults, as fedrec's server had before; ``nopersist``: fedrec's, without the event
persister, which empties the UI's event feed; ``lean``: also without automations) and its own process running the
flow from the source tree ``CODE`` (default: this one; e.g. a ``git archive`` export of an
earlier commit). Each repeat runs every side's flow, then the plain loop twice in the first
side's process: with numpy's default BLAS threads (one per core) and with one BLAS thread (as
the flow runs its client tasks since it limits BLAS to one thread per task). Each side's ratio is
to the faster of the two loops of the same repeat (``ratio_default_loop``: to the first).

``--breakdown`` times every task run of the flow: its body (the task's function) and its whole
run through Prefect's task engine, summed by task name.

    uv run python -m benchmarks.overhead [--repeats 3] [--rounds 20] [--data ml-100k] [--breakdown]
        [--side before:prefect:/tmp/export --side after:fedrec] [--name overhead_ml-100k_x]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from benchmarks.common import HelpFormatter, machine, median, print_table, write_json
from fedrec.local_server import free_port


def server_settings(name: str) -> dict[str, str]:
    """The environment of a side's Prefect server (see the module's docstring)."""
    from fedrec.local_server import SERVER_SETTINGS

    if name == "prefect":
        return {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if name == "fedrec":
        return dict(SERVER_SETTINGS)
    if name == "nopersist":
        return SERVER_SETTINGS | {"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false"}
    if name == "lean":
        return SERVER_SETTINGS | {
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
        }
    raise ValueError(f"server settings {name!r}: must be one of fedrec, prefect, nopersist, lean")


def start_prefect_server(
    home: Path, settings: dict[str, str]
) -> tuple[subprocess.Popen, str, float]:
    """`prefect server start` on 127.0.0.1 with ``settings`` in its environment; returns the
    process, its API URL and seconds to healthy."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home)} | settings
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
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
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = started + 600  # a cold start migrates a database: minutes on a busy machine
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
    last = log.read_text(errors="replace").strip().splitlines()[-3:]
    raise RuntimeError(f"prefect server did not become healthy within 600 s: {' | '.join(last)}")


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
        import importlib
        import pkgutil

        import prefect.task_engine as engine
        from prefect.context import TaskRunContext
        from prefect.tasks import Task

        import tasks

        def add(table: dict[str, list[float]], name: str, seconds: float) -> None:
            with self._lock:
                table[name].append(seconds)

        modules = [
            importlib.import_module(f"tasks.{m.name}") for m in pkgutil.iter_modules(tasks.__path__)
        ]
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


_ANSWER = "@@overhead "  # marks the worker's answers among whatever else it prints


def _answer(payload: dict[str, object]) -> None:
    sys.stdout.write(_ANSWER + json.dumps(payload, default=float) + "\n")
    sys.stdout.flush()


def worker(ns: argparse.Namespace) -> None:
    """One side's process: warm up when told, then run the flow or the loop on each command from
    stdin (``flow``, ``loop``, ``loop1``, ``breakdown``, ``stop``) and answer its seconds and CPU
    seconds."""
    from fedrec.config import TrainingConfig
    from flows.training import federated_training

    try:
        from fedrec.runtime import keep_freed_memory

        keep_freed_memory()
    except ImportError:  # older source trees
        pass
    config = TrainingConfig(
        data=ns.data,
        rounds=ns.rounds,
        clients=ns.clients,
        tracking_uri=f"sqlite:///{Path(os.environ['FEDREC_HOME']) / 'mlflow.db'}",
        skip_if_unchanged=False,  # every repeat trains; otherwise repeats 2+ would be no-ops
    )
    try:  # the flow in the foreground, as ``fedrec train`` runs it
        from fedrec.runtime import foreground_flow
    except ImportError:  # older source trees
        foreground_flow = contextlib.nullcontext
    times = TaskTimes()
    if ns.breakdown:
        times.install()
    sys.stdin.readline()  # the parent says when: the sides warm up one after the other
    plain_loop(config)  # warm-up: imports, page cache, allocator
    started = time.perf_counter()
    federated_training(**config.model_dump())  # warm-up: imports, the MLflow store created
    _answer({"first_flow_s": time.perf_counter() - started})
    times.clear()
    flows = 0
    for line in sys.stdin:
        command = line.strip()
        cpu, started = own_cpu(), time.perf_counter()
        if command == "flow":
            with foreground_flow():
                federated_training(**config.model_dump())
            flows += 1
        elif command == "loop":
            plain_loop(config)
        elif command == "loop1":  # the loop at its best on a shared machine: one BLAS thread
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1, user_api="blas"):
                plain_loop(config)
        elif command == "breakdown":
            _answer({"breakdown": times.rows(max(flows, 1)) if ns.breakdown else []})
            continue
        else:
            return
        _answer({"seconds": time.perf_counter() - started, "cpu_s": own_cpu() - cpu})


class Side:
    """A flow under test: its own Prefect server and its own worker process."""

    def __init__(self, spec: str, ns: argparse.Namespace, scratch: Path) -> None:
        parts = spec.split(":", 2)
        if len(parts) < 2 or not parts[0]:
            raise SystemExit(f"--side {spec!r}: expected LABEL:SETTINGS[:CODE]")
        self.label, self.settings = parts[0], parts[1]
        code = Path(parts[2]).resolve() if len(parts) == 3 else Path(__file__).resolve().parents[1]
        self.code = str(code)
        folder = scratch / self.label
        self.server, self.api_url, self.startup = start_prefect_server(
            folder / "prefect", server_settings(self.settings)
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "FEDREC_HOME": str(folder / "home"),
            "PYTHONPATH": self.code,  # the side's source tree before the installed one
        }
        (folder / "home").mkdir(parents=True, exist_ok=True)
        args = ["--data", ns.data, "--rounds", str(ns.rounds), "--clients", str(ns.clients)]
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
            + (["--breakdown"] if ns.breakdown else []),
            cwd=self.code, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.first_flow_s = 0.0
        self.flow_s: list[float] = []
        self.flow_cpu: list[float] = []
        self.server_cpu: list[float] = []

    def read(self) -> dict[str, object]:
        """The worker's next answer (other lines it prints are passed through)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(_ANSWER):
                return json.loads(line[len(_ANSWER) :])
            sys.stdout.write(line)
        raise RuntimeError(f"side {self.label}: the worker exited ({self.process.wait()})")

    def ask(self, command: str) -> dict[str, object]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def run_flow(self) -> None:
        server_cpu = cpu_seconds(self.server.pid)
        answer = self.ask("flow")
        self.server_cpu.append(cpu_seconds(self.server.pid) - server_cpu)
        self.flow_s.append(float(answer["seconds"]))
        self.flow_cpu.append(float(answer["cpu_s"]) + self.server_cpu[-1])

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.stdin.write("stop\n")  # type: ignore[union-attr]
                self.process.stdin.close()  # type: ignore[union-attr]
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.server.terminate()
        try:
            self.server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true", help="time every task run")
    parser.add_argument("--side", action="append", metavar="LABEL:SETTINGS[:CODE]",
                        help="a flow to compare (repeatable; default fedrec:fedrec)")  # fmt: skip
    parser.add_argument("--name", help="results file name (default overhead_<data>)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        worker(ns)
        return

    scratch = Path(tempfile.mkdtemp(prefix="fedrec-overhead-"))
    sides: list[Side] = []
    loads = [os.getloadavg()[0]]
    loop_s: list[float] = []
    loop_cpu: list[float] = []
    loop1_s: list[float] = []
    loop1_cpu: list[float] = []
    breakdown: dict[str, list[dict[str, object]]] = {}
    try:
        for spec in ns.side or ["fedrec:fedrec"]:
            sides.append(Side(spec, ns, scratch))
        for side in sides:  # warm-ups one after the other: they do not run at the same time
            side.first_flow_s = float(side.ask("warm-up")["first_flow_s"])
            print(f"{side.label}: server up in {side.startup:.1f} s, "
                  f"first flow run {side.first_flow_s:.2f} s", flush=True)  # fmt: skip
        for i in range(ns.repeats):
            for side in sides:
                side.run_flow()
            answer = sides[0].ask("loop")
            loop_s.append(float(answer["seconds"]))
            loop_cpu.append(float(answer["cpu_s"]))
            answer = sides[0].ask("loop1")
            loop1_s.append(float(answer["seconds"]))
            loop1_cpu.append(float(answer["cpu_s"]))
            loads.append(os.getloadavg()[0])
            shown = ", ".join(
                f"{s.label} flow {s.flow_s[-1]:.2f} s ({s.flow_cpu[-1]:.1f} CPU s, server "
                f"{s.server_cpu[-1]:.1f})"
                for s in sides
            )
            print(f"repeat {i + 1}: {shown}, plain loop {loop_s[-1]:.2f} s "
                  f"({loop_cpu[-1]:.1f} CPU s), with one BLAS thread {loop1_s[-1]:.2f} s "
                  f"({loop1_cpu[-1]:.1f} CPU s), load {loads[-1]:.1f}", flush=True)  # fmt: skip
        if ns.breakdown:
            breakdown = {s.label: s.ask("breakdown")["breakdown"] for s in sides}
    finally:
        for side in sides:
            side.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    rows, results = [], {}
    best = [min(a, b) for a, b in zip(loop_s, loop1_s, strict=True)]
    best_cpu = [c if a <= b else c1 for a, b, c, c1 in zip(loop_s, loop1_s, loop_cpu, loop1_cpu,
                                                           strict=True)]  # fmt: skip
    for side in sides:
        ratios = [f / p for f, p in zip(side.flow_s, best, strict=True)]
        cpu_ratios = [f / p for f, p in zip(side.flow_cpu, best_cpu, strict=True)]
        default_ratios = [f / p for f, p in zip(side.flow_s, loop_s, strict=True)]
        row = {
            "side": side.label,
            "server": side.settings,
            "data": ns.data,
            "clients": ns.clients,
            "rounds": ns.rounds,
            "flow_s": median(side.flow_s),
            "loop_s": median(loop_s),
            "loop1_s": median(loop1_s),
            "ratio": median(ratios),
            "ratio_default_loop": median(default_ratios),
            "cpu_ratio": median(cpu_ratios),
            "server_cpu_s": median(side.server_cpu),
            "first_flow_s": side.first_flow_s,
            "server_start_s": side.startup,
            "load": median(loads),
        }
        rows.append(row)
        results[side.label] = {
            "code": side.code,
            "server_settings": server_settings(side.settings),
            "summary": row,
            "flow_seconds": side.flow_s,
            "ratios": ratios,
            "ratios_default_loop": default_ratios,
            "flow_cpu_seconds": side.flow_cpu,
            "cpu_ratios": cpu_ratios,
            "server_cpu_seconds": side.server_cpu,
            "breakdown": breakdown.get(side.label, []),
        }
    print()
    print_table(rows, list(rows[0]))
    for label, table in breakdown.items():
        if table:
            print(f"\n{label}: per flow run, by task (seconds summed over its runs):\n")
            print_table(table, list(table[0]))
    path = write_json(
        ns.name or f"overhead_{ns.data}",
        {
            "machine": machine(),
            "args": vars(ns),
            "summary": rows,
            "sides": results,
            "loop_seconds": loop_s,
            "loop_cpu_seconds": loop_cpu,
            "loop_one_blas_thread_seconds": loop1_s,
            "loop_one_blas_thread_cpu_seconds": loop1_cpu,
            "load_average_1min": loads,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
