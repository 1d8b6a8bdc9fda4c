"""The mutation runner's test server (the zygote) forks each test run from a process that has the
third-party imports done and none of the project's: a project module it had imported would be
the unmutated copy in every forked run, and the runner refuses to start with one. A run it stops
at its timeout takes with it the servers its tests started in sessions of their own (as
Prefect's test server is)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.mutation import _Runner

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "mutation.py"

HANGING = """
import subprocess, time
def test_starts_a_server_in_its_own_session_and_hangs():
    server = subprocess.Popen(["sleep", "300"], start_new_session=True)
    open("server.pid", "w").write(str(server.pid))
    time.sleep(120)
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


def test_a_timed_out_run_leaves_no_server_behind(tmp_path):
    (tmp_path / "test_hanging.py").write_text(HANGING)
    runner = _Runner(tmp_path, fork=True)
    try:
        outcome = runner.run(["test_hanging.py"], timeout=8)
    finally:
        runner.close()
    server = int((tmp_path / "server.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(server)
    if left:
        os.kill(server, 9)
    assert outcome == ("timeout", "")
    assert not left, "the server the timed-out test started outlived the run"
