"""Mark a training flow run whose process vanished as Crashed, on the Prefect server's own.

A worker killed together with the flow's process (a machine that stopped, an OOM kill of the
whole group) leaves nothing to report the run's end: Prefect shows it Running for good, and the
deployment's one concurrency slot stays taken until its lease runs out. A run started by a
worker sends a heartbeat event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (180 by
default); this creates the Prefect automation that marks a ``federated-training`` run Crashed
when three heartbeats in a row are missing (Prefect's documented way to find such runs). The
next training run then finishes what the lost one left (its MLflow run marked KILLED, its
version's promotion record). ``make deploy`` runs it after ``prefect deploy``::

    uv run python -m fedrec.silent_runs
"""

from __future__ import annotations

import sys

AUTOMATION = "fedrec: crash silent training runs"
FLOW = "federated-training"
MISSED_HEARTBEATS = 3


def crash_silent_runs(flow_name: str = FLOW, within_seconds: float | None = None) -> str:
    """Create (or replace) the automation on the Prefect API of ``PREFECT_API_URL``: a flow run
    of ``flow_name`` that sent a heartbeat and then nothing (no heartbeat, no final state) for
    ``within_seconds`` (default: three heartbeat periods) becomes Crashed. Returns its id."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    period = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() or 180
    within = within_seconds if within_seconds is not None else MISSED_HEARTBEATS * period
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


def main(argv: list[str]) -> int:
    automation = crash_silent_runs(argv[0] if argv else FLOW)
    print(f"automation {AUTOMATION!r} ({automation}): silent {FLOW} runs become Crashed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
