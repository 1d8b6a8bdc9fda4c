"""The local Prefect server's parts that need no server: the start-up limit read from the
environment, the port it listens on, the line that counts the seconds of a start, the wait that
gives up and stops what it started, and the grace a descendant gets before SIGKILL.
``tests/flows/test_local_server.py`` starts real servers."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrec import local_server
from fedrec.local_server import LocalServerError


def test_the_servers_files_live_in_its_folder_under_the_home(tmp_path):
    assert local_server.server_dir(tmp_path) == tmp_path / "server"
    assert local_server.log_path(tmp_path) == tmp_path / "server" / "prefect-server.log"


@pytest.mark.parametrize(("configured", "seconds"), [(None, 600.0), ("", 600.0), ("0.5", 0.5)])
def test_the_start_up_limit_is_ten_minutes_unless_set(monkeypatch, configured, seconds):
    monkeypatch.delenv("FEDREC_SERVER_STARTUP_TIMEOUT", raising=False)
    if configured is not None:
        monkeypatch.setenv("FEDREC_SERVER_STARTUP_TIMEOUT", configured)

    assert local_server.startup_timeout() == seconds


@pytest.mark.parametrize("configured", ["0", "-5", "soon"])
def test_a_start_up_limit_that_is_no_positive_number_is_one_line(monkeypatch, configured):
    monkeypatch.setenv("FEDREC_SERVER_STARTUP_TIMEOUT", configured)

    with pytest.raises(LocalServerError) as raised:
        local_server.startup_timeout()

    assert str(raised.value) == (
        f"FEDREC_SERVER_STARTUP_TIMEOUT={configured!r}: must be a positive number of seconds"
    )


@pytest.fixture
def free_ports(monkeypatch):
    """Every port but those in the returned set is free to bind."""
    taken: set[int] = set()
    monkeypatch.setattr(local_server, "port_is_free", lambda port: port not in taken)
    monkeypatch.delenv("FEDREC_PREFECT_PORT", raising=False)
    return taken


def test_without_an_asked_port_prefects_usual_one_is_taken_when_free(free_ports):
    assert local_server.choose_port() == 4200
    free_ports.add(4200)
    other = local_server.choose_port()
    assert other != 4200 and other >= local_server.LISTEN_PORTS_FROM


@pytest.mark.parametrize("port", [1, 65535])
def test_an_asked_port_is_any_tcp_port(free_ports, port):
    assert local_server.choose_port(port) == port


@pytest.mark.parametrize("port", [0, 65536])
def test_an_asked_port_outside_tcps_range_is_refused(free_ports, port):
    with pytest.raises(LocalServerError, match=rf"^port {port}: must be in 1-65535$"):
        local_server.choose_port(port)


def test_the_port_variable_is_read_when_no_port_is_asked_and_a_taken_one_is_refused(
    free_ports, monkeypatch
):
    monkeypatch.setenv("FEDREC_PREFECT_PORT", "12345")
    assert local_server.choose_port() == 12345
    assert local_server.choose_port(23456) == 23456  # --port wins over the variable
    free_ports.add(12345)
    with pytest.raises(LocalServerError) as taken:
        local_server.choose_port()
    assert str(taken.value) == (
        "port 12345 on 127.0.0.1 is in use: choose another with --port or FEDREC_PREFECT_PORT"
    )
    monkeypatch.setenv("FEDREC_PREFECT_PORT", "42x")
    with pytest.raises(LocalServerError, match=r"^FEDREC_PREFECT_PORT='42x': must be a port"):
        local_server.choose_port()
    monkeypatch.setenv("FEDREC_PREFECT_PORT", "")
    assert local_server.choose_port() == 4200  # an empty variable is no choice


def test_the_outgoing_range_is_read_from_the_kernel_or_linuxs_default(tmp_path, monkeypatch):
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("20000\t30999\n")
    monkeypatch.setattr(local_server, "_OUTGOING_RANGE_FILE", str(ranges))
    assert local_server._outgoing_ports() == (20000, 30999)
    ranges.write_text("garbled\n")
    assert local_server._outgoing_ports() == (32768, 60999)
    monkeypatch.setattr(local_server, "_OUTGOING_RANGE_FILE", str(tmp_path / "absent"))
    assert local_server._outgoing_ports() == (32768, 60999)


def test_a_free_port_is_drawn_below_the_outgoing_range_down_to_a_thousand_ports(monkeypatch):
    low, high = local_server._outgoing_ports()  # the kernel's, where the OS's choice comes from
    monkeypatch.setattr(local_server, "_outgoing_ports", lambda: (11000, 60999))
    drawn = {local_server.free_port() for _ in range(20)}
    assert all(10000 <= port < 11000 for port in drawn), sorted(drawn)

    # fewer than a thousand ports below the outgoing range: the OS chooses, from that range
    monkeypatch.setattr(local_server, "_outgoing_ports", lambda: (10999, 60999))
    monkeypatch.setattr(local_server, "port_is_free", lambda port: pytest.fail("drew a port"))
    assert low <= local_server.free_port() <= high


def test_a_free_port_falls_back_to_the_oss_choice_when_no_draw_is_free(monkeypatch):
    low, high = local_server._outgoing_ports()  # the kernel's, where the OS's choice comes from
    asked: list[int] = []
    monkeypatch.setattr(local_server, "port_is_free", lambda port: asked.append(port) or False)

    port = local_server.free_port()

    assert len(asked) == 200 and all(10000 <= p < low for p in asked)
    assert low <= port <= high


_NAMED_WITH_PARENTHESES = """
import subprocess, sys
child = subprocess.Popen([sys.argv[1], "-c", "import time; time.sleep(600)"])
done = subprocess.Popen([sys.argv[1], "-c", "pass"])
print(child.pid, done.pid, flush=True)
sys.stdin.readline()
child.kill()
"""


def test_a_process_whose_name_holds_parentheses_and_spaces_is_read_from_proc(tmp_path):
    """/proc/PID/stat gives the command name in parentheses, and a name may hold ``) `` itself:
    the fields are read after the last one. A parent and two children named so: one running,
    one exited and not yet reaped."""
    named = tmp_path / "x) 1 (y"
    named.symlink_to(sys.executable)
    parent = subprocess.Popen([str(named), "-c", _NAMED_WITH_PARENTHESES, str(named)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        running, exited = map(int, parent.stdout.readline().split())
        assert Path(f"/proc/{running}/comm").read_text().strip() == "x) 1 (y"
        stat = Path(f"/proc/{running}/stat").read_text().split()
        assert local_server.process_start(running) == int(stat[21 + 2])  # 2 more fields: ") 1 (y"
        deadline = time.monotonic() + 30
        while Path(f"/proc/{exited}/stat").read_text().split()[4] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert local_server.is_running(running, local_server.process_start(running))
        assert not local_server.is_running(exited)  # a zombie has exited
        assert local_server.descendants(parent.pid) == sorted([running, exited])
    finally:
        parent.communicate("\n", timeout=30)


def test_the_last_log_line_is_the_last_non_blank_one_cut_at_300_characters(tmp_path):
    assert local_server._last_log_line(tmp_path) == ""  # no log yet
    log = local_server.log_path(tmp_path)
    log.parent.mkdir()
    log.write_text("starting\n  address already in use  \n\n   \n")
    assert local_server._last_log_line(tmp_path) == "address already in use"
    log.write_text("x" * 400 + "\n")
    assert local_server._last_log_line(tmp_path) == "x" * 300
    log.write_text("\n\n")
    assert local_server._last_log_line(tmp_path) == ""


class _Clock:
    """Stands in for the module's ``time``: ``monotonic`` reads ``now``, ``sleep`` adds to it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_sees_the_seconds_counted_on_one_line(monkeypatch):
    clock = _Clock(1000.0)
    monkeypatch.setattr(local_server, "time", clock)
    out = _Terminal()
    waiting = local_server._Waiting("starting", out)

    for now in (1001.2, 1001.7, 1002.1, 1004.9):
        clock.now = now
        waiting.tick()
    waiting.done("ready")

    assert out.getvalue() == (
        "fedrec: starting ...\rfedrec: starting ... 1 s\rfedrec: starting ... 2 s"
        "\rfedrec: starting ... 4 s\rfedrec: starting ... ready\n"
    )


