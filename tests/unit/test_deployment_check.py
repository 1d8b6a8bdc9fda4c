"""``make deploy``'s check of deployments/prefect.yaml: a value no run could use is refused in
one line naming the file, the deployment and the parameter, before Prefect is reached."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fedrec.cli_errors import ServerDown, UserError
from fedrec.deployment_check import check_api, check_parameters, main, schema_refusal
from tests.health_server import health_server

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "deployments" / "prefect.yaml"


def _with(tmp_path: Path, **parameters) -> Path:
    spec = yaml.safe_load(SHIPPED.read_text())
    (nightly,) = [d for d in spec["deployments"] if d["name"] == "nightly"]
    nightly["parameters"] = {**nightly["parameters"], **parameters}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_shipped_deployment_file_passes():
    check_parameters(SHIPPED)


def test_a_deployment_file_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    path = tmp_path / "prefect.yaml"
    path.write_bytes(SHIPPED.read_bytes() + "# caf\xe9\n".encode("latin-1"))

    with pytest.raises(UserError) as refused:
        check_parameters(path)

    assert refused.value.message.startswith(f"{path}: cannot be read as YAML: ")
    assert "can't decode byte 0xe9" in refused.value.message
    assert "\n" not in refused.value.message


def test_the_shipped_defaults_leave_a_private_run_its_own_number_of_rounds():
    """A nightly run given --dp-epsilon by a trigger trains the private default's rounds: a
    deployment default of 10 made its noise three times larger at epsilon 1."""
    from fedrec.config import TrainingConfig
    from models.privacy.dp import PRIVATE_EXPLICIT

    spec = yaml.safe_load(SHIPPED.read_text())
    (nightly,) = [d for d in spec["deployments"] if d["name"] == "nightly"]
    defaults = nightly["parameters"]
    assert TrainingConfig(**defaults, dp_epsilon=1.0).rounds == PRIVATE_EXPLICIT.rounds
    assert TrainingConfig(**defaults).rounds == 10


def test_a_run_triggered_with_split_files_names_no_other_data(tmp_path):
    """The deployment leaves the data to the configuration, so a trigger that gives train and
    test files runs (and logs) those alone, not beside a default ``data: synthetic``."""
    from fedrec.config import TrainingConfig

    spec = yaml.safe_load(SHIPPED.read_text())
    (nightly,) = [d for d in spec["deployments"] if d["name"] == "nightly"]
    assert "data" not in nightly["parameters"]
    for name in ("train.csv", "test.csv"):
        (tmp_path / name).write_text("user_id,item_id,rating\n1,1,4\n")
    given = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
    params = TrainingConfig(**nightly["parameters"], **given).flat_params()
    assert params["train"] == given["train"] and "data" not in params


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"rounds": 0}, "rounds: Input should be greater than or equal to 1 (got 0)"),
        ({"roundz": 3}, "roundz: Extra inputs are not permitted; did you mean 'rounds'?"),
        ({"data": "nightly-export.csv"}, "data='nightly-export.csv': no such file or folder"),
    ],
)
def test_a_parameter_no_run_could_use_is_refused_naming_file_deployment_and_key(
    tmp_path, parameters, expected
):
    path = _with(tmp_path, **parameters)
    with pytest.raises(UserError) as refused:
        check_parameters(path)
    assert f"{path}: deployment 'nightly': parameters: " in refused.value.message
    assert expected in refused.value.message and "\n" not in refused.value.message


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        # the configuration reads "yes" as true; the server's schema takes JSON types as written
        ({"warm_start": "yes"}, "warm_start: 'yes' is not of type 'boolean'; the server refuses it"),
        ({"attack": "scale", "attack_fraction": 0.2, "algorithm": "fedavg"},
         "attack, attack_fraction: simulation parameters, for tests and benchmarks; the server "
         "refuses them"),
        ({"fault_probability": 0.1},
         "fault_probability: a simulation parameter, for tests and benchmarks; the server "
         "refuses it"),
    ],
)  # fmt: skip
def test_a_parameter_the_configuration_takes_but_the_server_would_refuse_is_refused_first(
    tmp_path, parameters, expected
):
    """``make deploy`` checked the file as ``fedrec train`` reads it, and Prefect then refused
    the deployment with a page of HTTP 422 (``warm_start: "yes"``), or the locked deployment
    refused its own defaults at every scheduled run."""
    path = _with(tmp_path, **parameters)
    with pytest.raises(UserError) as refused:
        check_parameters(path)
    assert refused.value.message == f"{path}: deployment 'nightly': parameters: {expected}"


def test_the_locked_schema_describes_each_parameter_and_leaves_out_the_simulations():
    from prefect.utilities.callables import parameter_schema

    from fedrec.config import TrainingConfig
    from fedrec.lock_parameters import locked_schema
    from flows.training import federated_training

    derived = parameter_schema(federated_training).model_dump_for_openapi()
    locked = locked_schema(derived)

    simulated = set(TrainingConfig.simulation_fields())
    assert simulated >= {"attack", "attack_fraction", "fault_probability", "fault_clients"}
    assert set(locked["properties"]) == set(derived["properties"]) - simulated
    assert locked["additionalProperties"] is False
    for name, spec in locked["properties"].items():
        assert spec["description"] == TrainingConfig.model_fields[name].description, name
    assert locked_schema(locked) == locked  # locking twice changes nothing


@pytest.mark.parametrize(
    ("parameters", "refused"),
    [
        ({"model_name": "bad name!"}, "'bad name!' does not match"),
        ({"train": "ratings.csv"}, "'test' is a dependency of 'train'"),
        ({"valid": "valid.csv"}, "'train' is a dependency of 'valid'"),
        ({"model_name": "shop-1.b"}, None),
        ({"model_name": None, "train": "a.csv", "test": "b.csv"}, None),
    ],
)
def test_the_locked_schema_refuses_at_creation_what_the_run_would_refuse_a_moment_later(
    parameters, refused
):
    """With Prefect's own validator, the one its server applies when a run is created: such a
    run used to be created, wait for the deployment's slot and fail in its first second."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    from fedrec.config import TrainingConfig
    from fedrec.lock_parameters import locked_schema
    from flows.training import federated_training

    schema = locked_schema(parameter_schema(federated_training).model_dump_for_openapi())
    if refused is None:
        validate(parameters, schema, raise_on_error=True, ignore_required=True)
        return
    with pytest.raises(ValidationError, match=refused):
        validate(parameters, schema, raise_on_error=True, ignore_required=True)
    with pytest.raises(ValueError, match=r"model_name|go together|needs --train"):  # as it does
        TrainingConfig(**parameters)


