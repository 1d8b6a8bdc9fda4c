"""Which failures are the user's to fix (exit status 2) and which are failures of a run (1)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
)

from fedrec.cli_errors import (
    NoInputTracebacks,
    OneLineError,
    RunFailed,
    UserError,
    classify,
    friendly_errors,
    hide_input_tracebacks,
    one_line_config_error,
)
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


def test_a_usage_error_of_fedrec_itself_points_at_fedrecs_help(capsys):
    from fedrec.cli import main

    with pytest.raises(SystemExit) as stopped:
        main.main(["no-such-command"], prog_name="fedrec")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith("(see fedrec --help)")


def test_an_errors_details_are_kept_for_the_json_error():
    assert OneLineError("m", {"run_id": "abc"}).details == {"run_id": "abc"}
    assert OneLineError("m").details == {}


@pytest.mark.parametrize(
    ("error", "status", "line"),
    [
        (MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE), 2, "MLflow: bad value"),
        (MlflowException("boom\nstack", error_code=INTERNAL_ERROR), 1, "MLflow: boom"),
        (
            RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server"),
            1,
            "Prefect's temporary API server did not start in time (a busy machine?): run "
            "`fedrec server start` once",
        ),
    ],
)
def test_mlflow_and_prefect_errors_are_classed_by_what_they_say(error, status, line):
    classified = classify(error)
    assert classified.exit_code == status
    assert classified.format_message().startswith(line)


def test_errors_are_one_line_unless_debug_is_asked_for():
    def takes_debug(*, debug):
        raise RuntimeError(f"debug={debug}\nsecond line")

    def plain():
        raise DataValidationError("bad row", file="r.csv", row=3)

    with pytest.raises(RunFailed, match=r"^RuntimeError: debug=False$"):
        friendly_errors(takes_debug)()
    with pytest.raises(RuntimeError, match="debug=True"):
        friendly_errors(takes_debug)(debug=True)
    with pytest.raises(UserError, match=r"^r\.csv, row 3: bad row$"):
        friendly_errors(plain)(debug=False)


class _ValidationModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    rounds: int = 1
    rating_scale: tuple[float, float] = (1.0, 5.0)

    @pydantic.model_validator(mode="after")
    def _not_99(self):
        if self.rounds == 99:
            raise ValueError("rounds and rating_scale disagree")
        return self


def _config_error(**values) -> pydantic.ValidationError:
    with pytest.raises(pydantic.ValidationError) as caught:
        _ValidationModel(**values)
    return caught.value


def test_a_configuration_error_names_each_key_as_flag_or_file():
    err = _config_error(rounds=-1.5, rating_scale=(1.0, "x"), rounsd=3)
    line = one_line_config_error(err, known=["rounds", "rating_scale"])
    assert line == (
        "rounds (--rounds): Input should be a valid integer, got a number with a fractional part "
        "(got -1.5); rating_scale.1 (--rating-scale): Input should be a valid number, unable to "
        "parse string as a number (got 'x'); rounsd: Extra inputs are not permitted; did you mean "
        "'rounds'? (got 3)"
    )
    named = one_line_config_error(err, files={"rounds": "run.yaml"})
    assert named.startswith("run.yaml: rounds: Input should be a valid integer")
    assert "rating_scale.1 (--rating-scale):" in named
    # an error of the whole configuration names no key
    assert one_line_config_error(_config_error(rounds=99)) == "rounds and rating_scale disagree"


def test_input_errors_lose_their_traceback_in_the_flow_logs_and_others_keep_it(monkeypatch):
    for name in ("prefect.task_runs", "prefect.flow_runs"):  # restored after the test
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "filters", list(logger.filters))
    hide_input_tracebacks()
    hide_input_tracebacks()
    logger = logging.getLogger("prefect.flow_runs")
    assert sum(isinstance(f, NoInputTracebacks) for f in logger.filters) == 1

    def record(err):
        info = None if err is None else (type(err), err, None)
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, "", 0, "m", (), info)

    bad_input, failure, plain = (record(DataValidationError("bad")), record(RuntimeError("x")),
                                 record(None))  # fmt: skip
    for r in (bad_input, failure, plain):
        assert NoInputTracebacks().filter(r)
    assert bad_input.exc_info is None
    assert failure.exc_info is not None and failure.exc_info[0] is RuntimeError
    assert plain.exc_info is None


def test_a_bad_configuration_is_the_users_to_fix():
    classified = classify(_config_error(rounds="many"))
    assert isinstance(classified, UserError)
    assert classified.format_message() == (
        "invalid configuration: rounds (--rounds): Input should be a valid integer, unable to "
        "parse string as an integer (got 'many')"
    )


def test_the_command_lines_own_arguments_are_read_and_a_bare_fedrec_is_its_help(
    monkeypatch, capsys
):
    from fedrec.cli import main

    monkeypatch.setattr("sys.argv", ["fedrec", "no-such-command"])
    with pytest.raises(SystemExit) as stopped:
        main.main(prog_name="fedrec")
    assert stopped.value.code == 2
    assert "No such command 'no-such-command'" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main.main(["no-such-command", "--json"], prog_name="fedrec")
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": err.strip().removeprefix("fedrec: error: "),
                               "exit_status": 2}  # fmt: skip

    with pytest.raises(SystemExit) as bare:
        main.main([], prog_name="fedrec")
    assert bare.value.code == 0
    assert capsys.readouterr().out.startswith("Usage: fedrec ")


def test_a_reader_that_went_away_ends_the_command_quietly_with_status_141():
    code = (
        "from fedrec.cli_errors import friendly_errors\n"
        "def write():\n"
        "    raise BrokenPipeError\n"
        "friendly_errors(write)()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)  # fmt: skip
    assert (done.returncode, done.stderr) == (141, "")
