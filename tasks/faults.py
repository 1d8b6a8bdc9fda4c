"""Fault injection for tests and benchmarks: client tasks that fail, or answer late, on purpose.

A plan is part of the run's configuration; every draw is seeded by (run seed, round, client,
attempt), so a run is reproducible and a retried task can succeed where its first attempt failed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from prefect.runtime import task_run


class InjectedFault(RuntimeError):
    """A failure the fault-injection plan asked for."""


@dataclass(frozen=True)
class FaultPlan:
    """``probability`` that a client task fails, an exponential delay of mean ``delay`` seconds
    before it answers, and ``clients`` whose tasks always fail."""

    probability: float = 0.0
    delay: float = 0.0
    clients: tuple[int, ...] = ()
    seed: int = 0
    round_attempt: int = 0  # a round that missed its quorum asks again with a fresh draw

    def for_attempt(self, attempt: int) -> FaultPlan:
        return replace(self, round_attempt=attempt)

    @property
    def active(self) -> bool:
        return self.probability > 0 or self.delay > 0 or bool(self.clients)

    def inject(self, client_id: int, round_: int) -> None:
        """Sleep and/or raise as planned for this client, round and attempt."""
        if not self.active:
            return
        attempt = int(task_run.run_count or 1)
        rng = np.random.default_rng(
            [self.seed, round_, client_id, self.round_attempt, attempt, 31_337]
        )
        if self.delay > 0:
            time.sleep(float(rng.exponential(self.delay)))
        if client_id in self.clients or rng.random() < self.probability:
            raise InjectedFault(
                f"injected fault: client-{client_id} round-{round_} attempt {attempt}"
            )
