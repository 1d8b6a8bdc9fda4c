"""One local Prefect server per FEDREC_HOME: started once in the background, reused by every
command that needs Prefect, stopped on request (``fedrec server start|stop|status``).

Prefect's alternative, a temporary server started inside each command, creates and migrates a
SQLite database every time and gives up after a fixed wait; on a busy machine that wait runs out.
A server started once pays that cost once, with a generous limit, and its UI keeps every run.

State lives in ``FEDREC_HOME/server/``: ``prefect-server.pid`` (the process id),
``prefect-server.json`` (pid, port, process start time) and ``prefect-server.log``. The server's
database lives under ``$PREFECT_HOME`` (default ``FEDREC_HOME/prefect``). This module imports
only the standard library, so ``fedrec server status`` answers at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from fedrec.home import fedrec_home

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
PORT_ENV = "FEDREC_PREFECT_PORT"
# Servers started on a free port listen in [LISTEN_PORTS_FROM, start of the outgoing range).
LISTEN_PORTS_FROM = 10000
_OUTGOING_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
STARTUP_TIMEOUT_ENV = "FEDREC_SERVER_STARTUP_TIMEOUT"
# A cold start creates and migrates the database: 5-30 s on a quiet 2-core machine, minutes
# when other processes hold the cores.
DEFAULT_STARTUP_TIMEOUT = 600.0
STOP_GRACE = 10.0

PID_FILE = "prefect-server.pid"
STATE_FILE = "prefect-server.json"
LOG_FILE = "prefect-server.log"
LOCK_FILE = "start.lock"


class LocalServerError(RuntimeError):
    """The local server could not be started or stopped; the message is one actionable line."""


@dataclass(frozen=True)
class ServerState:
    """A running local server as recorded in its state file."""

    pid: int
    port: int
    started_at: float
    process_start: int | None = None

    @property
    def url(self) -> str:
        """The UI's address."""
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        """The value for ``PREFECT_API_URL``."""
        return f"{self.url}/api"


def server_dir(home: Path | None = None) -> Path:
    """The folder holding the PID file, the state file and the log."""
    return (home or fedrec_home()) / "server"


def log_path(home: Path | None = None) -> Path:
    """The server's log (stdout and stderr of ``prefect server start``)."""
    return server_dir(home) / LOG_FILE


def startup_timeout() -> float:
    """Seconds to wait for a starting server: ``$FEDREC_SERVER_STARTUP_TIMEOUT`` or 600."""
    configured = os.environ.get(STARTUP_TIMEOUT_ENV)
    if not configured:
        return DEFAULT_STARTUP_TIMEOUT
    try:
        value = float(configured)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise LocalServerError(
            f"{STARTUP_TIMEOUT_ENV}={configured!r}: must be a positive number of seconds"
        )
    return value


def process_start(pid: int) -> int | None:
    """Start time in clock ticks since boot (Linux), or None when the process is gone; tells a
    reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may itself hold spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_running(pid: int, started: int | None = None) -> bool:
    """The process exists, is no zombie, and (when ``started`` is given) is the one that was
    started rather than a later process with a reused id."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # e.g. PostgreSQL's postmaster, when we are not root
        pass
    with contextlib.suppress(OSError):  # a zombie has exited, whatever kill(0) says
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    return started is None or process_start(pid) == started


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid`` and by those in turn (Linux: read from /proc; elsewhere
    none are found), children before grandchildren."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    level = {pid}
    while level:
        level = {child for child, parent in parents.items() if parent in level}
        found += sorted(level)
    return found


def end_descendants(grace: float) -> list[int]:
    """SIGTERM every process this one started, and SIGKILL those still running ``grace`` seconds
    later; returns their ids. For a process about to exit that must not leave, say, a flow run's
    subprocess training on without it. fedrec's local Prefect server, when this process started
    it, is spared with its own processes: it serves other commands too (``fedrec server stop``
    ends it)."""
    state = read_state()
    spared = set() if state is None else {state.pid, *descendants(state.pid)}
    started = {pid: process_start(pid) for pid in descendants(os.getpid()) if pid not in spared}
    for pid in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(p, s) for p, s in started.items()):
        time.sleep(0.1)
    for pid, when in started.items():
        if is_running(pid, when):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return list(started)


def _is_ours(state: ServerState) -> bool:
    """The recorded process still runs and is the one that was started (not a reused PID)."""
    return is_running(state.pid, state.process_start)


def _clear(folder: Path) -> None:
    for name in (PID_FILE, STATE_FILE):
        (folder / name).unlink(missing_ok=True)