def test_a_log_file_sees_a_sign_of_life_every_30_seconds(monkeypatch):
    clock = _Clock(1000.0)
    monkeypatch.setattr(local_server, "time", clock)
    out = io.StringIO()
    waiting = local_server._Waiting("starting", out)

    for now in (1000.5, 1029.9, 1030.2, 1045.0, 1059.0, 1061.0, 1089.0, 1090.0):
        clock.now = now
        waiting.tick()
    clock.now = 1095.25
    assert waiting.elapsed == 95.25
    waiting.done("ready")

    assert out.getvalue() == "fedrec: starting ... 30 s ... 61 s ... 90 s ... ready\n"


def test_a_start_that_never_answers_gives_up_stops_the_process_and_says_how_to_wait_longer(
    tmp_path, monkeypatch
):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                               start_new_session=True)  # fmt: skip
    try:
        state = local_server.ServerState(
            sleeper.pid, local_server.free_port(), time.time(),
            local_server.process_start(sleeper.pid),
        )  # fmt: skip
        folder = local_server.server_dir(tmp_path)
        folder.mkdir()
        (folder / local_server.STATE_FILE).write_text(json.dumps({"pid": sleeper.pid}))
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        started = time.monotonic()

        with pytest.raises(LocalServerError) as raised:
            local_server.wait_until_healthy(state, timeout=1.5, home=tmp_path, process=sleeper)

        assert time.monotonic() - started >= 1.5
        assert sleeper.wait(timeout=20) == -signal.SIGTERM  # stopped, not left running
        assert str(raised.value) == (
            f"the Prefect server did not answer within 2 s (log: {local_server.log_path(tmp_path)}); "
            "the machine may be busy: retry with a longer limit, e.g. "
            "FEDREC_SERVER_STARTUP_TIMEOUT=3 or `fedrec server start --timeout 3`"
        )
        assert err.getvalue().startswith(
            f"fedrec: starting local Prefect server at {state.url} ..."
        )
        assert re.search(r" no answer after \d+ s\n$", err.getvalue()), err.getvalue()
        assert not (folder / local_server.STATE_FILE).exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


