"""The coordinator's production stores: a PostgreSQL cluster, a Prefect server on it and an MLflow
tracking server on it that proxies artifacts, all on 127.0.0.1 and all stopped by process id.

``start_stores(folder)`` lays the folder out as::

    folder/stores.json   {"prefect_api", "mlflow" (URLs), "postgres_url", "pids", ...}
    folder/pgpass        libpq password file (0600): the database password, in no URL or command
    folder/postgres/     the cluster (data/) and its log; owned by the ``postgres`` user under root
    folder/prefect/      PREFECT_HOME of the Prefect server; its log is folder/prefect.log
    folder/artifacts/    where the MLflow server stores what clients upload through its proxy
    folder/mlflow.log

PostgreSQL authenticates with SCRAM and a generated password; every client (the two servers,
``psql``) reads it from ``folder/pgpass`` through ``PGPASSFILE``, so it appears in no command
line. ``initdb`` refuses to run as root: under root the cluster's commands run as ``postgres``
(``runuser``). A stopped folder starts again on the same cluster, so runs and models persist.

This module imports only the standard library, so ``fedrec stores status`` answers at once.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedrec.local_server import HOST, free_port, is_running, port_is_free, process_start
from models.files import make_private_folder, write_private

STATE_FILE = "stores.json"
PASSFILE = "pgpass"
DB_USER = "fedrec"
DATABASES = ("prefect", "mlflow")
STOP_GRACE = 10.0
# A Unix socket's path (folder/postgres/data/.s.PGSQL.<port>) must fit in sun_path (108 bytes);
# a longer folder gets TCP on loopback only.
_SOCKET_PATH_LIMIT = 100


class StoresError(RuntimeError):
    """The stores could not be started, found or stopped; the message is one actionable line."""


@dataclass(frozen=True)
class Stores:
    """Running stores as recorded in ``folder/stores.json``.

    Attributes
    ----------
    prefect_api : str
        The value for ``PREFECT_API_URL`` (``http://127.0.0.1:PORT/api``).
    mlflow_uri : str
        The MLflow tracking URI (``http://127.0.0.1:PORT``); artifacts go through its proxy.
    postgres_url : str
        ``postgresql://fedrec@127.0.0.1:PORT`` without a password (it is in ``passfile``).
    pids : dict of str to int
        Process ids: ``postgres`` (the postmaster), ``prefect``, ``mlflow``.
    folder : str
        The folder holding the cluster, the logs, the artifacts and this record.
    passfile : str
        The libpq password file; set ``PGPASSFILE`` to it to connect with psql or a driver.
    process_starts : dict of str to int
        Each process's start time in clock ticks since boot, to tell a reused PID apart.
    """

    prefect_api: str
    mlflow_uri: str
    postgres_url: str
    pids: dict[str, int]
    folder: str
    passfile: str
    process_starts: dict[str, int | None] = field(default_factory=dict)

    def database_url(self, database: str, driver: str | None = None) -> str:
        """The SQLAlchemy/libpq URL of one database, e.g. ``driver="asyncpg"``."""
        scheme = "postgresql" if driver is None else f"postgresql+{driver}"
        return f"{scheme}{self.postgres_url.removeprefix('postgresql')}/{database}"


def postgres_bindir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``psql``: ``pg_config --bindir``, else the
    newest ``/usr/lib/postgresql/*/bin`` (Debian's layout).

    Raises
    ------
    StoresError
        When neither holds ``initdb``.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(v) if (v := Path(p).parts[-3]).isdigit() else 0, reverse=True)
    candidates.extend(Path(p).parent for p in found)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise StoresError(
        "PostgreSQL not found (no initdb in `pg_config --bindir` or /usr/lib/postgresql/*/bin): "
        "install Debian's postgresql package (apt-get install -y postgresql)"
    )


def _as_postgres() -> list[str]:
    """The prefix that runs a cluster command as the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise StoresError("running as root needs `runuser` to start PostgreSQL as user postgres")
    return [runuser, "-u", "postgres", "--"]


def _run(command: list[str], what: str, *, env: Mapping[str, str] | None = None) -> str:
    """Run a set-up command; its last line of output becomes the error when it fails."""
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise StoresError(f"{what} failed: {err}") from err
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise StoresError(f"{what} failed: {lines[-1] if lines else f'status {done.returncode}'}")
    return done.stdout


def _answers(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url`` answers HTTP 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def health(stores: Stores) -> dict[str, bool]:
    """Which of the three services are up: the postmaster runs, each server's /health answers."""
    return {
        "postgres": is_running(stores.pids["postgres"], stores.process_starts.get("postgres")),
        "prefect": _answers(f"{stores.prefect_api}/health"),
        "mlflow": _answers(f"{stores.mlflow_uri}/health"),
    }


def read_stores(folder: Path) -> Stores | None:
    """The stores recorded in ``folder``, or None when there is no record."""
    try:
        record = json.loads((Path(folder) / STATE_FILE).read_text())
        record["mlflow_uri"] = record.pop("mlflow")
        return Stores(**record)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise StoresError(f"{Path(folder) / STATE_FILE}: not a stores record ({err})") from err


def _log_reason(path: Path) -> str:
    """The last FATAL or ERROR line of a log (PostgreSQL's, uvicorn's), else its last line."""
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        for line in reversed(lines):
            if "FATAL:" in line or "ERROR:" in line:
                return line[:300]
        if lines:
            return lines[-1][:300]
    return ""


class _Cluster:
    """The PostgreSQL cluster in ``folder/postgres``: created once, started, stopped."""

    def __init__(self, folder: Path, bindir: Path) -> None:
        self.root = folder / "postgres"
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.passfile = folder / PASSFILE
        self.bindir = bindir
        self.as_postgres = _as_postgres()

    def create(self) -> None:
        """initdb with SCRAM and a generated password, unless the cluster exists."""
        if (self.data / "PG_VERSION").is_file():
            if not self.passfile.is_file():
                raise StoresError(f"{self.passfile} is missing: the cluster's password is lost")
            return
        make_private_folder(self.root)
        password = secrets.token_urlsafe(24)
        pwfile = self.root / "initdb.pw"
        write_private(pwfile, (password + "\n").encode())
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
            if subprocess.run([*self.as_postgres, "test", "-w", str(self.root)]).returncode:
                pwfile.unlink()
                raise StoresError(
                    f"the postgres user cannot write {self.root}: a parent folder is not "
                    "searchable by other users (chmod o+x it, or choose a --dir under /tmp or /srv)"
                )
        try:
            _run(
                [*self.as_postgres, str(self.bindir / "initdb"), "-D", str(self.data),
                 "-U", DB_USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                 "-E", "UTF8", "--no-locale"],
                "initdb",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        # libpq's format: host:port:database:user:password (any port: the port may change)
        write_private(self.passfile, f"{HOST}:*:*:{DB_USER}:{password}\n".encode())

    def start(self, port: int, *, durable: bool, timeout: float) -> int:
        """pg_ctl start on 127.0.0.1:``port``; returns the postmaster's pid."""
        socket_dir = str(self.data) if len(str(self.data)) < _SOCKET_PATH_LIMIT else "''"
        options = f"-p {port} -k {socket_dir} -c listen_addresses={HOST}"
        if not durable:  # a throwaway test cluster: no fsync
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        try:
            _run(
                [*self.as_postgres, str(self.bindir / "pg_ctl"), "-D", str(self.data),
                 "-l", str(self.log), "-w", "-t", str(int(max(timeout, 1))), "-o", options,
                 "start"],
                "starting PostgreSQL",
            )  # fmt: skip
        except StoresError as err:
            reason = _log_reason(self.log)
            raise StoresError(
                f"PostgreSQL did not start{f': {reason}' if reason else ''} (log: {self.log})"
            ) from err
        pid = self.pid()
        if pid is None:
            raise StoresError(f"PostgreSQL started but {self.data}/postmaster.pid is missing")
        return pid

    def pid(self) -> int | None:
        """The postmaster's pid: the first line of postmaster.pid."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def create_databases(self, port: int) -> None:
        """CREATE DATABASE for each of ``DATABASES`` that does not exist yet."""
        env = {**os.environ, "PGPASSFILE": str(self.passfile), "PGCONNECT_TIMEOUT": "10"}
        psql = [str(self.bindir / "psql"), "-h", HOST, "-p", str(port), "-U", DB_USER,
                "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tA"]  # fmt: skip
        existing = set(
            _run([*psql, "-c", "SELECT datname FROM pg_database"], "psql", env=env).split()
        )
        for name in DATABASES:
            if name not in existing:
                _run([*psql, "-c", f"CREATE DATABASE {name}"], f"creating database {name}", env=env)

    def stop(self, pid: int | None, process_start: int | None) -> None:
        """pg_ctl stop -m fast; SIGQUIT, then SIGKILL, to the recorded postmaster if that fails."""
        if pid is not None and not is_running(pid, process_start):
            return
        with contextlib.suppress(StoresError):
            _run(
                [*self.as_postgres, str(self.bindir / "pg_ctl"), "-D", str(self.data),
                 "-m", "fast", "-w", "-t", "60", "stop"],
                "stopping PostgreSQL",
            )  # fmt: skip
        if pid is not None and is_running(pid, process_start):
            _terminate(pid, process_start, first=signal.SIGQUIT, group=False)


def _terminate(
    pid: int,
    process_start: int | None,
    *,
    grace: float = STOP_GRACE,
    first: signal.Signals = signal.SIGTERM,
    group: bool = True,
) -> None:
    """``first`` to the process (and its group when it leads one), SIGKILL after ``grace`` s.

    Raises
    ------
    StoresError
        When the process survives SIGKILL.
    """

    def send(sig: signal.Signals) -> None:
        if group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)  # started with a session of its own: pgid == pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)

    if not is_running(pid, process_start):
        return
    for sig, wait in ((first, grace), (signal.SIGKILL, 5.0)):
        send(sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not is_running(pid, process_start):
                return
            time.sleep(0.1)
    raise StoresError(f"process {pid} survived SIGKILL")


def _server_env(folder: Path, cluster: _Cluster, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # a server must not report to another server
    env.pop("MLFLOW_TRACKING_URI", None)
    url = f"{HOST}:{port}"
    env.update(
        PGPASSFILE=str(cluster.passfile),
        PYTHONUNBUFFERED="1",
        PREFECT_HOME=str(folder / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{DB_USER}@{url}/prefect",
        # read by `mlflow server --backend-store-uri`: no database address on the command line
        MLFLOW_BACKEND_STORE_URI=f"postgresql+psycopg2://{DB_USER}@{url}/mlflow",
        # one worker, no job executor: MLflow's defaults start ~15 processes (~3 GB)
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    return env


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a server in a session of its own (its children are stopped with it), output to log."""
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        out.flush()
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip


def _write_state(folder: Path, stores: Stores) -> None:
    path = folder / STATE_FILE
    partial = path.with_suffix(".json.tmp")
    record = asdict(stores)
    record = {
        "prefect_api": record.pop("prefect_api"),
        "mlflow": record.pop("mlflow_uri"),
        **record,
    }
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)


def _ports(port_base: int | None) -> tuple[int, int, int]:
    """PostgreSQL, Prefect and MLflow ports: ``port_base`` + 0, 1, 2, else free ones."""
    if port_base is None:
        return free_port(), free_port(), free_port()
    if not 1024 <= port_base <= 65533:
        raise StoresError(f"port base {port_base}: must be in 1024-65533 (three ports from it)")
    ports = (port_base, port_base + 1, port_base + 2)
    for port in ports:
        if not port_is_free(port):
            raise StoresError(f"port {port} on {HOST} is in use: choose another --port-base")
    return ports


def start_stores(
    folder: Path, *, timeout: float = 180, port_base: int | None = None, durable: bool = True
) -> Stores:
    """Start PostgreSQL, a Prefect server and an MLflow server in ``folder`` and wait until both
    servers answer /health; record them in ``folder/stores.json``.

    Parameters
    ----------
    folder : Path
        Holds the cluster, logs, artifacts and the record (created if missing). A folder whose
        stores were stopped starts again on the same cluster.
    timeout : float
        Seconds to wait for PostgreSQL, then for both servers to answer.
    port_base : int, optional
        Listen on ``port_base`` (PostgreSQL), +1 (Prefect), +2 (MLflow); default: free ports.
    durable : bool
        False turns off fsync in PostgreSQL: for throwaway test clusters only.

    Returns
    -------
    Stores

    Raises
    ------
    StoresError
        When PostgreSQL is not installed, stores already run in ``folder``, or a service does
        not start in time (whatever was started is stopped again).
    """
    folder = Path(folder).resolve()
    running = read_stores(folder)
    up = {} if running is None else health(running)
    if running is not None and all(up.values()):
        raise StoresError(
            f"stores already run in {folder} (Prefect {running.prefect_api}, MLflow "
            f"{running.mlflow_uri}): stop them first with `fedrec stores stop --dir {folder}`"
        )
    if running is not None and any(up.values()):  # some died: a stop and a start restart them
        down = ", ".join(name for name, ok in up.items() if not ok)
        raise StoresError(
            f"stores in {folder} run in part ({down} down; the others still answer): "
            f"`fedrec stores stop --dir {folder}` stops the rest, then start them again "
            "(the databases and artifacts stay)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    cluster = _Cluster(folder, postgres_bindir())
    pg_port, prefect_port, mlflow_port = _ports(port_base)
    cluster.create()
    started: dict[str, int] = {}
    starts: dict[str, int | None] = {}
    try:
        started["postgres"] = cluster.start(pg_port, durable=durable, timeout=timeout)
        starts["postgres"] = process_start(started["postgres"])
        cluster.create_databases(pg_port)
        env = _server_env(folder, cluster, pg_port)
        (folder / "prefect").mkdir(exist_ok=True)
        (folder / "artifacts").mkdir(exist_ok=True)
        python = sys.executable
        servers = {
            "prefect": _spawn(
                [python, "-m", "prefect", "server", "start",
                 "--host", HOST, "--port", str(prefect_port)],
                folder / "prefect.log", env,
            ),
            "mlflow": _spawn(
                [python, "-m", "mlflow", "server", "--host", HOST, "--port", str(mlflow_port),
                 "--workers", "1", "--serve-artifacts",
                 "--artifacts-destination", str(folder / "artifacts")],
                folder / "mlflow.log", env,
            ),
        }  # fmt: skip
        for name, process in servers.items():
            started[name] = process.pid
            starts[name] = process_start(process.pid)
        stores = Stores(
            prefect_api=f"http://{HOST}:{prefect_port}/api",
            mlflow_uri=f"http://{HOST}:{mlflow_port}",
            postgres_url=f"postgresql://{DB_USER}@{HOST}:{pg_port}",
            pids=dict(started),
            folder=str(folder),
            passfile=str(cluster.passfile),
            process_starts=dict(starts),
        )
        _write_state(folder, stores)
        _wait_for_servers(stores, servers, folder, timeout)
        return stores
    except BaseException:
        _stop_started(folder, cluster, started, starts)
        raise


def _wait_for_servers(
    stores: Stores, servers: dict[str, subprocess.Popen], folder: Path, timeout: float
) -> None:
    urls = {"prefect": f"{stores.prefect_api}/health", "mlflow": f"{stores.mlflow_uri}/health"}
    waiting = dict(urls)
    deadline = time.monotonic() + timeout
    while waiting:
        for name in list(waiting):
            if _answers(waiting[name]):
                del waiting[name]
            elif (status := servers[name].poll()) is not None:
                last = _log_reason(folder / f"{name}.log")
                raise StoresError(
                    f"the {name} server exited during start-up (status {status})"
                    f"{f': {last}' if last else ''} (log: {folder / f'{name}.log'})"
                )
        if waiting and time.monotonic() > deadline:
            raise StoresError(
                f"{' and '.join(waiting)} did not answer within {timeout:.0f} s (logs in "
                f"{folder}); the machine may be busy: retry with a longer --timeout"
            )
        time.sleep(0.5)


def _stop_started(
    folder: Path, cluster: _Cluster, pids: Mapping[str, int], starts: Mapping[str, int | None]
) -> None:
    """Stop the servers first (they hold database connections), then the cluster."""
    errors = []
    for name in ("prefect", "mlflow"):
        if name in pids:
            try:
                _terminate(pids[name], starts.get(name))
            except StoresError as err:
                errors.append(f"{name}: {err}")
    if "postgres" in pids or cluster.pid() is not None:
        cluster.stop(pids.get("postgres"), starts.get("postgres"))
        pid = pids.get("postgres")
        if pid is not None and is_running(pid, starts.get("postgres")):
            errors.append(f"postgres: process {pid} still runs")
    (folder / STATE_FILE).unlink(missing_ok=True)
    if errors:
        raise StoresError(f"could not stop everything in {folder}: {'; '.join(errors)}")


def stop_stores(folder: Path) -> Stores | None:
    """Stop the stores recorded in ``folder`` by their process ids: the Prefect and MLflow servers
    (SIGTERM to their process groups, then SIGKILL), then PostgreSQL (``pg_ctl stop -m fast``).

    Returns the stopped stores, or None when ``folder`` records none. The cluster, the logs and
    the artifacts stay in ``folder``.

    Raises
    ------
    StoresError
        When a process survives SIGKILL.
    """
    folder = Path(folder).resolve()
    stores = read_stores(folder)
    if stores is None:
        return None
    cluster = _Cluster(folder, postgres_bindir())
    _stop_started(folder, cluster, stores.pids, stores.process_starts)
    return stores
