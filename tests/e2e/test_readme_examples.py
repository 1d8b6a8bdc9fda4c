"""README.md's examples, run as written.

A code block is an example when the line before its opening fence is an HTML comment
``<!-- example -->`` or ``<!-- example: OPTIONS -->`` (invisible on GitHub). OPTIONS, separated by
commas:

- ``id=NAME``: the block's documented outcome is checked by ``CHECKS[NAME]`` below (every name
  there must be found in README.md, so removing a marker fails this test);
- ``setup=NAME``: ``SETUPS[NAME]`` writes the files the block names (e.g. ``ratings.csv``) into
  the working folder first;
- ``exit=N``: the documented exit status of a documented error (default 0);
- ``lines=N M ...``: run only these lines of the block (1-based; the others name placeholder
  paths or take minutes);
- ``output-of=NAME``: the block is not run; it shows output of the example ``id=NAME``, and each
  of its lines, with ids, ports and hashes as wildcards, must appear in that output;
- ``needs-movielens``: skipped, with the reason, when ``$FEDREC_DATASETS`` (default
  ``../shared/datasets``) has no ``ml-100k``/``ml-1m``;
- ``slow``: run only with ``FEDREC_README_SLOW=1``.

How they run: in README order, as one user would type them, in one fresh temporary folder that
stands for the checkout (``Makefile``, ``pyproject.toml``, ``uv.lock``, ``.venv``, ``examples``
and ``deployments`` are symlinks to the repository's), so that ``./.fedrec`` (MLflow's store,
the local Prefect server's database, PID file and log) and every file a command writes land
there. ``uv run`` finds the project through ``UV_PROJECT`` and does not sync
(``UV_NO_SYNC=1``, the environment is the synced one the tests run in; ``make``'s set-up step
syncs it only when ``uv.lock`` is newer than ``.venv/.synced``, as for a user). Shell blocks run with
``bash -e -o pipefail``; a block whose lines start with ``$ `` is a transcript: each such line
is run and the other lines are its expected output. Python blocks run in a subprocess
(``uv run python``) with the working folder as current directory; when a block ends in an
expression followed by ``# -> a, b, c``, the expression's columns must be those. The
environment has no ``PREFECT_*``, ``MLFLOW_*`` or ``FEDREC_*`` variable from the caller except
``FEDREC_DATASETS``; ``FEDREC_PREFECT_PORT`` is a free loopback port, so ``make demo``'s
``fedrec server start`` (the first example) starts a real local Prefect server there. Every
server PID seen in ``.fedrec/server`` is stopped by that PID at the end. Afterwards the
repository must hold no new untracked or ignored path where the examples could have written one
(its top level, the linked folders, any ``*.db``, ``mlruns`` or ``.fedrec``): no stray
``mlflow.db``. Tracked files are not compared: in a checkout shared with other people they
change while the examples run, and no example writes one.

Blocks that are not run, and why:

- Quickstart's ``make mlflow-ui``/``make prefect-ui`` and Run-it-on-a-schedule's ``make server``,
  ``make deploy``, ``make worker`` and ``fedrec serve``: long-running servers and workers
  (``tests/e2e/test_deployment.py`` and ``tests/e2e/test_serve.py`` run a real server, deploy,
  worker and ``fedrec serve``).
- Train on your data: lines 3 (``--data ratings.csv --partition dirichlet``) and 6 (``--config
  run.yaml --rounds 5``) run, on a small CSV and YAML file written first; the others are
  MovieLens runs of minutes (ML-100K's 15 rounds at k = 64: 160 s at load 10), a placeholder
  (``path/to/ml-1m``, ``u1.base``: not in the shared ``ml-100k`` folder) or 50 FedAdam rounds.
  Their flags are checked against ``fedrec train --help`` by ``tests/unit/test_readme_flags.py``.
- Ranking, the neural model, every-user-a-client and Dask: trainings of minutes (two-stage,
  neural, ML-1M per-user) and a Dask cluster; covered by ``tests/flows`` and their flags by the
  flag test. ``mlflow models serve`` with ``curl`` needs a ranking champion;
  ``tests/flows/test_ranking_flow.py`` serves one that way and posts to it.
- Trigger from another system (``prefect deployment run``, ``run_deployment``, raw HTTP) needs a
  deployment and a worker: ``tests/e2e/test_deployment.py`` runs each against a real server.
- Production on PostgreSQL: needs PostgreSQL and an object store.
- The mermaid diagram is not a command.

The examples that run take about 5.5 minutes on a 2-core machine at load 10-13: ``make demo``'s
server start and training 120 s, its second run and a 12-round training 90 s, the two trainings
of Train on your data 90 s, the rest 20 s (7 minutes at load 15-23).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedrec.local_server import free_port

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
LINKED = ("Makefile", "pyproject.toml", "uv.lock", ".venv", "examples", "deployments")
BLOCK_TIMEOUT = 1200  # make demo starts a Prefect server (up to 600 s on a busy machine) and trains
CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

MARKER = re.compile(r"^<!--\s*example(?::\s*(?P<options>.*?))?\s*-->\s*$")
FENCE = re.compile(r"^```\s*(?P<lang>[\w-]*)\s*$")


@dataclass(frozen=True)
class Example:
    """A marked code block of README.md."""

    line: int  # of the opening fence, 1-based
    lang: str
    source: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if "output-of" in self.options:
            return f"{self.options['output-of']}-output"
        return self.options.get("id") or f"line-{self.line}"

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.name})"


def parse_examples(text: str) -> list[Example]:
    """The marked blocks of ``text`` in order; a marker not followed by a fence is an error."""
    lines = text.splitlines()
    examples = []
    for index, line in enumerate(lines):
        marker = MARKER.match(line.strip())
        if not marker:
            continue
        fence = FENCE.match(lines[index + 1]) if index + 1 < len(lines) else None
        if fence is None:
            raise ValueError(f"README.md:{index + 1}: an example marker must precede a ``` fence")
        end = next(i for i in range(index + 2, len(lines)) if lines[i].strip() == "```")
        options = {}
        for item in filter(None, (o.strip() for o in (marker["options"] or "").split(","))):
            key, _, value = item.partition("=")
            options[key.strip()] = value.strip()
        source = "\n".join(lines[index + 2 : end]) + "\n"
        examples.append(Example(index + 2, fence["lang"], source, options))
    return examples


EXAMPLES = parse_examples(README.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# files the blocks name, and the outcomes README states


def _bad_ratings(work: Path) -> None:
    (work / "ratings.csv").write_text("user_id,item_id,rating\nu1,10,4\nu1,11,9\nu2,10,3\n")


def _train_files(work: Path) -> None:
    """The demo's synthetic ratings as a CSV (the same item ids, so that the examples after
    this block, which use ``examples/history.csv``, still meet a champion that knows them) and a
    YAML configuration."""
    from models.data.synthetic import generate_synthetic

    data = generate_synthetic()
    rows = data.frame
    users = [str(data.user_ids[u]) for u in rows["user"]]
    items = [str(data.item_ids[i]) for i in rows["item"]]
    lines = ["user_id,item_id,rating,timestamp"] + [
        f"{u},{i},{r:g},{t}" for u, i, r, t in zip(users, items, rows["rating"], rows["timestamp"], strict=True)
    ]  # fmt: skip
    (work / "ratings.csv").write_text("\n".join(lines) + "\n")
    # TrainingConfig fields; the command's --rounds 5 wins over rounds: 20
    (work / "run.yaml").write_text("data: ratings.csv\nclients: 4\nfactors: 8\nrounds: 20\n")


SETUPS: dict[str, Callable[[Path], None]] = {
    "bad-ratings": _bad_ratings,
    "train-files": _train_files,
}


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float = 0.0
    script: str = ""
    mismatches: list[str] = field(default_factory=list)  # a transcript's output, where it differs
    servers: list[int] = field(default_factory=list)  # the servers' PIDs noted when it ended


def _check_demo(out: Outcome, session: Session) -> None:
    text = out.stdout + out.stderr
    assert "ready in" in out.stderr  # the server's start, named as it happens
    assert re.search(r"model fedrec-mf version 1: promoted to champion", out.stdout), text[-3000:]
    prefect = re.search(r"^Prefect flow run: +(\S+)$", out.stdout, re.M)
    assert prefect, out.stdout[-3000:]
    assert prefect[1].startswith(f"http://127.0.0.1:{session.port}/runs/flow-run/")
    assert re.search(r"^MLflow run: +http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}", out.stdout, re.M)  # fmt: skip
    state = session.work / ".fedrec"  # MLflow's store, the server's database, PID file and log
    assert (state / "mlflow.db").is_file() and (state / "prefect").is_dir()
    assert (state / "server" / "prefect-server.pid").is_file()
    assert (state / "server" / "prefect-server.log").is_file()
    hint = re.search(r"^Use it: +(?:\.tools/uv/bin/)?uv run (fedrec recommend .*)$", out.stdout, re.M)  # fmt: skip
    assert hint and "--history examples/history.csv" in hint[1], out.stdout[-2000:]


def _check_again(out: Outcome, session: Session) -> None:
    unchanged = (
        "data and config unchanged since champion version 1: nothing to train (model fedrec-mf)"
    )
    assert unchanged in out.stdout, out.stdout[-3000:]
    decided = re.search(r"^model fedrec-mf version (\d+): (promoted to champion|not promoted) \(", out.stdout, re.M)  # fmt: skip
    assert decided and decided[1] == "2", out.stdout[-3000:]  # the unchanged run registered nothing


def _check_train(out: Outcome, session: Session) -> None:
    ran = out.script.splitlines()
    assert len(ran) == 2 and "--data ratings.csv --partition dirichlet" in ran[0], out.script
    assert "--config run.yaml --rounds 5" in ran[1], out.script
    versions = re.findall(r"^model fedrec-mf version (\d+): (?:promoted to champion|not promoted)", out.stdout, re.M)  # fmt: skip
    assert len(versions) == 2, out.stdout[-3000:]
    assert "round 5/5 (final)" in out.stderr  # the flag won over the YAML's 20 rounds
    assert not re.search(r"round \d+/20\b", out.stderr)  # (a flow run's id may hold "/20")


def _check_server(out: Outcome, session: Session) -> None:
    pid = out.servers[-1]  # the server it found running (later examples may start another)
    assert f"Prefect UI:  http://127.0.0.1:{session.port}" in out.stdout, out.stdout
    assert f"pid:     {pid}" in out.stdout and "health:  healthy" in out.stdout, out.stdout
    assert f"stopped the local Prefect server at http://127.0.0.1:{session.port} (pid {pid})" in out.stdout  # fmt: skip
    assert not _alive(pid)


def _recommendations(csv_text: str) -> list[list[str]]:
    import csv
    import io

    return list(csv.reader(io.StringIO(csv_text)))


def _check_recommend_demo(out: Outcome, session: Session) -> None:
    rows = _recommendations(out.stdout)
    assert rows[0] == ["user_id", "rank", "item_id", "score", "reason"], out.stdout
    body = rows[1:]
    assert [(r[0], r[1]) for r in body] == [(u, str(k)) for u in ("u1", "u2") for k in range(1, 6)]
    history = {tuple(line.split(",")[:2]) for line in (REPO / "examples/history.csv").read_text().split()[1:]}  # fmt: skip
    for user, _, item, score, reason in body:
        assert (user, item) not in history  # unseen items only
        assert 1.0 <= float(score) <= 5.0  # a rating, clipped to the scale
        assert reason.startswith("predicted rating ") and "from your ratings of" in reason


def _check_use(out: Outcome, session: Session) -> None:
    recs = (session.work / "recs.csv").resolve()
    assert f"fedrec: wrote 10 row(s) for 1 user(s) to {recs}" in out.stderr, out.stderr
    rows = _recommendations(recs.read_text())
    assert rows[0] == ["user_id", "rank", "item_id", "score", "reason"]
    assert len(rows) == 11 and {r[0] for r in rows[1:]} == {"u1"} and all(r[4] for r in rows[1:])
    scores = _recommendations(out.stdout)
    assert scores[0] == ["user_id", "item_id", "score"], out.stdout
    assert [r[:2] for r in scores[1:]] == [["u1", "594"], ["u1", "160"], ["u2", "440"]]
    assert all(1.0 <= float(r[2]) <= 5.0 for r in scores[1:])


def _check_pyfunc(out: Outcome, session: Session) -> None:
    # the tracking URI set first: MLflow wrote no ./mlflow.db beside the user's files
    assert not (session.work / "mlflow.db").exists()
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "columns": ["user_id", "rank", "item_id", "score", "reason"], "rows": 10,
    }  # fmt: skip


CHECKS: dict[str, Callable[[Outcome, Session], None]] = {
    "demo": _check_demo,
    "again": _check_again,
    "train": _check_train,
    "server": _check_server,
    "recommend-demo": _check_recommend_demo,
    "use": _check_use,
    "pyfunc": _check_pyfunc,
}

# run after a Python example, in its namespace: what its comments say it can do
EPILOGUES = {
    "pyfunc": """
