"""Which failures are the user's to fix (exit status 2) and which are failures of a run (1)."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from fedrec.cli_errors import OneLineError, RunFailed, classify
from fedrec.local_server import LocalServerError
from flows.rounds import QuorumError
from models.data.errors import DataValidationError
from models.privacy.ledger import BudgetError
from models.sites.registry import RegistryError
from tasks.tracking import ResumeError


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (DataValidationError("ratings.csv, row 2, column 'rating': value 9.0 ..."), 2),
        (FileNotFoundError("data='x.csv': no such file or folder"), 2),
        (LocalServerError("port 4200 on 127.0.0.1 is in use"), 2),
        (ResumeError("--resume abc: the run finished; there is nothing to resume"), 2),
        (RegistryError("sites.yaml: two sites share one public key"), 2),
        (BudgetError("privacy budget: these users have spent epsilon 4 of 4 ...: not started"), 2),
        (MlflowException("no model", error_code=RESOURCE_DOES_NOT_EXIST), 2),
        (QuorumError("round 1: 1 of 3 clients answered; min_clients is 2"), 1),
        (MlflowException("API request to http://127.0.0.1:5000 failed"), 1),
        (RuntimeError("something fedrec does not know"), 1),
    ],
)
def test_the_exit_status_says_whether_to_fix_the_input_or_run_again(error, status):
    classified = classify(error)

    assert classified.exit_code == status
    assert isinstance(classified, RunFailed) == (status == 1)
    assert isinstance(classified, OneLineError)  # both are one line on stderr
    assert "\n" not in classified.format_message()
    assert type(error).__name__ not in classified.format_message() or status == 1


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["train", "--rounds", "x"], "(see fedrec train --help)"),
        (["server", "start", "--port", "0"], "(see fedrec server start --help)"),
    ],
)
def test_a_usage_error_points_at_the_help_of_the_command_it_came_from(argv, hint, capsys):
    from fedrec.cli import main

    with pytest.raises(SystemExit) as stopped:
        main.main(argv, prog_name="fedrec")
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("fedrec: error: ") and line.endswith(hint), line


def test_a_server_start_stopped_by_a_signal_ends_its_line_first(tmp_path, capsys):
    """SIGTERM or Ctrl-C while the local Prefect server starts: its progress line is ended
    before the error line, not glued to it."""
    import os

    from fedrec.local_server import ServerState, free_port, process_start, wait_until_healthy

    class Stopped(BaseException):
        pass

    class Signalled:  # the server process, as the waiting loop polls it, when a signal lands
        def poll(self):
            raise Stopped

    state = ServerState(os.getpid(), free_port(), 0.0, process_start(os.getpid()))
    with pytest.raises(Stopped):
        wait_until_healthy(state, timeout=60, home=tmp_path, process=Signalled())
    assert capsys.readouterr().err.endswith(" ... stopped\n")


def test_ctrl_c_outside_a_runs_own_handling_is_one_line_and_a_json_error(monkeypatch, capsys):
    """A Ctrl-C that click turns into Abort (a second one while a stopped run's resume hint is
    looked up, say) printed click's 'Aborted!', and a --json reader's stdout stayed empty."""
    import json

    import fedrec.cli_models
    from fedrec.cli import main

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fedrec.cli_models, "_store_uri", stopped)
    with pytest.raises(SystemExit) as ended:
        main.main(["runs", "--json"], prog_name="fedrec")
    out, err = capsys.readouterr()
    assert ended.value.code == 1
    assert err.strip().splitlines()[-1] == (
        "fedrec: error: interrupted (fedrec runs lists a training run it stopped, and how to "
        "continue it)"
    )
    assert json.loads(out.strip().splitlines()[-1]) == {
        "error": "interrupted (fedrec runs lists a training run it stopped, and how to continue "
        "it)",
        "exit_status": 1,
    }
