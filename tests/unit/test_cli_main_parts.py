"""Parts of ``fedrec.cli`` checked in this process, without a server: the filter on Prefect's
records, the user's store and API, the Prefect API a run reports to, ``fedrec server
start|stop|status`` beside a fake local server, the links and lines of a finished run's summary,
serve's checks before any server, and a failed run's hints."""

from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import fedrec
from fedrec import cli, local_server


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("prefect.flow_runs", level, __file__, 1, message, None, None)


@pytest.mark.parametrize(
    ("level", "message", "kept"),
    [
        (logging.ERROR, "Encountered exception during execution", False),
        (logging.CRITICAL, "the engine stopped", False),
        (logging.ERROR - 1, "just under an error", True),
        (logging.WARNING, "a task was retried", True),
        (logging.INFO, "Finished in state Failed('Flow run encountered an exception.')", False),
        (logging.INFO, "Finished in state Completed()", True),
    ],
)
def test_prefects_error_records_and_failed_state_line_are_left_to_the_clis_own_line(
    level, message, kept
):
    assert cli._NoErrorRecords().filter(_record(level, message)) is kept


@pytest.mark.parametrize(
    ("value", "remembered"), [("sqlite:///x.db", "sqlite:///x.db"), ("", None)]
)
def test_the_group_remembers_the_users_store_as_the_environment_names_it(
    monkeypatch, value, remembered
):
    monkeypatch.setattr(fedrec, "USER_TRACKING_URI", "left from an earlier command")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    cli.main.callback()
    assert remembered == fedrec.USER_TRACKING_URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cli.main.callback()
    assert fedrec.USER_TRACKING_URI is None


def test_the_configured_api_is_the_environments_else_prefects_profiles(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: "http://profile.example:4200/api/"}):
        assert cli.configured_api() == "http://profile.example:4200/api"
        monkeypatch.setenv("PREFECT_API_URL", "http://env.example:4200/api/")
        assert cli.configured_api() == "http://env.example:4200/api"
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        monkeypatch.delenv("PREFECT_API_URL")
        assert cli.configured_api() is None


def _local_server(state, *, started: bool, calls: list[str]) -> SimpleNamespace:
    """``fedrec.cli``'s view of fedrec.local_server: a server in ``state`` (None: none runs)."""

    def start(port=None, timeout=None):
        calls.append(f"start port={port}")
        return state, started

    return SimpleNamespace(
        PORT_ENV=local_server.PORT_ENV,
        read_state=lambda: state,
        start=start,
        log_path=lambda: "/srv/fedrec/server/prefect-server.log",
        is_healthy=lambda url, timeout=3.0: True,
        fedrec_home=local_server.fedrec_home,
    )


