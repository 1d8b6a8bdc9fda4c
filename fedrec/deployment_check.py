"""What ``make deploy`` and ``make worker`` check before Prefect's own commands run, so that a
mistake is one line and not a traceback, or a failed run at 02:00:

    uv run python -m fedrec.deployment_check --api                 # a Prefect server answers
    uv run python -m fedrec.deployment_check deployments/prefect.yaml   # and its parameters hold

A deployment of the training flow has its parameters checked as ``fedrec train`` checks its
flags and config file (``fedrec serve`` checks the same): a value the configuration refuses, a
data file that does not exist or cannot be read; and against the schema the Prefect server
enforces once ``make deploy`` has locked it (JSON types as written, no simulation parameter).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from fedrec.cli_errors import ServerDown, UserError

TRAINING_ENTRYPOINT = "flows/training.py:federated_training"


def check_api() -> str:
    """The Prefect API URL that the deployment commands use, once its server answers."""
    from fedrec.local_server import is_healthy

    configured = os.environ.get("PREFECT_API_URL")  # the Makefile sets it
    if configured is None:  # else Prefect's profile (an import of seconds)
        from prefect.settings import get_current_settings

        configured = get_current_settings().api.url
    if not configured:
        raise UserError(
            "no Prefect server is set (PREFECT_API_URL): start fedrec's local one with "
            "`make server`, or set PREFECT_API_URL to yours"
        )
    url = str(configured).rstrip("/")
    for _ in range(3):  # a busy SQLite-backed server answers 503 for a while
        if is_healthy(url, timeout=5):
            return url
        time.sleep(1)
    raise ServerDown(
        f"the Prefect API at {url} (PREFECT_API_URL) does not answer: start it with "
        "`make server` (fedrec's local server), or set PREFECT_API_URL to a running one"
    )


def schema_refusal(parameters: dict[str, Any]) -> str | None:
    """Why the Prefect server would refuse ``parameters`` against the training deployment's
    locked schema (JSON types as written: ``"yes"`` is no boolean, though the configuration
    would read it as one; no simulation parameter), or None. Prefect's own validator, the one
    its server applies, gives the first error."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    from fedrec.config import TrainingConfig
    from fedrec.lock_parameters import locked_schema
    from flows.training import federated_training

    schema = locked_schema(parameter_schema(federated_training).model_dump_for_openapi())
    errors = validate(parameters, schema, raise_on_error=False, ignore_required=True)
    if not errors:
        return None
    error = errors[0]
    if error.validator == "additionalProperties":
        names = sorted(set(parameters) - set(schema["properties"]))
        one = len(names) == 1
        if set(names) <= set(TrainingConfig.simulation_fields()):
            what = "a simulation parameter" if one else "simulation parameters"
            what += ", for tests and benchmarks"
        else:
            what = "not a parameter" if one else "not parameters"
        return f"{', '.join(names)}: {what}; the server refuses {'it' if one else 'them'}"
    field = f"{error.path[0]}: " if error.path else ""
    return f"{field}{error.message}; the server refuses it"


def check_parameters(path: Path) -> None:
    """Check the parameters of every deployment of the training flow in ``path``: raises
    ``UserError`` naming the file, the deployment and the parameter of a value no run could
    use, or the data file's own problem (file, row, column, value)."""
    import yaml
    from pydantic import ValidationError

    from fedrec.cli import check_inputs
    from fedrec.cli_errors import one_line_config_error
    from fedrec.config import TrainingConfig

    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:  # a latin-1 file too
        raise UserError(f"{path}: cannot be read as YAML: {err}".splitlines()[0]) from err
    for deployment in (spec or {}).get("deployments") or []:
        if deployment.get("entrypoint") != TRAINING_ENTRYPOINT:
            continue
        where = f"{path}: deployment {deployment.get('name')!r}: parameters"
        parameters: dict[str, Any] = dict(deployment.get("parameters") or {})
        try:
            check_inputs(parameters)
        except UserError as err:
            raise UserError(f"{where}: {err.message}") from err
        try:
            TrainingConfig(**parameters)
        except ValidationError as err:
            line = one_line_config_error(
                err, dict.fromkeys(parameters, where), known=TrainingConfig.model_fields
            )
            raise UserError(f"invalid configuration: {line}") from err
        refused = schema_refusal(parameters)  # what the configuration reads, the server may not
        if refused:
            raise UserError(f"{where}: {refused}")


def main(argv: list[str]) -> int:
    try:
        for item in argv:
            if item == "--api":
                check_api()
            else:
                check_parameters(Path(item))
    except (UserError, ServerDown) as err:
        err.show()
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
