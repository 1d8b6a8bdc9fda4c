"""The mutation runner's test server (the zygote) forks each test run from a process that has the
third-party imports done and none of the project's: a project module it had imported would be
the unmutated copy in every forked run, and the runner refuses to start with one. A run, whether
it ends or is stopped at its timeout, takes with it the servers its tests started in sessions of
their own (as Prefect's test server is) and left running. Tests in the copied tree find the
shared datasets where the checkout does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.mutation import _Runner, _tree_env

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "mutation.py"

HANGING = """
import subprocess, time
def test_starts_a_server_in_its_own_session_and_hangs():
    server = subprocess.Popen(["sleep", "300"], start_new_session=True)
    open("server.pid", "w").write(str(server.pid))
    time.sleep(120)
"""

LEAVING = """
import subprocess
def test_starts_a_server_in_its_own_session_and_passes():
    server = subprocess.Popen(["sleep", "300"], start_new_session=True)
    open("server.pid", "w").write(str(server.pid))
"""


def test_the_zygote_starts_without_importing_the_project():
    done = subprocess.run(
        [sys.executable, str(RUNNER), "--zygote"],
        input="", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported project modules" not in done.stderr


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _run_once(folder: Path, test: str, timeout: float) -> tuple[tuple[str, str], bool]:
    """The runner's outcome of ``test`` in ``folder``, and whether the server the test started
    was still alive 5 s after the run (it is killed then, so that the test leaves nothing)."""
    runner = _Runner(folder, fork=True)
    try:
        outcome = runner.run([test], timeout=timeout)
    finally:
        runner.close()
    server = int((folder / "server.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(server)
    if left:
        os.kill(server, 9)
    return outcome, left


def test_a_timed_out_run_leaves_no_server_behind(tmp_path):
    (tmp_path / "test_hanging.py").write_text(HANGING)
    outcome, left = _run_once(tmp_path, "test_hanging.py", timeout=8)
    assert outcome == ("timeout", "")
    assert not left, "the server the timed-out test started outlived the run"


def test_a_run_that_ends_leaves_no_server_its_tests_left_behind(tmp_path):
    (tmp_path / "test_leaving.py").write_text(LEAVING)
    outcome, left = _run_once(tmp_path, "test_leaving.py", timeout=60)
    assert outcome == ("survived", "")
    assert not left, "the server the test left running outlived the run"


def test_a_copied_tree_finds_the_datasets_where_the_checkout_does(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDREC_DATASETS", raising=False)
    env = _tree_env(tmp_path)
    assert env["PYTHONPATH"] == str(tmp_path)
    assert env["FEDREC_DATASETS"] == str(RUNNER.parents[2] / "shared" / "datasets")
    monkeypatch.setenv("FEDREC_DATASETS", "/data/sets")
    assert _tree_env(tmp_path)["FEDREC_DATASETS"] == "/data/sets"