import json as _json
import pandas as _pd
_frame = _pd.DataFrame({"user_id": ["u1"], "history_items": [["496", "257"]], "history_ratings": [[3.0, 5.0]]})
_answer = model.predict(_frame, params={"k": 10})
print(_json.dumps({"columns": list(_answer.columns), "rows": len(_answer)}))
""",
}

# Python examples run through this: the block's last expression is kept, and when the block
# ends with "# -> a, b, c" its columns are printed for the test to compare.
_PYTHON_RUNNER = """
import ast, json, sys
source = open(sys.argv[1]).read()
epilogue = open(sys.argv[2]).read()
tree = ast.parse(source)
if tree.body and isinstance(tree.body[-1], ast.Expr):
    tree.body[-1] = ast.Assign(targets=[ast.Name("_example_value", ast.Store())], value=tree.body[-1].value)
    ast.fix_missing_locations(tree)
namespace = {"__name__": "__main__"}
exec(compile(tree, "README example", "exec"), namespace)
value = namespace.get("_example_value")
if hasattr(value, "columns"):
    print(json.dumps({"value_columns": [str(c) for c in value.columns]}))
exec(compile(epilogue, "epilogue", "exec"), namespace)
"""


# ---------------------------------------------------------------------------------------------
# the session: one working folder, the examples in README order


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


STATE = re.compile(r"(^|/)(mlflow\.db|mlruns|\.fedrec|\.prefect|workspace|[^/]*\.db)(/|$)")


def _repo_paths() -> set[str]:
    """Untracked and ignored paths of the repository that the examples could have written: at
    its top level (where a command run from the root leaves ``mlflow.db``, ``mlruns``,
    ``.fedrec``, ``recs.csv``), under the folders linked into the working folder, and any store
    or state folder (``*.db``, ``mlruns``, ``.fedrec``). Elsewhere, new files are other people's
    work in a shared checkout, not the examples'. Caches aside."""
    listed = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    paths = set()
    for line in listed.splitlines():
        status, path = line[:2], line[3:]
        parts = Path(path).parts
        if status not in ("??", "!!") or any(part in CACHES for part in parts):
            continue
        if len(parts) == 1 or parts[0] in LINKED or STATE.search(path.rstrip("/")):
            paths.add(path)
    return paths


