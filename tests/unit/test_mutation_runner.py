"""The mutation runner's test server (the zygote) forks each test run from a process that has the
third-party imports done and none of the project's: a project module it had imported would be
the unmutated copy in every forked run, and the runner refuses to start with one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "mutation.py"


def test_the_zygote_starts_without_importing_the_project():
    done = subprocess.run(
        [sys.executable, str(RUNNER), "--zygote"],
        input="", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported project modules" not in done.stderr
