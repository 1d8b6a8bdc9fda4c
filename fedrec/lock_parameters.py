"""Make a deployment's parameter schema refuse unknown parameter names and simulations.

Prefect derives a deployment's parameter schema from the flow's signature and, with
``enforce_parameter_schema``, refuses a run whose parameters break it, with an HTTP 409 naming the
field. The derived schema allows names it does not list, though: such a run is created, and then
fails on the worker with a signature error. This sets ``additionalProperties: false`` on the
deployment's schema, so an unknown name is refused at creation like a value out of range.
It pins the MLflow store the deployment's runs report to: the one in force where it runs
(``MLFLOW_TRACKING_URI``, else ``FEDREC_HOME``'s SQLite), set in the deployment's environment, so
that a worker started without the variable does not register its models in a store of its own.
A URI holding credentials is not written to Prefect; the worker's own variable must name it.
It also warns when ``fedrec serve``'s deployment is scheduled on the same server: each
deployment queues only its own runs, so the two nightly runs would train at once.
``make deploy`` runs it after ``prefect deploy``::

    uv run python -m fedrec.lock_parameters [DEPLOYMENT]   # default federated-training/nightly
"""

from __future__ import annotations

import sys
import time
from typing import Any

DEPLOYMENT = "federated-training/nightly"
SERVED = "federated-training/nightly-serve"  # fedrec serve's deployment


def _deployment(name: str) -> Any:
    """Deployment ``name`` on the current Prefect API, or None."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def _scheduled(deployment: Any) -> bool:
    return (
        deployment is not None
        and not deployment.paused
        and any(schedule.active for schedule in deployment.schedules)
    )


def schedule_active(name: str) -> bool:
    """Whether deployment ``name`` exists on the current Prefect API, not paused, with a
    schedule that starts runs."""
    return _scheduled(_deployment(name))


def last_written(name: str) -> Any:
    """When deployment ``name`` was last written (None: there is none), to tell a later write."""
    deployment = _deployment(name)
    return None if deployment is None else deployment.updated


def locked_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (a deployment's parameter schema, derived from the flow's signature) with
    ``additionalProperties: false``, without the parameters that simulate attacks and faults
    (for tests and benchmarks: a run that poisons its own model has no place on a production
    schedule, so the server refuses them like an unknown name), and with each parameter's
    description from the configuration, which the Prefect UI's run form shows. What the
    configuration checks that JSON Schema can say is said too, so that the server refuses it at
    creation rather than the run a moment later, in the queue's slot: a model name's form, and
    files that go together (``train`` with ``test``, ``valid`` with both)."""
    from fedrec.config import MODEL_NAME, TrainingConfig

    schema = dict(schema)
    dropped = set(TrainingConfig.simulation_fields())
    properties = {}
    for key, spec in (schema.get("properties") or {}).items():
        if key in dropped:
            continue
        field = TrainingConfig.model_fields.get(key)
        if field is not None and field.description and not spec.get("description"):
            spec = dict(spec) | {"description": field.description}
        if key == "model_name":
            spec = dict(spec) | {"pattern": f"^{MODEL_NAME.pattern}$"}
        properties[key] = spec
    schema["properties"] = properties
    schema["dependentRequired"] = {"train": ["test"], "test": ["train"], "valid": ["train", "test"]}
    if "required" in schema:
        schema["required"] = [key for key in schema["required"] if key not in dropped]
    schema["additionalProperties"] = False
    return schema


def lock_parameters(name: str = DEPLOYMENT) -> list[str]:
    """Lock deployment ``name``'s parameter schema (on the Prefect API of
    ``PREFECT_API_URL``) with :func:`locked_schema`; returns the parameter names it allows."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        schema = locked_schema(deployment.parameter_openapi_schema or {})
        client.update_deployment(
            deployment.id,
            DeploymentUpdate(parameter_openapi_schema=schema, enforce_parameter_schema=True),
        )
    return sorted(schema.get("properties", {}))


def pin_store(name: str = DEPLOYMENT) -> str | None:
    """Set ``MLFLOW_TRACKING_URI`` in deployment ``name``'s environment (its job variables) to
    the store in force here, a SQLite file by its absolute path. Returns the URI pinned, or None
    for one holding credentials, which is not written to Prefect."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    from fedrec.model_store import TRACKING_URI_ENV, resolve_tracking_uri, sqlite_path
    from models.privacy.redaction import redact_uri

    uri = resolve_tracking_uri(create=False)
    if redact_uri(uri) != uri:
        return None
    path = sqlite_path(uri)
    if path is not None:  # the worker runs flows in folders of its own
        uri = f"sqlite:///{path.resolve()}"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        variables = dict(deployment.job_variables or {})
        variables["env"] = dict(variables.get("env") or {}) | {TRACKING_URI_ENV: uri}
        client.update_deployment(deployment.id, DeploymentUpdate(job_variables=variables))
    return uri


def lock_when_scheduled(name: str, since: Any, timeout: float = 120.0) -> list[str] | None:
    """Lock deployment ``name``'s parameters once it is written again after ``since`` (its
    :func:`last_written` before serving started) with an active schedule: ``flow.serve`` writes
    the derived schema as it starts, over an earlier lock (a process killed without pausing its
    schedule leaves it active). None if that did not happen within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deployment = _deployment(name)
        if _scheduled(deployment) and deployment.updated != since:
            return lock_parameters(name)
        time.sleep(0.5)
    return None


USAGE = f"usage: python -m fedrec.lock_parameters [DEPLOYMENT]   (default {DEPLOYMENT})"


def main(argv: list[str]) -> int:
    from fedrec.cli_errors import ServerDown, UserError
    from fedrec.deployment_check import check_api

    if argv in (["-h"], ["--help"]):
        print(
            f"{USAGE}\n\nOn the Prefect server of PREFECT_API_URL: make DEPLOYMENT's parameter "
            "schema refuse unknown names and the simulation's parameters, pin the MLflow store "
            "its runs report to, and warn when fedrec serve's deployment is scheduled too."
        )
        return 0
    name = argv[0] if argv else DEPLOYMENT
    try:
        if len(argv) > 1 or name.startswith("-"):
            raise UserError(f"{' '.join(argv)!r}: not understood; {USAGE}")
        url = check_api()
        if _deployment(name) is None:
            raise UserError(
                f"deployment {name!r} is not on the Prefect server at {url}: create it first "
                "(`make deploy` runs prefect deploy, then this)"
            )
    except (UserError, ServerDown) as err:
        err.show()
        return err.exit_code
    allowed = lock_parameters(name)
    print(
        f"{name}: refuses parameters other than its {len(allowed)} own (not the simulation's "
        "attack and fault parameters, which are for tests and benchmarks)"
    )
    pinned = pin_store(name)
    if pinned is None:
        print(
            f"warning: {name}: MLFLOW_TRACKING_URI holds credentials, so it is not written to "
            "Prefect: every worker needs it set, or its runs register in the worker's own "
            "FEDREC_HOME store",
            file=sys.stderr,
        )
    else:
        print(
            f"{name}: its runs report to MLflow at {pinned} (whatever the worker's environment; "
            "set MLFLOW_TRACKING_URI and deploy again to change it)"
        )
    if name == DEPLOYMENT and schedule_active(SERVED):
        print(
            f"warning: '{SERVED}' (fedrec serve) is scheduled on this server too: stop that "
            "process, or both nightly runs train at once and register a version each",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