_GRACEFUL_CHILD = """
import json, signal, subprocess, sys
from fedrec import local_server
child = subprocess.Popen([sys.executable, "-c",
    "import signal, sys, time\\n"
    "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.5), sys.exit(0)))\\n"
    "print('ready', flush=True)\\n"
    "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
ended = local_server.end_descendants(grace=20.0)
child.wait(timeout=30)
print(json.dumps({"ended": ended, "child": child.pid, "status": child.returncode}))
"""


def test_a_descendant_that_ends_within_its_grace_is_not_killed(tmp_path):
    """SIGTERM first, and SIGKILL only for a process still running after the grace period: a
    flow run's subprocess that takes half a second to shut down exits by itself. Run in a
    process of its own: it ends every descendant."""
    env = os.environ | {"FEDREC_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _GRACEFUL_CHILD], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip

    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["ended"] == [seen["child"]]
    assert seen["status"] == 0  # its own exit, not -SIGKILL


class _SleepingClock(_Clock):
    """A clock whose seconds pass at once, while the processes it waits for get a moment of
    real time per step to act on a signal."""

    def sleep(self, seconds: float) -> None:
        time.sleep(0.01)  # this module's time: only local_server's is replaced
        super().sleep(seconds)


@pytest.fixture
def stubborn_child():
    """A child that ignores SIGTERM (SIGKILL ends it), killed at the end whatever happened."""
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert child.stdout.readline().strip() == "ready"
    yield child
    if child.poll() is None:
        child.kill()
    child.wait()


def test_stop_gives_a_server_that_ignores_sigterm_ten_seconds_before_sigkill(
    tmp_path, monkeypatch, stubborn_child
):
    folder = local_server.server_dir(tmp_path)
    folder.mkdir()
    record = {"pid": stubborn_child.pid, "port": 1, "started_at": time.time(),
              "process_start": local_server.process_start(stubborn_child.pid)}  # fmt: skip
    (folder / local_server.STATE_FILE).write_text(json.dumps(record))
    clock = _SleepingClock(0.0)
    monkeypatch.setattr(local_server, "time", clock)
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path / "another-home"))  # home= wins

    stopped = local_server.stop(home=tmp_path)

    assert stopped is not None and stopped.pid == stubborn_child.pid
    assert stubborn_child.wait(timeout=10) == -signal.SIGKILL
    assert 10.0 <= clock.now < 11.0  # SIGKILL came after the default grace, soon after it
    assert not (folder / local_server.STATE_FILE).exists()