def read_state(home: Path | None = None) -> ServerState | None:
    """The local server if it runs, else None (a stale record of a dead server is removed)."""
    folder = server_dir(home)
    try:
        state = ServerState(**json.loads((folder / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if _is_ours(state):
        return state
    _clear(folder)
    return None


def is_healthy(api_url: str, timeout: float = 3.0) -> bool:
    """Whether ``<api_url>/health`` answers 200 (a busy SQLite server may answer 503 for a while)."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def port_is_free(port: int) -> bool:
    """Whether a server could bind ``port`` on :data:`HOST` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as the server binds: a port whose last connections linger in TIME_WAIT is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _outgoing_ports() -> tuple[int, int]:
    """The range the kernel gives outgoing connections their local ports from."""
    try:
        low, high = map(int, Path(_OUTGOING_RANGE_FILE).read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port() -> int:
    """A free loopback port for a server to listen on.

    The OS's own choice (bind to port 0) comes from the range outgoing connections take their
    local ports from, so any client socket opened between this call and the server's bind may take
    it (the server then exits with "address already in use"). The port is therefore drawn from
    the listening range below that one, and checked free; the OS chooses only when that range is
    empty.
    """
    low, _ = _outgoing_ports()
    if low - LISTEN_PORTS_FROM >= 1000:
        draw = random.SystemRandom()  # not `random`'s shared state, which tests may seed alike
        for _ in range(200):
            port = draw.randrange(LISTEN_PORTS_FROM, low)
            if port_is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def choose_port(port: int | None = None) -> int:
    """The asked-for port (``port``, else ``$FEDREC_PREFECT_PORT``), which must be free; without
    one, 4200 (Prefect's usual port) if free, else any free port."""
    if port is None and os.environ.get(PORT_ENV):
        try:
            port = int(os.environ[PORT_ENV])
        except ValueError as err:
            raise LocalServerError(
                f"{PORT_ENV}={os.environ[PORT_ENV]!r}: must be a port number"
            ) from err
    if port is not None:
        if not 0 < port < 65536:
            raise LocalServerError(f"port {port}: must be in 1-65535")
        if not port_is_free(port):
            raise LocalServerError(
                f"port {port} on {HOST} is in use: choose another with --port or {PORT_ENV}"
            )
        return port
    return DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port()


@contextlib.contextmanager
def _start_lock(folder: Path) -> Iterator[None]:
    """One starter at a time per FEDREC_HOME (two `fedrec train` at once share one server)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(folder / LOCK_FILE, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Prefect's settings for the local server where fedrec's differ from Prefect's defaults; a value
# set in the environment wins. A task run reaches the server as three events (pending, running,
# completed), and Prefect's task run recorder writes each event in a database transaction of its
# own (batch size 1): on 2 cores that made the server's CPU per task run the largest cost of a
# training flow. In batches of up to 50 events, every task run and state is still recorded, and
# the UI shows a task run about a second (the flush interval) later at most.
SERVER_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # scheduled retraining adds flow runs every night: the server deletes those that ended more
    # than PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD ago (90 days unless set); the
    # models and their metrics stay in MLflow
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "50",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


def _server_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the server must not try to reach another server
    env.setdefault("PREFECT_HOME", str(home / "prefect"))
    for name, value in SERVER_SETTINGS.items():
        env.setdefault(name, value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _last_log_line(home: Path) -> str:
    try:
        lines = [line.strip() for line in log_path(home).read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else ""


class _Waiting:
    """One line that names the step and, on a terminal, counts the seconds while it lasts."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.shown = -1
        self.ended = False
        self.stream.write(f"fedrec: {label} ...")
        self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def tick(self) -> None:
        seconds = int(self.elapsed)
        if self.tty and seconds != self.shown:
            self.stream.write(f"\rfedrec: {self.label} ... {seconds} s")
        elif not self.tty and seconds // 30 > max(self.shown, 0) // 30:
            self.stream.write(f" {seconds} s ...")  # a log file still sees that it is alive
        else:
            return
        self.shown = seconds
        self.stream.flush()

    def done(self, outcome: str) -> None:
        self.ended = True
        prefix = f"\rfedrec: {self.label} ... " if self.tty else " "
        self.stream.write(f"{prefix}{outcome}\n")
        self.stream.flush()


def wait_until_healthy(
    state: ServerState, *, timeout: float, home: Path, process: subprocess.Popen | None = None
) -> float:
    """Poll ``/health`` until it answers; returns the seconds waited.

    Raises
    ------
    LocalServerError
        When the process exits first, or ``timeout`` seconds pass (the process is then stopped).
    """
    waiting = _Waiting(f"starting local Prefect server at {state.url}")
    try:
        return _wait(waiting, state, timeout=timeout, home=home, process=process)
    except BaseException:  # e.g. SIGTERM or Ctrl-C: the line ends before the error's
        if not waiting.ended:
            waiting.done("stopped")
        raise


def _wait(
    waiting: _Waiting,
    state: ServerState,
    *,
    timeout: float,
    home: Path,
    process: subprocess.Popen | None,
) -> float:
    while True:
        if is_healthy(state.api_url, timeout=min(5.0, timeout)):
            waiting.done(f"ready in {waiting.elapsed:.1f} s")
            return waiting.elapsed
        exited = process.poll() if process is not None else None
        if exited is not None or not _is_ours(state):
            waiting.done("failed")
            _clear(server_dir(home))
            last = _last_log_line(home)
            raise LocalServerError(
                f"the Prefect server exited during start-up"
                f"{f' (status {exited})' if exited is not None else ''}"
                f"{f': {last}' if last else ''} (full log: {log_path(home)})"
            )
        if waiting.elapsed > timeout:
            waiting.done(f"no answer after {waiting.elapsed:.0f} s")
            _terminate(state)
            _clear(server_dir(home))
            raise LocalServerError(
                f"the Prefect server did not answer within {timeout:.0f} s (log: {log_path(home)}); "
                f"the machine may be busy: retry with a longer limit, e.g. "
                f"{STARTUP_TIMEOUT_ENV}={int(timeout * 2)} or `fedrec server start --timeout {int(timeout * 2)}`"
            )
        waiting.tick()
        time.sleep(0.5)


def start(
    *, home: Path | None = None, port: int | None = None, timeout: float | None = None
) -> tuple[ServerState, bool]:
    """Start the local server in the background, or find the one already running.

    Parameters
    ----------
    home : Path, optional
        FEDREC_HOME (default: ``fedrec_home()``).
    port : int, optional
        Port to listen on (default: ``$FEDREC_PREFECT_PORT``, else 4200 if free, else any free).
    timeout : float, optional
        Seconds to wait for ``/health`` (default: ``startup_timeout()``).

    Returns
    -------
    state : ServerState
    started : bool
        False when a server was already running (it is reused, ``port`` is then ignored).

    Raises
    ------
    LocalServerError
        When the port is taken, or the server exits or does not answer in time.
    """
    home = home or fedrec_home()
    folder = server_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    timeout = startup_timeout() if timeout is None else timeout
    with _start_lock(folder):
        running = read_state(home)
        if running is not None:
            if not is_healthy(running.api_url):  # e.g. another command is still starting it
                wait_until_healthy(running, timeout=timeout, home=home)
            return running, False
        chosen = choose_port(port)
        env = _server_env(home)
        Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "prefect", "server", "start",
                   "--host", HOST, "--port", str(chosen)]  # fmt: skip
        with open(log_path(home), "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            log.flush()
            # A session of its own: Ctrl-C in the terminal that started it does not stop it, and
            # `stop` ends the whole group (uvicorn and the services run as child processes).
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )  # fmt: skip
        state = ServerState(process.pid, chosen, time.time(), process_start(process.pid))
        (folder / STATE_FILE).write_text(json.dumps(asdict(state)) + "\n")
        (folder / PID_FILE).write_text(f"{process.pid}\n")
        wait_until_healthy(state, timeout=timeout, home=home, process=process)
        return state, True


def _terminate(state: ServerState, grace: float = STOP_GRACE) -> bool:
    """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; True once gone."""

    def signal_group(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(state.pid, sig)  # the server leads its own session: pgid == pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(state.pid, sig)

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not is_running(state.pid):
            return True
        time.sleep(0.2)
    signal_group(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not is_running(state.pid):
            return True
        time.sleep(0.1)
    return not is_running(state.pid)


def stop(*, home: Path | None = None, grace: float = STOP_GRACE) -> ServerState | None:
    """Stop the local server (SIGTERM, then SIGKILL after ``grace`` s); the stopped server's state,
    or None when none was running.

    Raises
    ------
    LocalServerError
        When the process survives SIGKILL (e.g. it belongs to another user).
    """
    home = home or fedrec_home()
    state = read_state(home)
    if state is None:
        return None
    if not _terminate(state, grace):
        raise LocalServerError(f"could not stop the Prefect server (pid {state.pid})")
    _clear(server_dir(home))
    return state
