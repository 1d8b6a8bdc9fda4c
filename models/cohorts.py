"""Cross-device simulation: every user is a client, and one task runs a whole cohort of them.

A Prefect task costs milliseconds, so one task per device cannot scale to thousands of devices per
round. A cohort is a partition holding many users; its task computes each sampled user's update
from that user's rows alone, all at once: the ALS statistics a client sends are sums over its
users, so the cohort's vectorised pass yields exactly the sum of its users' individual updates
(``tests/unit/test_cohorts.py`` checks cohort size 1 against 500). The server only ever sees that
sum, as it would behind secure aggregation of the devices' updates.

Sampling is Poisson, per device: each user takes part in a round when its own coin, seeded by
(seed, round, user id), comes up, so who trains does not depend on how users are grouped into
cohorts, and the DP accountant's Poisson sampling assumption holds exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from models.client import SPLIT, TRAIN, ClientData
from models.data.schema import USER
from models.federation.sampling import round_rng
from models.protocol import ITEM_ARRAYS, ClientUpdate


def sample_devices(user_ids: np.ndarray, fraction: float, seed: int, round_: int) -> np.ndarray:
    """Which of these users (devices) take part in ``round_``: each one's seeded coin."""
    if fraction >= 1.0:
        return np.ones(len(user_ids), dtype=bool)
    key = f"{seed % 10**8:08d}{round_ % 10**8:08d}"  # siphash's 16-character key
    hashes = pd.util.hash_array(np.asarray(user_ids).astype(str).astype(object), hash_key=key)
    return (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def sampled_cohort(
    client: ClientData,
    fraction: float,
    seed: int,
    round_: int,
    coins: np.random.Generator | None = None,
) -> tuple[ClientData, int]:
    """The cohort with only its sampled users' training rows (held-out rows stay, for
    evaluation), and how many sampled users have training rows: the round's clients. With
    ``coins`` each user's coin is drawn from it (a private run's OS entropy) instead of being
    derived from the seed."""
    if coins is None:
        chosen = sample_devices(client.user_ids, fraction, seed, round_)
    else:
        chosen = coins.random(client.n_users) < fraction
    frame = client.frame
    users = frame[USER].to_numpy()
    training = frame[SPLIT].to_numpy() == TRAIN
    n_clients = int(np.unique(users[training & chosen[users]]).size)
    if chosen.all():
        return client, n_clients
    kept = frame[~training | chosen[users]]
    return replace(client, frame=kept.reset_index(drop=True)), n_clients


def cohort_round(
    cohort: ClientData,
    fraction: float,
    seed: int,
    round_: int,
    train: Callable[[ClientData, Sequence[str]], tuple[ClientUpdate, dict[str, Any]]],
    evaluate: Callable[[ClientData, Sequence[str]], dict[str, Any]],
    eval_splits: Sequence[str],
    coins: np.random.Generator | None = None,
) -> tuple[ClientUpdate, dict[str, Any]]:
    """One round of a cohort with a family's client functions: every user evaluates the incoming
    model on ``eval_splits``, the users sampled at ``fraction`` train on it, and the cohort answers
    with the sum of their updates, saying how many clients (users) it sums. With ``coins`` (a
    private run) the users' coins come from it and the count is not sent: it depends on the
    users' rows and is not part of what DP accounts."""
    sampled, n_clients = sampled_cohort(cohort, fraction, seed, round_, coins)
    if sampled is cohort:  # everyone trains: one fold-in for evaluation and training
        update, evaluations = train(cohort, eval_splits)
    else:
        evaluations = evaluate(cohort, eval_splits)
        update = train(sampled, ())[0]
    if coins is not None:
        return update, evaluations
    return replace(update, metrics=update.metrics | {"clients": float(n_clients)}), evaluations


def family_cohort_round(
    family: Any,
    cohort: ClientData,
    state: Any,
    phase: str,
    seed: int,
    round_: int,
    fraction: float,
    eval_splits: Sequence[str],
) -> tuple[ClientUpdate, dict[str, Any]]:
    """:func:`cohort_round` with a model family's client functions (a
    :class:`~models.federation.family.Family`) on ``state``; a private family's coins and noise
    come from OS entropy."""
    private = family.private
    rng = round_rng(seed, round_, cohort.client_id, private=private)

    def train(client: ClientData, splits: Sequence[str]) -> tuple[ClientUpdate, dict[str, Any]]:
        return family.client_round(client, state, phase, rng, splits)

    def evaluate(client: ClientData, splits: Sequence[str]) -> dict[str, Any]:
        return family.evaluate(client, state, splits)

    coins = rng if private else None
    return cohort_round(cohort, fraction, seed, round_, train, evaluate, eval_splits, coins)


class RunningSum:
    """The sum of many cohorts' updates, added as they arrive, so that a round over thousands of
    per-user clients holds one dense sum over the catalogue instead of every cohort's answer.

    Item arrays (:data:`~models.protocol.ITEM_ARRAYS`) and counts are added by item, global arrays
    and metrics as they are. Adding is exact (float64 sums), so the total equals summing all the
    updates at once; the server's ALS step is then the same.
    """

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.touched = np.zeros(n_items, dtype=bool)
        self.counts = np.zeros(n_items)
        self.integral = True  # all counts so far were integers (no DP noise)
        self.item_arrays: dict[str, np.ndarray] = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self.metrics: dict[str, float] = {}

    def add(self, update: ClientUpdate) -> Uploaded:
        """Add one cohort's update; what is kept of it is its size and metrics (for logging)."""
        items = update.items
        self.touched[items] = True
        self.counts[items] += update.counts
        self.integral &= update.counts.dtype.kind in "iu"
        for name, array in update.arrays.items():
            if name in ITEM_ARRAYS:
                target = self.item_arrays.setdefault(
                    name, np.zeros((self.n_items, *array.shape[1:]))
                )
                target[items] += array
            else:
                total = self.global_arrays.get(name)
                self.global_arrays[name] = array.astype(np.float64) + (
                    0 if total is None else total
                )
        for name, value in update.metrics.items():
            self.metrics[name] = self.metrics.get(name, 0.0) + value
        return Uploaded(update.client_id, dict(update.metrics), update.nbytes())

    def total(self) -> ClientUpdate:
        """Everything added, as one update over the touched items."""
        items = np.flatnonzero(self.touched)
        counts = self.counts[items]
        counts = np.rint(counts).astype(np.int64) if self.integral else counts
        arrays = {name: a[items] for name, a in self.item_arrays.items()} | self.global_arrays
        return ClientUpdate(-1, items.astype(np.int64), counts, arrays, dict(self.metrics))


@dataclass(frozen=True)
class Uploaded:
    """What the server keeps of a folded cohort answer: who, its metrics and its size."""

    client_id: int
    metrics: dict[str, float]
    size: int

    def nbytes(self) -> int:
        return self.size