@pytest.mark.parametrize("ends_at", [10.3, None])
def test_stop_returns_once_the_server_is_gone_and_fails_when_sigkill_does_not_end_it(
    tmp_path, monkeypatch, stubborn_child, ends_at
):
    """What ``is_running`` reports is scripted on the clock (the process is ours to signal):
    gone 0.3 s after SIGKILL, or never (another user's process)."""
    clock = _SleepingClock(0.0)
    monkeypatch.setattr(local_server, "time", clock)
    state = local_server.ServerState(stubborn_child.pid, 1, time.time(), None)
    folder = local_server.server_dir(tmp_path)
    folder.mkdir()
    (folder / local_server.STATE_FILE).write_text(json.dumps(local_server.asdict(state)))
    monkeypatch.setattr(local_server, "read_state", lambda home=None: state)
    monkeypatch.setattr(
        local_server, "is_running",
        lambda pid, started=None: ends_at is None or clock.now < ends_at,
    )  # fmt: skip

    if ends_at is None:
        with pytest.raises(LocalServerError) as raised:
            local_server.stop(home=tmp_path, grace=10)
        assert str(raised.value) == f"could not stop the Prefect server (pid {state.pid})"
        assert 15.0 <= clock.now < 15.5  # ten seconds' grace, then five for SIGKILL
        assert (folder / local_server.STATE_FILE).exists()  # still recorded: it may run
    else:
        assert local_server.stop(home=tmp_path, grace=10) == state
        assert ends_at <= clock.now < ends_at + 0.5  # not before it was gone
        assert not (folder / local_server.STATE_FILE).exists()
    assert stubborn_child.wait(timeout=10) == -signal.SIGKILL


def test_a_server_that_exits_while_it_is_awaited_is_one_line_with_its_status_and_log(
    tmp_path, monkeypatch
):
    log = local_server.log_path(tmp_path)
    log.parent.mkdir()
    log.write_text("starting\nERROR: the database is locked\n")
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    failed.wait()
    state = local_server.ServerState(failed.pid, local_server.free_port(), time.time(), None)
    monkeypatch.setattr(sys, "stderr", io.StringIO())

    with pytest.raises(LocalServerError) as raised:
        local_server.wait_until_healthy(state, timeout=60, home=tmp_path, process=failed)

    assert str(raised.value) == (
        "the Prefect server exited during start-up (status 3): ERROR: the database is locked "
        f"(full log: {log})"
    )
    assert sys.stderr.getvalue().endswith(" failed\n")


def test_a_server_another_command_started_is_not_awaited_once_its_process_is_gone(
    tmp_path, monkeypatch
):
    """Without the process in hand (a server another command is starting), a vanished process
    ends the wait at once, not at the time limit."""
    clock = _SleepingClock(0.0)
    monkeypatch.setattr(local_server, "time", clock)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    state = local_server.ServerState(gone.pid, local_server.free_port(), time.time(), None)
    monkeypatch.setattr(sys, "stderr", io.StringIO())

    with pytest.raises(LocalServerError) as raised:
        local_server.wait_until_healthy(state, timeout=60, home=tmp_path)

    assert str(raised.value) == (
        f"the Prefect server exited during start-up (full log: {local_server.log_path(tmp_path)})"
    )
    assert clock.now < 1.0
