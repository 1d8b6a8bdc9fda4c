"""The sites demo's parts that need no servers: its error lines, its wait for the sites, what it
counts per site, the sites file it writes and its command line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time

import pytest
import yaml
from click.testing import CliRunner

from fedrec import sites_demo
from fedrec.sites.budget import ENTRIES
from fedrec.sites_demo import (
    SITE_READY,
    DemoError,
    Processes,
    SiteShare,
    _last_line,
    _run,
    _site_epsilon,
    _wait_until_ready,
    _write_sites_yaml,
    check_namespaces,
    namespace_prefix,
)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failed_step_is_named_with_the_last_line_it_printed():
    with pytest.raises(DemoError, match=r"^keygen failed: third$"):
        _run(_python("import sys; sys.stderr.write('first\\nsecond\\nthird\\n\\n'); sys.exit(3)"),
             "keygen")  # fmt: skip
    # standard error comes first, so the last line of standard output is the last word
    with pytest.raises(DemoError, match=r"^train failed: said last$"):
        _run(_python("import sys; print('said\\nsaid last'); sys.stderr.write('e\\n'); sys.exit(1)"),
             "train")  # fmt: skip
    with pytest.raises(DemoError, match=r"^quiet failed: status 4$"):
        _run(_python("raise SystemExit(4)"), "quiet")
    assert _run(_python("print('fine')"), "fine") == "fine\n"


def test_the_last_line_of_a_log_is_its_last_non_blank_one_cut_at_300_characters(tmp_path):
    log = tmp_path / "site.log"
    log.write_text("one\ntwo\n" + "x" * 400 + "\n  \n\n")
    assert _last_line(log) == "x" * 300
    log.write_text("one\ntwo\nthree\n\n")
    assert _last_line(log) == "three"
    assert _last_line(tmp_path / "absent.log") == ""


def test_a_started_process_that_exits_is_named_with_its_status_and_last_line(tmp_path):
    processes = Processes()
    log = tmp_path / "a.log"
    processes.start("site-a", _python("print('a\\nb\\ngone'); raise SystemExit(3)"), log)
    processes.started["site-a"][0].wait(30)
    with pytest.raises(DemoError, match=rf"^site-a exited \(status 3\): gone \(log: {log}\)$"):
        processes.check_alive()


def test_stop_all_ends_a_process_that_ignores_sigterm_after_its_grace(tmp_path):
    processes = Processes(grace=0.5)
    stubborn = _python(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True);"
        " time.sleep(60)"
    )
    log = tmp_path / "stubborn.log"
    process = processes.start("stubborn", stubborn, log)
    polite = processes.start("polite", _python("import time; time.sleep(60)"), tmp_path / "p.log")
    deadline = time.monotonic() + 30
    while "up" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    processes.check_alive()  # both still run
    started = time.monotonic()
    processes.stop_all()
    assert time.monotonic() - started >= 0.5  # SIGKILL only after the grace
    assert process.returncode == -signal.SIGKILL
    assert polite.returncode == -signal.SIGTERM


def test_the_namespace_prefix_maps_to_root_only_when_not_root():
    prefix = namespace_prefix()
    assert prefix[0] == shutil.which("unshare")
    flags = ["-m"] if os.geteuid() == 0 else ["-U", "-r", "-m"]
    assert prefix[1:] == [*flags, "--propagation", "private"]


def test_a_namespace_that_cannot_be_made_is_refused_with_unshares_last_line(monkeypatch):
    failing = _python("import sys; sys.stderr.write('a\\nb\\nno permission\\n'); sys.exit(1)")
    monkeypatch.setattr(sites_demo, "namespace_prefix", lambda: failing)
    with pytest.raises(DemoError, match=r"not available \(no permission\): run as root"):
        check_namespaces()
    monkeypatch.setattr(sites_demo, "namespace_prefix", lambda: _python("raise SystemExit(1)"))
    with pytest.raises(DemoError, match=r"not available \(no reason given\)"):
        check_namespaces()
    monkeypatch.setattr(sites_demo, "namespace_prefix", lambda: _python("pass"))
    check_namespaces()


def _site(split, logs, name, *, taken: bool, polling: bool) -> SiteShare:
    if not taken:
        (split / f"{name}.csv").write_text("user_id,item_id,rating,timestamp\n")
    logs[name].write_text(f"loading\n{SITE_READY} for requests\n" if polling else "loading\n")
    return SiteShare(name, ("writer",), 1, 1)


def test_the_demo_waits_until_every_site_took_its_rows_and_polls(tmp_path):
    split = tmp_path / "split"
    split.mkdir()
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b", "c")}
    ready = _site(split, logs, "a", taken=True, polling=True)
    # all ready at the first look: no wait, even with no time left
    _wait_until_ready(Processes(), [ready], split, logs, timeout=0)

    holding = _site(split, logs, "b", taken=False, polling=True)  # its copy is still there
    silent = _site(split, logs, "c", taken=True, polling=False)  # took them, has not polled
    with pytest.raises(DemoError, match=r"^b, c not ready within 1 s$"):
        _wait_until_ready(Processes(), [ready, holding, silent], split, logs, timeout=1)

    def become_ready():
        time.sleep(1.0)
        (split / "b.csv").unlink()
        logs["c"].write_text(f"{SITE_READY}\n")

    helper = threading.Thread(target=become_ready)
    helper.start()
    try:
        _wait_until_ready(Processes(), [ready, holding, silent], split, logs, timeout=60)
    finally:
        helper.join()


def test_each_site_counts_only_the_runs_entries_rounded_to_four_places(tmp_path):
    for name, entries in {
        "site-a": [("run-1", 0.123456), ("run-2", 5.0), ("run-1", 0.1)],
        "site-b": [("run-2", 1.0)],
    }.items():
        folder = tmp_path / "sites" / name / "state" / "budget"
        folder.mkdir(parents=True)
        lines = [json.dumps({"run": run, "epsilon": eps}) for run, eps in entries]
        (folder / ENTRIES).write_text("\n".join(lines) + "\n\n")
    spent = _site_epsilon(tmp_path, ["site-a", "site-b", "site-c"], "run-1")
    assert spent == {"site-a": 0.2235, "site-b": 0.0, "site-c": 0.0}


def test_the_sites_file_names_each_sites_key_and_the_catalogue_when_there_is_one(tmp_path):
    plain = yaml.safe_load(_write_sites_yaml(tmp_path, ["x", "y"]).read_text())
    assert plain == {
        "coordinator_key": "keys/coordinator.key",
        "sites": [
            {"name": "x", "public_key": "keys/x.pub"},
            {"name": "y", "public_key": "keys/y.pub"},
        ],
    }
    listed = yaml.safe_load(_write_sites_yaml(tmp_path, ["x"], tmp_path / "items.csv").read_text())
    assert listed == {
        "coordinator_key": "keys/coordinator.key",
        "catalogue": "items.csv",
        "sites": [{"name": "x", "public_key": "keys/x.pub"}],
    }


@pytest.fixture
def handlers():
    """The demo's command installs SIGTERM and SIGHUP handlers: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_the_command_passes_its_options_and_leaves_a_folder_only_searchable(
    tmp_path, monkeypatch, handlers
):
    calls = []

    def fake_run_demo(folder, dataset, *, rounds, timeout, dp_epsilon):
        calls.append((folder, dataset.name, rounds, timeout, dp_epsilon))
        return {"model_version": "1"}

    monkeypatch.setattr(sites_demo, "run_demo", fake_run_demo)
    folder = tmp_path / "demo"
    done = CliRunner().invoke(sites_demo.main, ["--dir", str(folder), "--rounds", "1",
                                                "--timeout", "1", "--dp-epsilon", "0.5"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert calls == [(folder.resolve(), "ml-100k", 1, 1.0, 0.5)]
    assert json.loads(done.stdout.splitlines()[0]) == {"model_version": "1"}
    assert f"fedrec stores start --dir {folder.resolve() / 'stores'}`" in done.stderr
    assert folder.stat().st_mode & 0o777 == 0o711
    # `kill` and a closed terminal end the command through its clean-up, with the shell's codes
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        with pytest.raises(SystemExit) as exited:
            signal.getsignal(sig)(sig, None)
        assert exited.value.code == code

    for bad in (["--rounds", "0"], ["--timeout", "0.9"], ["--dp-epsilon", "0"]):
        refused = CliRunner().invoke(sites_demo.main, ["--dir", str(folder), *bad])
        assert refused.exit_code == 2, (bad, refused.output)
    assert len(calls) == 1


def test_a_failed_step_ends_the_command_with_one_line_naming_the_logs(
    tmp_path, monkeypatch, handlers
):
    def failing(folder, dataset, **_):
        raise DemoError("site-b exited (status 1): no rows")

    monkeypatch.setattr(sites_demo, "run_demo", failing)
    folder = tmp_path / "demo"
    result = CliRunner().invoke(sites_demo.main, ["--dir", str(folder)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert (
        f"fedrec: error: site-b exited (status 1): no rows (logs under {folder.resolve()})"
        in result.stderr
    )