def test_a_data_file_that_exists_but_cannot_be_read_is_refused_with_its_row(tmp_path):
    data = tmp_path / "ratings.csv"
    data.write_text("user_id,item_id,rating\n1,2,4\n1,3,x\n")
    with pytest.raises(UserError) as refused:
        check_parameters(_with(tmp_path, data=str(data)))
    assert f"{data}, row 2 (line 3), column 'rating': value 'x'" in refused.value.message


@pytest.fixture
def no_api(monkeypatch):
    """PREFECT_API_URL at a loopback port nobody listens on, and check_api's retries instant."""
    import socket

    import fedrec.deployment_check as deployment_check

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    monkeypatch.setattr(deployment_check, "time", SimpleNamespace(sleep=lambda _: None))
    return f"http://127.0.0.1:{port}/api"


def test_an_api_that_does_not_answer_is_one_line_and_exit_status_1(no_api, capsys):
    """Not bad input (2): the same command may succeed once the server answers."""
    with pytest.raises(ServerDown, match=f"the Prefect API at {no_api}"):
        check_api()
    assert main(["--api"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("fedrec: error: ") and "`make server`" in line


def test_without_the_variable_the_profiles_api_is_checked(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with health_server() as server, temporary_settings(updates={PREFECT_API_URL: f"{server}/api"}):
        assert check_api() == f"{server}/api"


def test_every_simulation_parameter_at_once_is_named_as_such():
    from fedrec.config import TrainingConfig

    names = TrainingConfig.simulation_fields()
    assert len(names) > 1
    refusal = schema_refusal(dict.fromkeys(names, 1))
    assert refusal == (
        f"{', '.join(sorted(names))}: simulation parameters, for tests and benchmarks; the "
        "server refuses them"
    )


def test_the_makefiles_command_checks_each_file_it_is_given(tmp_path):
    bad = _with(tmp_path, rounds=0)
    command = [sys.executable, "-m", "fedrec.deployment_check"]
    good, refused = (
        subprocess.run([*command, str(path)], capture_output=True, text=True, cwd=REPO, timeout=300)
        for path in (SHIPPED, bad)
    )
    assert (good.returncode, good.stderr) == (0, "")
    assert refused.returncode == 2
    assert refused.stderr == (
        f"fedrec: error: invalid configuration: {bad}: deployment 'nightly': parameters: rounds: "
        "Input should be greater than or equal to 1 (got 0)\n"
    )


def test_the_locked_schema_keeps_a_description_it_was_given_and_the_required_it_allows():
    from fedrec.lock_parameters import locked_schema

    schema = {
        "properties": {"rounds": {"type": "integer", "description": "the deployment's own"},
                       "seed": {"type": "integer"}, "attack": {"type": "string"},
                       "unknown_to_the_configuration": {"type": "string"}},
        "required": ["rounds", "attack"],
    }  # fmt: skip
    locked = locked_schema(schema)

    assert locked["properties"]["rounds"]["description"] == "the deployment's own"
    assert locked["properties"]["seed"]["description"]  # the configuration's
    assert locked["properties"]["unknown_to_the_configuration"] == {"type": "string"}
    assert locked["required"] == ["rounds"]  # a simulation parameter is not required
    assert "required" not in locked_schema({"properties": {"seed": {"type": "integer"}}})


@pytest.mark.parametrize(
    ("deployment", "scheduled"),
    [
        (None, False),
        (SimpleNamespace(paused=False, schedules=[SimpleNamespace(active=True)]), True),
        (SimpleNamespace(paused=True, schedules=[SimpleNamespace(active=True)]), False),
        (SimpleNamespace(paused=False, schedules=[SimpleNamespace(active=False)]), False),
        (SimpleNamespace(paused=False, schedules=[]), False),
    ],
    ids=["none", "active", "paused", "inactive-schedule", "no-schedule"],
)
def test_a_deployment_is_scheduled_only_unpaused_with_an_active_schedule(deployment, scheduled):
    from fedrec.lock_parameters import _scheduled

    assert _scheduled(deployment) is scheduled


@pytest.fixture
def automations(monkeypatch):
    """The windows fedrec.silent_runs would create automations with (none is created)."""
    import fedrec.silent_runs as silent_runs

    made: list[float] = []
    monkeypatch.setattr(silent_runs, "crash_silent_runs",
                        lambda within_seconds: made.append(within_seconds) or "automation-id")  # fmt: skip
    return made


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["--within", "half an hour"],
            "--within 'half an hour': not a number of seconds of at least 60; allowed: seconds that "
            "exceed the workers' heartbeat period (PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180 s by "
            "default, 30 s at the least) several times over, e.g. 1800",
        ),
        (["--within", "0"], "--within '0': not a number of seconds of at least 60"),
        (["--within", "-90"], "--within '-90': not a number of seconds of at least 60"),
        (["--within", "59.9"], "--within '59.9': not a number of seconds of at least 60"),
        (["--within", "nan"], "--within 'nan': not a number"),
        (["--within=inf"], "--within 'inf': not a number"),
        (["--within"], "'--within': not understood; usage: python -m fedrec.silent_runs"),
        (["90"], "'90': not understood"),
        (["--within", "90", "--now"], "'--within 90 --now': not understood"),
    ],
)
def test_a_silent_runs_window_that_is_no_positive_number_is_one_line_and_creates_nothing(
    argv, said, no_api, automations, capsys
):
    from fedrec.silent_runs import main as silent_main

    assert silent_main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"fedrec: error: {said}"), line
    assert automations == []


