"""Mark a training flow run whose process vanished as Crashed, on the Prefect server's own.

A worker killed together with the flow's process (a machine that stopped, an OOM kill of the
whole group) leaves nothing to report the run's end: Prefect shows it Running for good, and the
deployment's one concurrency slot stays taken until its lease runs out. A run started by a
worker sends a heartbeat event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (180 by
default); this creates the Prefect automation that marks a ``federated-training`` run Crashed
when no heartbeat came for 30 minutes (Prefect's documented way to find such runs). The
window is fixed here, not read from a worker's settings, which this process cannot see, and
it is long on purpose: a healthy run marked Crashed loses its concurrency slot, so a second
run could write to the registry beside it. It suits heartbeat periods up to 10 minutes (three
missed in a row). The next training run then finishes what the lost one left (its MLflow run
marked KILLED, its version's promotion record). ``make deploy`` runs it after ``prefect
deploy``::

    uv run python -m fedrec.silent_runs [--within SECONDS]
"""

from __future__ import annotations

import math
import sys

AUTOMATION = "fedrec: crash silent training runs"
FLOW = "federated-training"
WITHIN_SECONDS = 1800.0
# two heartbeats at the shortest period Prefect allows (30 s): a shorter window crashes
# healthy runs between two of their heartbeats
SHORTEST_WITHIN = 60.0


def _long_enough(seconds: float) -> bool:
    return math.isfinite(seconds) and seconds >= SHORTEST_WITHIN


def crash_silent_runs(flow_name: str = FLOW, within_seconds: float = WITHIN_SECONDS) -> str:
    """Create (or replace) the automation on the Prefect API of ``PREFECT_API_URL``: a flow run
    of ``flow_name`` that sent a heartbeat and then nothing (no heartbeat, no final state) for
    ``within_seconds`` becomes Crashed. It must exceed the workers' heartbeat period
    (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, 180 s by default) several times over; a window
    under ``SHORTEST_WITHIN`` (or not finite) is a :class:`ValueError`, raised before any call
    to the server. Returns its id."""
    if not _long_enough(within_seconds):
        raise ValueError(
            f"within_seconds={within_seconds!r}: a silent-runs window must be finite and at "
            f"least {SHORTEST_WITHIN:g} s (two heartbeats at Prefect's shortest period)"
        )
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    within = within_seconds
    ended = ("Completed", "Failed", "Cancelled", "Crashed")
    automation = Automation(
        name=AUTOMATION,
        description=f"{flow_name} runs that stopped sending heartbeats: their process is gone",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in ended)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "flow", "prefect.resource.name": flow_name}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within:g} s: its process is gone (a worker killed "
                "with it, a machine that stopped); the next training run closes its MLflow run "
                "and finishes its version's record, and fedrec workspaces lists it for --resume",
            )
        ],
    )
    while True:  # one automation of that name, however often this runs
        try:
            Automation.read(name=AUTOMATION).delete()
        except ValueError:  # Prefect's way to say there is none (left)
            break
    return str(automation.create().id)


USAGE = "usage: python -m fedrec.silent_runs [--within SECONDS]"


def _within(text: str) -> float:
    """``--within``'s seconds, or a :class:`UserError` naming the value and what is allowed."""
    from fedrec.cli_errors import UserError

    try:
        within = float(text)
    except ValueError:
        within = math.nan
    if not _long_enough(within):
        raise UserError(
            f"--within {text!r}: not a number of seconds of at least {SHORTEST_WITHIN:g}; "
            "allowed: seconds that exceed the workers' heartbeat period "
            "(PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180 s by default, 30 s at the least) several "
            f"times over, e.g. {WITHIN_SECONDS:g}"
        )
    return within


def main(argv: list[str]) -> int:
    from fedrec.cli_errors import ServerDown, UserError

    if argv in (["-h"], ["--help"]):
        print(
            f"{USAGE}\n\nCreate (or replace) the Prefect automation {AUTOMATION!r} on the server "
            f"of PREFECT_API_URL: a {FLOW} flow run that sent no heartbeat and no final state "
            f"for SECONDS ({WITHIN_SECONDS:g} by default) becomes Crashed, which frees its "
            "deployment's concurrency slot."
        )
        return 0
    within = WITHIN_SECONDS
    try:
        if len(argv) == 2 and argv[0] == "--within":
            within = _within(argv[1])
        elif len(argv) == 1 and argv[0].startswith("--within="):
            within = _within(argv[0].partition("=")[2])
        elif argv:
            raise UserError(f"{' '.join(argv)!r}: not understood; {USAGE}")
        from fedrec.deployment_check import check_api

        check_api()
    except (UserError, ServerDown) as err:
        err.show()
        return err.exit_code
    automation = crash_silent_runs(within_seconds=within)
    print(
        f"automation {AUTOMATION!r} ({automation}): {FLOW} runs silent for {within:g} s "
        "become Crashed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
