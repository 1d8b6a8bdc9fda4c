"""The sites demo's isolation: a site's rows live on a tmpfs in the site's own mount namespace,
the copy handed over is deleted, and outside the namespace the mount point stays empty."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fedrec.sites_demo import DemoError, Processes, check_namespaces, isolated_command

ROWS = "user_id,item_id,rating\n1,10,5\n2,11,3\n"


def namespaces_work() -> bool:
    """Whether this process can make private mount namespaces (root, or user namespaces)."""
    try:
        check_namespaces()
    except DemoError:
        return False
    return True


def require_namespaces() -> None:
    """Skips the test without private mount namespaces, or fails it in CI (which has them)."""
    if not namespaces_work():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(
                "no private mount namespaces here (unshare -m); CI runs as root and has them"
            )
        pytest.skip("no private mount namespaces here (unshare -m)")


def test_only_the_site_process_sees_its_rows(tmp_path):
    require_namespaces()
    rows, mount = tmp_path / "site-a.csv", tmp_path / "rows"
    rows.write_text(ROWS)
    mount.mkdir()
    seen = tmp_path / "seen.txt"  # what the process inside read from its private copy
    inside = ["sh", "-c", f'cat "{mount}/ratings.csv" > "{seen}" && exec sleep 60']
    processes = Processes()
    process = processes.start("site-a", isolated_command(rows, mount, inside), tmp_path / "log")
    try:
        deadline = time.monotonic() + 30
        while not (seen.exists() and seen.read_text()):
            processes.check_alive()
            assert time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.1)
        assert seen.read_text() == ROWS
        assert not rows.exists()  # the handed-over copy is gone
        assert list(mount.iterdir()) == []  # the tmpfs is not mounted out here

        # and the site's process is the one that runs (each wrapper execs): the shell writes
        # what it read before it execs, so its command line turns into the site's a moment later
        def cmdline() -> list[str]:
            assert process.poll() is None, (tmp_path / "log").read_text()
            return Path(f"/proc/{process.pid}/cmdline").read_text().split("\0")[:2]

        while cmdline() != ["sleep", "60"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cmdline() == ["sleep", "60"]
    finally:
        processes.stop_all()
    assert process.poll() is not None