@pytest.fixture
def no_configured_api(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_a_sites_run_reports_to_a_running_local_server_and_without_one_is_refused(
    monkeypatch, no_configured_api, capsys
):
    running = local_server.ServerState(pid=4321, port=4711, started_at=0.0)
    calls: list[str] = []
    monkeypatch.setattr(cli, "local_server", _local_server(running, started=False, calls=calls))
    assert cli.prefect_api(sites=True) == "http://127.0.0.1:4711/api"
    assert capsys.readouterr().err == (
        "fedrec: reporting to the local Prefect server at http://127.0.0.1:4711 (pid 4321)\n"
    )

    monkeypatch.setattr(cli, "local_server", _local_server(None, started=True, calls=calls))
    with pytest.raises(cli.UserError, match=r"^--sites: no Prefect API is set and no local"):
        cli.prefect_api(sites=True)
    assert calls == ["start port=None"]  # the first call only: no server is started for sites


def test_a_run_of_simulated_clients_starts_the_local_server_when_none_runs_and_says_so(
    monkeypatch, no_configured_api, capsys
):
    started = local_server.ServerState(pid=4321, port=4711, started_at=0.0)
    view = _local_server(None, started=True, calls=[])
    view.start = lambda port=None, timeout=None: (started, True)
    monkeypatch.setattr(cli, "local_server", view)
    assert cli.prefect_api() == "http://127.0.0.1:4711/api"
    assert capsys.readouterr().err == (
        "fedrec: no local Prefect server is running: starting one; it stays up for the next "
        "commands (`fedrec server stop` ends it)\n"
    )


def test_server_start_beside_a_running_server_says_so_and_refuses_only_another_port(
    monkeypatch, no_configured_api
):
    running = local_server.ServerState(pid=4321, port=4711, started_at=0.0)
    calls: list[str] = []
    monkeypatch.setattr(cli, "local_server", _local_server(running, started=False, calls=calls))
    monkeypatch.delenv(local_server.PORT_ENV, raising=False)

    found = CliRunner().invoke(cli.main, ["server", "start"])
    assert found.exit_code == 0, found.output
    assert found.output.splitlines()[:2] == [
        "a local Prefect server is already running at http://127.0.0.1:4711 (pid 4321)",
        "Prefect UI:  http://127.0.0.1:4711",
    ]
    same = CliRunner().invoke(cli.main, ["server", "start", "--port", "4711"])
    assert same.exit_code == 0, same.output
    moved = CliRunner().invoke(cli.main, ["server", "start", "--port", "4712"])
    assert moved.exit_code == 2
    assert "--port 4712: the local Prefect server is already running at" in moved.output
    monkeypatch.setenv(local_server.PORT_ENV, "4713")
    by_env = CliRunner().invoke(cli.main, ["server", "start"])
    assert by_env.exit_code == 2
    assert f"{local_server.PORT_ENV}=4713: the local Prefect server is already" in by_env.output
    assert calls == ["start port=None", "start port=4711", "start port=4712", "start port=None"]
    monkeypatch.delenv(local_server.PORT_ENV)
    for port in ("1", "65535"):  # the ends of the range reach the server's check
        ends = CliRunner().invoke(cli.main, ["server", "start", "--port", port])
        assert f"--port {port}: the local Prefect server is already running" in ends.output
    for port in ("0", "65536"):
        beyond = CliRunner().invoke(cli.main, ["server", "start", "--port", port])
        assert beyond.exit_code == 2 and "is not in the range 1<=x<=65535" in beyond.output
    assert calls[4:] == ["start port=1", "start port=65535"]


@pytest.fixture
def a_run(tmp_path, monkeypatch):
    """A run in a SQLite store under FEDREC_HOME (fedrec's local store) and one elsewhere."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("FEDREC_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    made = {}
    for where, path in (("local", tmp_path / "home" / "mlflow.db"), ("other", tmp_path / "o.db")):
        uri = f"sqlite:///{path.resolve()}"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("fedrec")
        made[where] = (uri, experiment, client.create_run(experiment).info.run_id)
    return made


def test_a_finished_runs_link_names_the_port_and_the_command_that_opens_its_store(
    a_run, monkeypatch
):
    monkeypatch.delenv(cli.MLFLOW_PORT_ENV, raising=False)
    uri, experiment, run = a_run["local"]
    assert cli.mlflow_run_url(uri, run) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run}"
        "?workflowType=machine_learning",
        "make mlflow-ui",
    )
    monkeypatch.setenv(cli.MLFLOW_PORT_ENV, "5123")
    uri, experiment, run = a_run["other"]
    link, how = cli.mlflow_run_url(uri, run)
    assert link.startswith(f"http://127.0.0.1:5123/#/experiments/{experiment}/runs/{run}")
    assert how == f"mlflow ui --backend-store-uri {uri} --port 5123"
    assert cli.mlflow_run_url(uri, "no-such-run") == (f"run no-such-run in {uri}", "")


def test_server_status_names_the_configured_api_and_an_unused_local_server_beside_it(
    monkeypatch,
):
    running = local_server.ServerState(pid=4321, port=4711, started_at=0.0)
    monkeypatch.setattr(cli, "local_server", _local_server(running, started=False, calls=[]))
    monkeypatch.setenv("PREFECT_API_URL", "http://api.example:4200/api")
    beside = CliRunner().invoke(cli.main, ["server", "status"])
    assert beside.exit_code == 0, beside.output
    assert beside.output.splitlines() == [
        "api:     http://api.example:4200/api  (PREFECT_API_URL: fedrec's commands report to it)",
        "health:  healthy",
        "also:    fedrec's local server at http://127.0.0.1:4711/api (pid 4321), unused",
    ]
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4711/api/")  # the local one itself
    itself = CliRunner().invoke(cli.main, ["server", "status"])
    assert itself.exit_code == 0 and "also:" not in itself.output, itself.output


def test_server_status_is_a_failure_when_the_server_it_reports_on_does_not_answer(
    monkeypatch, no_configured_api
):
    running = local_server.ServerState(pid=4321, port=4711, started_at=time.time() - 42.2)
    view = _local_server(running, started=False, calls=[])
    view.is_healthy = lambda url, timeout=3.0: False
    monkeypatch.setattr(cli, "local_server", view)
    local = CliRunner().invoke(cli.main, ["server", "status"])
    assert local.exit_code == 1
    assert "uptime:  42 s" in local.output.splitlines()
    assert "health:  not answering (starting, or busy)" in local.output.splitlines()
    monkeypatch.setenv("PREFECT_API_URL", "http://api.example:4200/api")
    configured = CliRunner().invoke(cli.main, ["server", "status"])
    assert configured.exit_code == 1 and "health:  not answering" in configured.output
    view.read_state = lambda: None
    monkeypatch.delenv("PREFECT_API_URL")
    none = CliRunner().invoke(cli.main, ["server", "status"])
    assert none.exit_code == 1 and none.output.startswith("no local Prefect server is running")


def test_a_sites_runs_summary_names_who_enrolled_who_was_left_out_and_what_each_missed():
    sites = {"enrolled": ["shop-a", "shop-b", "shop-c"], "left_out": {}, "missed": {}}
    assert cli.sites_lines(sites) == ["sites: 3 enrolled (shop-a, shop-b, shop-c)"]
    sites["left_out"] = {"shop-d": "not started", "shop-e": "wrong coordinator key"}
    sites["missed"] = {
        "shop-c": ["round 4 train (did not answer within 30.0 s)", "round-8 evaluation (gone)"],
        "shop-b": ["round 3 secagg-unmask-request (signature does not verify)"],
    }
    assert cli.sites_lines(sites) == [
        "sites: 3 enrolled (shop-a, shop-b, shop-c); left out: shop-d (not started); "
        "shop-e (wrong coordinator key)",
        "shop-c missed: round 4 train (did not answer within 30.0 s); round-8 evaluation (gone)",
        "shop-b missed: round 3 secagg-unmask-request (signature does not verify)",
    ]


@pytest.mark.parametrize(
    ("written", "locked", "said"),
    [
        ("2026-01-01T00:00:00", ["rounds"], ""),
        ("2026-01-01T00:00:00", None,
         "fedrec: {served} was not scheduled in time: unknown parameters not refused\n"),
        ("2026-01-01T00:00:00", RuntimeError("409"),
         "fedrec: could not make {served} refuse unknown parameters: 409\n"),
        (RuntimeError("no API"), None,
         "fedrec: could not make {served} refuse unknown parameters: no API\n"),
    ],
    ids=["locked", "not-scheduled", "lock-failed", "unreadable"],
)  # fmt: skip
def test_serve_locks_its_deployments_parameters_in_a_thread_and_says_when_it_could_not(
    monkeypatch, capsys, written, locked, said
):
    import threading

    import fedrec.lock_parameters as lock_parameters

    asked: list[tuple[str, object]] = []

    def last_written(name):
        if isinstance(written, Exception):
            raise written
        return written

    def lock_when_scheduled(name, since):
        asked.append((name, since))
        if isinstance(locked, Exception):
            raise locked
        return locked

    monkeypatch.setattr(lock_parameters, "last_written", last_written)
    monkeypatch.setattr(lock_parameters, "lock_when_scheduled", lock_when_scheduled)
    cli._lock_served_parameters()
    for thread in threading.enumerate():
        if thread.name == "lock-parameters":
            thread.join(timeout=30)
    served = lock_parameters.SERVED
    assert capsys.readouterr().err == said.format(served=served)
    # the write it saw before serving, and no wait for a schedule when that could not be read
    assert asked == ([] if isinstance(written, Exception) else [(served, written)])


@pytest.mark.parametrize("cron", ["61 * * * *", "every night"])
def test_serve_refuses_a_cron_that_is_no_schedule_before_any_server(
    monkeypatch, no_configured_api, cron
):
    calls: list[str] = []
    monkeypatch.setattr(cli, "local_server", _local_server(None, started=True, calls=calls))
    refused = CliRunner().invoke(cli.main, ["serve", "--cron", cron])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.splitlines()[-1] == (
        f"fedrec: error: --cron {cron!r}: not a cron schedule; allowed: five fields, minute hour "
        "day-of-month month day-of-week (e.g. '0 2 * * *': 02:00 every day)"
    )
    assert calls == []  # no server was started or looked for


def test_a_flow_runs_link_is_on_the_ui_prefect_names_else_beside_its_api(monkeypatch):
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: "http://api.example:4200/api",
                                     PREFECT_UI_URL: "https://ui.example/prefect/"}):  # fmt: skip
        assert cli.prefect_flow_run_url("f-1") == "https://ui.example/prefect/runs/flow-run/f-1"
    with temporary_settings(updates={PREFECT_API_URL: "http://api.example:4200/api"}):
        assert cli.prefect_flow_run_url("f-2") == "http://api.example:4200/runs/flow-run/f-2"


def test_a_runs_metrics_line_shows_its_ks_metrics_and_each_released_ones_noise():
    rating = {"metrics": {"valid/rmse": 0.91234, "test/rmse": 0.93, "valid/mae": 0.7,
                          "test/dp_sd/rmse": 0.0123}, "seconds": 12.34}  # fmt: skip
    assert cli.metrics_line(rating) == "valid RMSE 0.9123, test RMSE 0.9300 ± 0.0123  (12.34 s)"
    ranking = {"top_k": 5, "seconds": 3.0, "metrics": {
        "select/ndcg_at_5": 0.31, "test/recall_at_5": 0.2, "test/ndcg_at_5": 0.3,
        "test/ndcg_at_10": 0.9, "select/dp_sd/ndcg_at_5": 0.01}}  # fmt: skip
    assert cli.metrics_line(ranking) == (
        "select NDCG@5 0.3100 ± 0.0100, test Recall@5 0.2000, test NDCG@5 0.3000  (3.0 s)"
    )
    del ranking["top_k"]  # a summary without its K: 10
    assert cli.metrics_line(ranking) == "test NDCG@10 0.9000  (3.0 s)"


def test_earlier_lost_runs_are_named_with_what_was_done_with_their_mlflow_runs(monkeypatch, capsys):
    import fedrec.runtime as runtime
    import tasks.tracking as tracking

    closed: list[tuple[str, str]] = []
    monkeypatch.setattr(tracking, "close_lost_run",
                        lambda uri, flow_run_id: closed.append((uri, flow_run_id)) or "closed")  # fmt: skip

    def crash_lost_runs(flow_name, tracking_run_of):
        assert flow_name == "federated-training" and tracking_run_of("f-1") == "closed"
        return [("run-a", "its MLflow run r1 marked KILLED"), ("run-b", None)]

    monkeypatch.setattr(runtime, "crash_lost_runs", crash_lost_runs)
    cli._crash_lost_runs("sqlite:///store.db")
    assert closed == [("sqlite:///store.db", "f-1")]  # the run's own store
    assert capsys.readouterr().err == (
        "fedrec: marked 2 earlier run(s) as crashed, their process gone: run-a (its MLflow run "
        "r1 marked KILLED); run-b (its MLflow run is not in this store)\n"
    )

    def unreachable(flow_name, tracking_run_of):
        raise RuntimeError("the API said 503")

    monkeypatch.setattr(runtime, "crash_lost_runs", unreachable)
    cli._crash_lost_runs("sqlite:///store.db")  # housekeeping: the run goes on
    assert capsys.readouterr().err == (
        "fedrec: could not look for runs whose process is gone: RuntimeError: the API said 503\n"
    )
    monkeypatch.setattr(runtime, "crash_lost_runs", lambda flow_name, tracking_run_of: [])
    cli._crash_lost_runs("sqlite:///store.db")
    assert capsys.readouterr().err == ""


def test_server_stop_says_what_it_stopped_or_that_nothing_ran(monkeypatch):
    running = local_server.ServerState(pid=4321, port=4711, started_at=0.0)
    view = _local_server(running, started=False, calls=[])
    graces: list[float] = []
    view.stop = lambda grace: graces.append(grace) or running
    monkeypatch.setattr(cli, "local_server", view)
    stopped = CliRunner().invoke(cli.main, ["server", "stop", "--grace", "2.5"])
    assert stopped.exit_code == 0
    assert (
        stopped.output == "stopped the local Prefect server at http://127.0.0.1:4711 (pid 4321)\n"
    )
    view.stop = lambda grace: graces.append(grace) and None
    nothing = CliRunner().invoke(cli.main, ["server", "stop"])
    assert nothing.exit_code == 0 and nothing.output.startswith(
        "no local Prefect server is running"
    )
    assert graces == [2.5, local_server.STOP_GRACE]


@pytest.mark.parametrize("before", [None, "http://mine.example:4200/api"])
def test_using_an_api_sets_it_for_this_process_and_its_children_then_puts_back_the_users(
    monkeypatch, before
):
    from prefect.settings import get_current_settings

    if before is None:
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
    else:
        monkeypatch.setenv("PREFECT_API_URL", before)
    with cli.using_api("http://127.0.0.1:4711/api"):
        assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4711/api"
        assert str(get_current_settings().api.url) == "http://127.0.0.1:4711/api"
    assert os.environ.get("PREFECT_API_URL") == before


def test_a_failed_runs_line_says_how_to_resume_it_unless_its_clients_refuse_a_resume(monkeypatch):
    from fedrec.cli_errors import RunFailed
    from tasks.secure import MASKED_ONCE

    uri = "sqlite:////srv/runs.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(fedrec, "USER_TRACKING_URI", uri)  # the command's default store
    config = SimpleNamespace(tracking_uri=uri, secure_aggregation=False)
    monkeypatch.setattr(cli, "_resumable_run", lambda config: "r1")
    hinted = cli._with_resume_hint(RunFailed("too few clients answered"), config)
    assert hinted.message == "too few clients answered; fedrec train --resume r1 continues it"
    assert hinted.details == {"run_id": "r1"}
    config.secure_aggregation = True
    hinted = cli._with_resume_hint(RunFailed("too few clients answered"), config)
    assert hinted.message.endswith(
        "continues it unless its clients had masked the round it stopped in (then start a new run)"
    )
    masked = cli._with_resume_hint(RunFailed(f"round 3: {MASKED_ONCE}"), config)
    assert masked.message == f"round 3: {MASKED_ONCE}" and masked.details == {}
    monkeypatch.setattr(cli, "_resumable_run", lambda config: None)
    monkeypatch.setattr(cli, "_record_a_cut_short_decision", lambda config: "m version 2 was ...")
    decided = cli._with_resume_hint(RunFailed("interrupted"), config)
    assert decided.message == "interrupted; m version 2 was ..." and decided.details == {}


@pytest.mark.parametrize(
    ("sites", "given", "workers"),
    [(None, None, None), (None, 3, 3), ("sites.yaml", None, cli.SITE_PROXY_WORKERS),
     ("sites.yaml", 4, 4)],
    ids=["simulated", "simulated-given", "sites", "sites-given"],  # not the constant's value
)  # fmt: skip
def test_a_sites_run_asks_every_site_at_once_unless_told_and_a_simulated_run_keeps_the_runners(
    sites, given, workers
):
    config = SimpleNamespace(sites=sites)
    assert cli.task_workers(config, given) == workers


def test_a_start_up_steps_seconds_lie_within_the_time_it_took(capsys):
    began = time.perf_counter()
    with cli._step("loading"):
        time.sleep(0.3)
    took = time.perf_counter() - began
    line = capsys.readouterr().err
    assert line.startswith("fedrec: loading ... ") and line.endswith(" s\n"), line
    assert 0.3 - 0.05 <= float(line.split()[-2]) <= took + 0.05, (line, took)


def test_the_bounds_of_the_server_and_train_options_are_the_ones_their_help_gives(monkeypatch):
    running = local_server.ServerState(pid=4321, port=4711, started_at=0.0)
    calls: list[str] = []
    view = _local_server(running, started=True, calls=calls)
    graces: list[float] = []
    view.stop = lambda grace: graces.append(grace) or running
    monkeypatch.setattr(cli, "local_server", view)
    runner = CliRunner()
    assert runner.invoke(cli.main, ["server", "start", "--timeout", "1"]).exit_code == 0
    short = runner.invoke(cli.main, ["server", "start", "--timeout", "0.9"])
    assert short.exit_code == 2 and "0.9 is not in the range x>=1" in short.output, short.output
    assert calls == ["start port=None"]
    assert runner.invoke(cli.main, ["server", "stop", "--grace", "0"]).exit_code == 0
    negative = runner.invoke(cli.main, ["server", "stop", "--grace", "-0.1"])
    assert negative.exit_code == 2 and "-0.1 is not in the range x>=0" in negative.output
    assert graces == [0.0]
    # train: one worker passes its range check and reaches the settings' own (rounds 0)
    one = runner.invoke(cli.main, ["train", "--max-workers", "1", "--rounds", "0"])
    assert one.exit_code == 2 and "--max-workers" not in one.output, one.output
    assert "rounds" in one.output
    none = runner.invoke(cli.main, ["train", "--max-workers", "0"])
    assert none.exit_code == 2 and "0 is not in the range x>=1" in none.output, none.output