LOCAL_UV = (
    REPO / ".tools" / "uv" / "bin" / "uv"
)  # where make setup installs uv when none is on PATH


def _datasets() -> Path:
    return Path(os.environ.get("FEDREC_DATASETS", REPO.parent / "shared" / "datasets"))


class Session:
    """The README's examples run one after another in one working folder."""

    def __init__(self, root: Path):
        self.root = root
        self.work = root / "checkout"
        self.work.mkdir()
        for name in LINKED:
            (self.work / name).symlink_to(REPO / name)
        self.port = free_port()
        keep = {"FEDREC_DATASETS"}
        self.env = {
            k: v for k, v in os.environ.items()
            if k in keep or not k.startswith(("PREFECT_", "MLFLOW_", "FEDREC_", "UV_"))
        }  # fmt: skip
        self.env |= {
            "FEDREC_DATASETS": str(_datasets()),
            "FEDREC_PREFECT_PORT": str(self.port),
            "UV_PROJECT": str(REPO),
            "UV_NO_SYNC": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        # as in a user's shell: the environment's scripts are reached through `uv run` only
        venv = str(Path(sys.prefix) / "bin")
        self.env["PATH"] = os.pathsep.join(
            p for p in self.env.get("PATH", "").split(os.pathsep) if p != venv
        )
        if shutil.which("uv", path=self.env["PATH"]) is None and LOCAL_UV.is_file():
            # make setup's own uv (where none was on PATH), which the README names for that case
            self.env["PATH"] = os.pathsep.join((str(LOCAL_UV.parent), self.env["PATH"]))
        self.env.pop("VIRTUAL_ENV", None)
        self.outcomes: dict[int, Outcome] = {}  # by the example's line
        self.pids: list[int] = []
        self.repo_before = _repo_paths()

    def outcome(self, example: Example) -> Outcome:
        """Run every example before ``example`` (README order) that has not run, then it."""
        for earlier in EXAMPLES[: EXAMPLES.index(example) + 1]:
            if earlier.line not in self.outcomes and "output-of" not in earlier.options:
                self.outcomes[earlier.line] = self._run(earlier)
        return self.outcomes[example.line]

    def _run(self, example: Example) -> Outcome:
        if example.options.get("setup"):
            SETUPS[example.options["setup"]](self.work)
        started = time.monotonic()
        if example.lang == "python":
            out = self._python(example)
        elif any(line.startswith("$ ") for line in example.source.splitlines()):
            out = self._transcript(example)
        else:
            script = example.source
            if example.options.get("lines"):
                lines = example.source.splitlines()
                script = "\n".join(lines[int(n) - 1] for n in example.options["lines"].split())
            out = self._shell(script)
            out.script = script
        out.seconds = time.monotonic() - started
        self._note_servers()
        out.servers = list(self.pids)
        return out

    def _shell(self, script: str) -> Outcome:
        try:
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", script], cwd=self.work, env=self.env,
                capture_output=True, text=True, timeout=BLOCK_TIMEOUT,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            return Outcome(-1, str(err.stdout or ""), f"{err.stderr or ''}\ntimed out: {err}")
        return Outcome(done.returncode, done.stdout, done.stderr)

    def _transcript(self, example: Example) -> Outcome:
        """Run each ``$ `` line; the outcome of the last one, with the expected output checked."""
        commands, expected, out = [], {}, None
        for line in example.source.splitlines():
            if line.startswith("$ "):
                commands.append(line[2:])
                expected[len(commands) - 1] = []
            elif commands:
                expected[len(commands) - 1].append(line)
        mismatches = []
        for index, command in enumerate(commands):
            out = self._shell(command)
            printed = (out.stdout + out.stderr).strip().splitlines()
            if printed != expected[index]:
                mismatches.append(f"`{command}` printed\n" + "\n".join(printed))
        assert out is not None
        out.mismatches = mismatches
        return out

    def _python(self, example: Example) -> Outcome:
        folder = self.root / f"python-{example.line}"
        folder.mkdir()
        (folder / "example.py").write_text(example.source)
        (folder / "epilogue.py").write_text(textwrap.dedent(EPILOGUES.get(example.name, "")))
        (folder / "runner.py").write_text(_PYTHON_RUNNER)
        argv = ["uv", "run", "python", str(folder / "runner.py"), str(folder / "example.py"),
                str(folder / "epilogue.py")]  # fmt: skip
        return self._shell(shlex.join(argv))

    def _note_servers(self) -> None:
        pid_file = self.work / ".fedrec" / "server" / "prefect-server.pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return
        if pid not in self.pids:
            self.pids.append(pid)

    def stop_servers(self) -> None:
        """Stop every Prefect server the examples started, by its PID (it leads its process
        group): SIGTERM, then SIGKILL after 20 s."""
        self._note_servers()
        for pid in self.pids:
            if not _alive(pid):
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"prefect" not in cmdline:
                continue  # not ours any more: the PID was reused
            for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not _alive(pid):
                    break


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    session = Session(tmp_path_factory.mktemp("readme"))
    tools = ("uv", "make", "bash", "git")
    missing = [tool for tool in tools if shutil.which(tool, path=session.env["PATH"]) is None]
    if missing:
        pytest.skip(
            f"the README's commands need {', '.join(missing)} on PATH (or uv in {LOCAL_UV})"
        )
    try:
        yield session
    finally:
        session.stop_servers()


# ---------------------------------------------------------------------------------------------
# the tests


def _shape(line: str) -> re.Pattern[str]:
    """A README output line as a pattern: ids, hashes, ports and spacing may differ."""
    wild = re.compile(
        r"(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
        r"|(?P<hex>[0-9a-f]{32})|(?P<port>(?<=127\.0\.0\.1:)\d+)|(?P<number>(?<=/)\d+(?=/))"
        r"|(?P<space>\s+)"
    )
    pattern, last = "", 0
    for match in wild.finditer(line):
        pattern += re.escape(line[last : match.start()])
        pattern += {"uuid": r"[0-9a-f-]{36}", "hex": r"[0-9a-f]{32}", "port": r"\d+",
                    "number": r"\d+", "space": r"\s+"}[match.lastgroup]  # fmt: skip
        last = match.end()
    return re.compile(pattern + re.escape(line[last:]))


def test_the_readme_marks_the_examples_this_test_checks():
    names = {example.name for example in EXAMPLES}
    assert set(CHECKS) <= names, f"markers missing from README.md for {set(CHECKS) - names}"
    sources = {example.options.get("output-of") for example in EXAMPLES} - {None}
    assert sources <= names
    assert {e.options.get("setup") for e in EXAMPLES} - {None} <= set(SETUPS)
    assert sum(e.lang in ("bash", "python", "") for e in EXAMPLES) >= 7


def test_markers_are_parsed_with_their_options():
    text = (
        "x\n<!-- example: id=a, exit=2 -->\n```bash\nmake demo\n```\n"
        "```bash\nnot marked\n```\n<!-- example -->\n```python\nprint(1)\n```\n"
    )

    found = parse_examples(text)

    assert found == [
        Example(3, "bash", "make demo\n", {"id": "a", "exit": "2"}),
        Example(10, "python", "print(1)\n", {}),
    ]
    with pytest.raises(ValueError, match=r"README\.md:1: an example marker"):
        parse_examples("<!-- example -->\ntext\n")


def test_output_shapes_accept_other_ids_and_ports_only():
    shape = _shape(
        "Prefect flow run: http://127.0.0.1:4200/runs/flow-run/5ae2e79e-d648-4bdd-8794-f0bc4248d595"
    )

    assert shape.search(
        "Prefect flow run: http://127.0.0.1:38117/runs/flow-run/0b6e2d1c-1111-4bdd-8794-f0bc4248d595"
    )
    assert not shape.search("Prefect flow run: http://127.0.0.1:4200/runs/task-run/x")


def test_a_transcript_that_prints_otherwise_is_reported(tmp_path):
    example = Example(1, "", "$ echo hello\nhello\n$ echo world >&2\nthe world\n")

    out = Session(tmp_path)._transcript(example)

    assert out.returncode == 0
    assert out.mismatches == ["`echo world >&2` printed\nworld"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_readme_example(example: Example, session: Session):
    if "needs-movielens" in example.options and not any(
        (_datasets() / name).is_dir() for name in ("ml-100k", "ml-1m")
    ):
        pytest.skip(f"{example} needs MovieLens under FEDREC_DATASETS={_datasets()}")
    if "slow" in example.options and os.environ.get("FEDREC_README_SLOW") != "1":
        pytest.skip(f"{example} is marked slow: set FEDREC_README_SLOW=1 to run it")

    if "output-of" in example.options:
        source = next(e for e in EXAMPLES if e.name == example.options["output-of"])
        out = session.outcome(source)
        printed = out.stdout + out.stderr
        for line in filter(str.strip, example.source.splitlines()):
            assert _shape(line).search(printed), f"{example}: no line like\n{line}\nin\n{printed}"
        return

    out = session.outcome(example)

    expected = int(example.options.get("exit", 0))
    assert out.returncode == expected, (
        f"{example} exited {out.returncode} (documented: {expected}) after {out.seconds:.0f} s\n"
        f"stdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-4000:]}"
    )
    assert not out.mismatches, f"{example}: " + "\n".join(out.mismatches)
    if example.lang == "python":
        comment = re.search(r"^# -> (.+)$", example.source.strip().splitlines()[-1])
        if comment:
            columns = [c.strip() for c in comment[1].split(",")]
            printed = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"value_columns"')]  # fmt: skip
            assert printed and printed[-1]["value_columns"] == columns, out.stdout
    if example.name in CHECKS:
        CHECKS[example.name](out, session)


def test_the_examples_leave_the_repository_clean(session: Session):
    for example in EXAMPLES:
        if "output-of" not in example.options:
            session.outcome(example)
    session.stop_servers()

    assert not any(_alive(pid) for pid in session.pids)
    new = _repo_paths() - session.repo_before
    assert not new, f"the examples left files in the repository: {sorted(new)}"
