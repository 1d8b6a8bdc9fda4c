"""A foreground `fedrec train` has no heartbeat: a run whose process died would show as running
forever. The next command marks it crashed, and only it: not a run whose process lives, nor a
worker's run (which records its process in another form and has its own heartbeat)."""

from __future__ import annotations

import os
import socket
import subprocess

from fedrec.local_server import process_start


def _running_run(client, flow_name: str, owner: str | None):
    from prefect import flow
    from prefect.states import Running

    run = client.create_flow_run(flow(lambda: None, name=flow_name), state=Running())
    if owner is not None:
        client.update_flow_run(run.id, infrastructure_pid=owner)
    return run.id


def test_only_runs_whose_foreground_process_is_gone_are_marked_crashed(prefect_server):
    from prefect.client.orchestration import get_client

    from fedrec.runtime import crash_lost_runs

    host = socket.gethostname()
    victim = subprocess.Popen(["sleep", "60"])
    started = process_start(victim.pid)
    victim.kill()
    victim.wait()
    with get_client(sync_client=True) as client:
        dead = _running_run(client, "lost-runs", f"fedrec-foreground:{host}:{victim.pid}:{started}")
        alive = _running_run(
            client,
            "lost-runs",
            f"fedrec-foreground:{host}:{os.getpid()}:{process_start(os.getpid())}",
        )
        # the same PID reused by a later process is still a dead owner
        reused = _running_run(client, "lost-runs", f"fedrec-foreground:{host}:{os.getpid()}:1")
        worker = _running_run(client, "lost-runs", f"{host}:{victim.pid}")
        elsewhere = _running_run(
            client, "lost-runs", f"fedrec-foreground:other-host:{victim.pid}:{started}"
        )
        unowned = _running_run(client, "lost-runs", None)
        other_flow = _running_run(
            client, "another-flow", f"fedrec-foreground:{host}:{victim.pid}:{started}"
        )

        lost = crash_lost_runs("lost-runs")

        states = {
            name: client.read_flow_run(run_id).state
            for name, run_id in [("dead", dead), ("alive", alive), ("reused", reused), ("worker", worker),
                                 ("elsewhere", elsewhere), ("unowned", unowned), ("other_flow", other_flow)]
        }  # fmt: skip
    assert {n for n, s in states.items() if s.type.value == "CRASHED"} == {"dead", "reused"}
    assert {n for n, s in states.items() if s.type.value == "RUNNING"} == {
        "alive", "worker", "elsewhere", "unowned", "other_flow"
    }  # fmt: skip
    assert len(lost) == 2
    assert "--resume" in states["dead"].message and str(victim.pid) in states["dead"].message
    with get_client(sync_client=True) as client:  # marked once: a second sweep finds nothing
        assert crash_lost_runs("lost-runs") == []