def test_the_silent_runs_window_is_checked_before_the_server_and_then_the_server(
    no_api, automations, capsys
):
    from fedrec.silent_runs import WITHIN_SECONDS
    from fedrec.silent_runs import main as silent_main

    assert silent_main(["--within", "90"]) == 1  # a good window, no server: a failure's status
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"fedrec: error: the Prefect API at {no_api} (PREFECT_API_URL) does not answer: start it "
        "with `make server` (fedrec's local server), or set PREFECT_API_URL to a running one"
    )
    assert automations == []
    assert silent_main(["--help"]) == 0  # help needs no server
    said = capsys.readouterr().out
    assert said.startswith("usage: python -m fedrec.silent_runs [--within SECONDS]\n")
    assert f"for SECONDS ({WITHIN_SECONDS:g} by default) becomes Crashed" in said
    assert automations == []


@pytest.mark.parametrize("within", [59.9, 0.0, -90.0, math.nan, math.inf])
def test_a_python_caller_gets_the_same_floor_before_any_call_to_the_server(within, no_api):
    from fedrec.silent_runs import crash_silent_runs

    # no_api: a server call would be a ServerDown-like httpx error, not this ValueError
    with pytest.raises(ValueError, match=r"must be finite and at least 60 s"):
        crash_silent_runs(within_seconds=within)


