"""The reference round loop: any :class:`~models.federation.family.Family` in this process,
without orchestration. The Prefect flow (``flows/rounds.py``) runs the same family functions as
tasks, with quorum, deadlines and evaluation one round late; tests compare the two."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from models.client import ClientData
from models.federation.evaluation import summarize_splits
from models.federation.family import Family, Phase, SecureFamily, secure_phase
from models.federation.sampling import round_rng, sample_clients
from models.metrics import add_sums
from models.protocol import ClientUpdate

# The per-client stream of a round in which every client answers once (not a step).
EVERYONE_ROUND = 0


def round_metrics(updates: Sequence[ClientUpdate], seconds: float) -> dict[str, float]:
    """What a round's uploads say: clients, bytes, wall time, the training error if reported."""
    train = add_sums(u.metrics for u in updates)
    metrics = {
        "system/clients": float(len(updates)),
        "system/bytes_uploaded": float(sum(u.nbytes() for u in updates)),
        "system/round_seconds": seconds,
    }
    if train.get("train_n", 0.0) > 0 and "train_sse" in train:
        metrics["train/rmse"] = float(np.sqrt(train["train_sse"] / train["train_n"]))
    return metrics


def run_family(
    family: Family,
    clients: Sequence[ClientData],
    n_items: int,
    *,
    rounds: int,
    seed: int = 0,
    client_fraction: float = 1.0,
    eval_splits: Sequence[str] = ("valid",),
    start_from: Callable[[Any], Any] | None = None,
    secure_sum: Callable[[dict[int, np.ndarray]], np.ndarray] | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_phase: Callable[[Phase, Any], None] | None = None,
) -> tuple[Any, list[dict[str, float]]]:
    """Train ``family`` through its phases in this process.

    Steps are the sampled rounds, numbered across phases from 1; step ``s`` samples clients and
    seeds each client's stream with ``s``. After each step every client evaluates the new state
    on ``eval_splits`` (none: no evaluation). ``start_from`` maps the initial state (e.g. a warm
    start); with ``secure_sum`` (a :class:`SecureFamily` only) the server sees only the sum of the
    clients' dense update vectors in every phase :func:`secure_phase` covers;
    ``on_phase(phase, state)`` runs when a phase ends.

    Returns the final state and one metrics dict per step (``step``, ``system/clients``,
    ``system/bytes_uploaded``, ``system/round_seconds``, ``train/rmse`` where reported, and the evaluation).
    """
    if secure_sum is not None and not isinstance(family, SecureFamily):
        raise ValueError(f"the {family.name} family has no secure-aggregation encoding")

    def rng(round_: int, client_id: int) -> np.random.Generator:
        return round_rng(seed, round_, client_id, private=family.private)

    state = family.initial_state(n_items, seed)
    if start_from is not None:
        state = start_from(state)
    history: list[dict[str, float]] = []
    step = 0
    for phase in family.phases(rounds):
        for _ in range(phase.rounds):
            started = time.perf_counter()
            if phase.everyone:
                chosen, stream = list(clients), EVERYONE_ROUND
            else:
                step += 1
                chosen = [
                    clients[i] for i in sample_clients(len(clients), client_fraction, seed, step)
                ]
                stream = step
            updates = [
                family.client_round(c, state, phase.name, rng(stream, c.client_id), ())[0]
                for c in chosen
            ]
            if secure_sum is not None and secure_phase(family, phase):
                assert isinstance(family, SecureFamily)
                dense = {u.client_id: family.to_dense(u, n_items) for u in updates}
                summed = [family.from_dense_sum(secure_sum(dense), n_items)]
                state = family.server_update(state, summed, phase.name)
            else:
                state = family.server_update(state, updates, phase.name)
            if phase.everyone:
                continue
            metrics = {"step": float(step)} | round_metrics(updates, time.perf_counter() - started)
            if eval_splits:
                parts = [family.evaluate(c, state, eval_splits) for c in clients]
                metrics |= summarize_splits(parts, family.top_k, n_items)
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
        if on_phase is not None:
            on_phase(phase, state)
    return state, history
