"""`make sites-demo` as written: ML-100K on three isolated site processes, the coordinator on
PostgreSQL-backed stores, one JSON line, nothing left running."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedrec.stores import StoresError, stop_stores
from models.data.readers import datasets_dir
from tests.e2e.stores import live, process_tree, require_postgres
from tests.e2e.test_site_isolation import require_namespaces

ML100K = datasets_dir() / "ml-100k"


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"ML-100K not found in {ML100K}")
def test_the_sites_demo_trains_registers_and_stops_everything():
    require_postgres()
    require_namespaces()
    # not under pytest's tmp_path (0700): under root the cluster runs as the postgres user
    folder = Path(tempfile.mkdtemp(prefix="fedrec-sites-demo-test-"))
    try:
        _check_demo(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"ML-100K not found in {ML100K}")
def test_the_private_sites_demo_counts_the_runs_epsilon_at_every_site_whatever_its_users():
    """Sites that answer private runs only, at their default delta cap: each counts the run as
    its epsilon and its noisy user count on top, the same at 305, 314 and 324 users (what a
    site counts depends on nothing the coordinator does not know)."""
    from models.sites.budget import SITE_RUN_DELTA

    require_postgres()
    require_namespaces()
    folder = Path(tempfile.mkdtemp(prefix="fedrec-sites-demo-test-"))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fedrec.sites_demo", "--dir", str(folder), "--rounds", "2",
             "--dp-epsilon", "8"],
            capture_output=True, text=True, timeout=1100, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(folder) not in running
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    assert summary["model_version"] == "1" and summary["dp_epsilon"] == 8.0
    assert summary["privacy"]["delta"] == pytest.approx(SITE_RUN_DELTA)
    assert 7.99 < summary["privacy"]["epsilon"] <= 8.0 + 1e-9
    counted = summary["site_epsilon"]
    assert sorted(counted) == ["site-a", "site-b", "site-c"]
    assert len({round(v, 6) for v in counted.values()}) == 1, counted
    assert all(8.0 < v < 8.05 for v in counted.values()), counted  # the noisy count: ~0.02
    assert len({s["users"] for s in summary["sites"]}) == 3


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.timeout(600)
@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"ML-100K not found in {ML100K}")
def test_a_demo_killed_while_it_trains_stops_every_process_it_started():
    """SIGTERM (``kill``) in the middle of training: the demo exits 143 through its clean-up,
    which stops the coordinator's training, the three sites and the stores."""
    from fedrec.sites_demo import SITE_NAMES

    require_postgres()
    require_namespaces()
    folder = Path(tempfile.mkdtemp(prefix="fedrec-sites-demo-test-"))
    demo = subprocess.Popen(
        [sys.executable, "-m", "fedrec.sites_demo", "--dir", str(folder), "--rounds", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 400
        while demo.poll() is None and time.monotonic() < deadline:
            started = process_tree(demo.pid) - {demo.pid}
            if any("--sites" in _cmdline(pid) for pid in started):  # `fedrec train --sites`
                break
            time.sleep(0.5)
        assert demo.poll() is None, demo.communicate()[1][-3000:]
        commands = [_cmdline(pid) for pid in started]
        assert any("--sites" in cmd for cmd in commands), "the demo never started training"
        assert sum("site" in cmd and "run" in cmd for cmd in commands) >= 3, commands
        demo.send_signal(signal.SIGTERM)
        out, err = demo.communicate(timeout=120)
        assert demo.returncode == 143, err[-3000:]
        assert out == ""  # no summary for a run that did not finish
        assert not live(started), [_cmdline(pid) for pid in live(started)]
        running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(folder) not in running
        for name in SITE_NAMES:  # the rows went with the sites' namespaces
            assert list((folder / "sites" / name / "rows").iterdir()) == []
        assert not (folder / "split").exists()
    finally:  # on a failure above: the demo's own clean-up first, then by pid what it left
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)
            try:
                demo.wait(120)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
        for pid in live(started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(StoresError):
            stop_stores(folder / "stores")
        shutil.rmtree(folder, ignore_errors=True)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part for part in raw.decode(errors="replace").split("\0") if part]


def _check_demo(folder: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fedrec.sites_demo", "--dir", str(folder), "--rounds", "2"],
        capture_output=True, text=True, timeout=1100, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON line, nothing else on stdout
    summary = json.loads(lines[0])

    assert summary["promoted"] is True and summary["model_version"] == "1"
    seconds = summary["seconds"]  # tenths of a second; the steps lie within the total
    assert all(round(seconds[k], 1) == seconds[k] > 0 for k in ("stores", "sites", "total"))
    assert seconds["stores"] + seconds["sites"] <= seconds["total"] + 0.1 <= took + 0.2
    assert 0 < seconds["training"] < seconds["total"]
    assert (folder.stat().st_mode & 0o777) == 0o711
    assert 0.8 < summary["test_rmse"] < 1.2  # ML-100K's ratings, not noise
    sites = summary["sites"]
    assert [s["name"] for s in sites] == ["site-a", "site-b", "site-c"]
    assert sum(s["rows"] for s in sites) == 100_000 and sum(s["users"] for s in sites) == 943
    assert max(s["rows"] for s in sites) < 1.1 * min(s["rows"] for s in sites)
    occupations = [o for s in sites for o in s["occupations"]]
    assert len(occupations) == len(set(occupations)) == 21
    # the rows were handed over and live on in no file of the demo's folder
    assert not (folder / "split").exists()
    for site in sites:
        assert list((folder / "sites" / site["name"] / "rows").iterdir()) == []
    assert not list(folder.rglob("site-*.csv")) and not list(folder.rglob("ratings.csv"))
    # nothing the demo started still runs (a process's command line would name the folder)
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(folder) not in running