def test_the_silent_runs_window_reaches_the_automation_in_seconds(monkeypatch, automations, capsys):
    from fedrec.silent_runs import main as silent_main

    with health_server() as server:
        monkeypatch.setenv("PREFECT_API_URL", f"{server}/api")
        for argv in ([], ["--within", "90"], ["--within=2.5e3"], ["--within", "60"]):
            assert silent_main(argv) == 0
    assert automations == [1800.0, 90.0, 2500.0, 60.0]
    said = capsys.readouterr().out.splitlines()
    assert said[1] == (
        "automation 'fedrec: crash silent training runs' (automation-id): federated-training "
        "runs silent for 90 s become Crashed"
    )


@pytest.mark.parametrize(
    ("argv", "said", "status"),
    [
        (["a/b", "c/d"], "'a/b c/d': not understood; usage: python -m fedrec.lock_parameters", 2),
        (["--all"], "'--all': not understood", 2),
        ([], "the Prefect API at", 1),
        (["federated-training/nightly"], "the Prefect API at", 1),
    ],
)
def test_lock_parameters_refuses_what_it_cannot_use_in_one_line(argv, said, status, no_api, capsys):
    from fedrec.lock_parameters import main as lock_main

    assert lock_main(argv) == status
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"fedrec: error: {said}"), line


def test_lock_parameters_help_needs_no_server(no_api, capsys):
    from fedrec.lock_parameters import main as lock_main

    assert lock_main(["-h"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(
        "usage: python -m fedrec.lock_parameters [DEPLOYMENT]   (default federated-training/nightly)"
    )


def test_make_deploys_last_steps_read_their_arguments_as_modules(no_api):
    """``python -m fedrec.silent_runs`` and ``python -m fedrec.lock_parameters``, as make
    deploy runs them: each reads every argument it was given."""
    import os

    for module, argv, said in (
        ("fedrec.silent_runs", ["--within", "10"], "--within '10': not a number of seconds"),
        ("fedrec.lock_parameters", ["a/b", "c/d"], "'a/b c/d': not understood"),
    ):
        done = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                              text=True, timeout=120, env=os.environ)  # fmt: skip
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"fedrec: error: {said}"), line
