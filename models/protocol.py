"""What crosses from a client to the server, and nothing more.

A :class:`ClientUpdate` holds per-item aggregates over the client's rows for the items it touched,
the number of rows behind them, and metric sums. It never holds user ids, user factors, raw ratings
or timestamps. Every field is a plain number or a numpy array, so it can be moved as ``.npz``
without pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The whole vocabulary of what a client may send (the contract a test enforces on real flows):
ITEM_ARRAYS = frozenset({"gram", "rhs", "delta"})  # aligned with ``items`` on the first axis
GLOBAL_ARRAYS = frozenset({
    "user_gram",  # implicit ALS: one k x k sum over all the client's users
    "pair_rows", "pair_cols", "pair_counts",  # item-kNN: co-occurrence counts of item pairs
    "trees",  # re-ranker: UTF-8 bytes of a LightGBM model string
    "masked",  # secure aggregation: the masked dense update over every item
    "network_delta",  # neural model: the network's change times the client's users, flattened
})  # fmt: skip
# clients: a cohort's users; users: the users a neural client trained on (its FedAvg weight),
# or, for ADMM SLIM, a kNN client's users with training rows
UPDATE_METRICS = frozenset({"train_sse", "train_n", "groups", "clients", "users"})
EVALUATION_SUMS = frozenset(
    {"sse", "sae", "n", "precision", "recall", "ndcg", "hit", "map", "users"}
)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a round.

    Attributes
    ----------
    client_id : int
    items : ndarray of int64, shape (m,)
        The items the client trained on this round, sorted and unique.
    counts : ndarray of int64, shape (m,)
        The client's training rows per item: the weights of per-item averaging.
    arrays : dict of str to ndarray
        Per-item statistics aligned with ``items`` on the first axis (:data:`ITEM_ARRAYS`):
        ``gram`` (packed upper triangles) and ``rhs`` for ALS, ``delta`` (change of
        ``[q_i, b_i]``) for FedAvg-style rules; or one of :data:`GLOBAL_ARRAYS`.
    metrics : dict of str to float
        Sums (never means), so the server can combine clients exactly: e.g. ``train_sse``, ``train_n``.
    """

    client_id: int
    items: np.ndarray
    counts: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return int(self.counts.sum())

    def nbytes(self) -> int:
        """Bytes of the arrays and numbers this update puts on the wire."""
        arrays = (
            self.items.nbytes + self.counts.nbytes + sum(a.nbytes for a in self.arrays.values())
        )
        return int(arrays + 8 * len(self.metrics))


# Arrays that are sums over a client's users or rows: a client counted w times sends w times them.
# Every other per-item array (FedAvg's ``delta``) is averaged with ``counts`` as its weights.
SUMMED_ARRAYS = frozenset({"gram", "rhs", "user_gram", "network_delta"})
_AVERAGED_ARRAYS = frozenset({"delta"})


def weighted(update: ClientUpdate, weight: int) -> ClientUpdate:
    """``update`` as if its client had sent it ``weight`` times: its sums and its averaging
    weights (``counts``, the neural model's ``users``) multiplied by ``weight``, what it
    averages unchanged. Reported metrics (training loss sums) stay as they are.

    Raises
    ------
    ValueError
        If ``weight`` is not a positive integer, or the update holds an array with no weighting
        rule (co-occurrence counts, trees, a masked vector).
    """
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f"weight {weight!r} must be a positive integer")
    if weight == 1:
        return update
    unknown = set(update.arrays) - SUMMED_ARRAYS - _AVERAGED_ARRAYS
    if unknown:
        raise ValueError(f"an update with {sorted(unknown)} cannot be weighted")
    arrays = {
        name: values * weight if name in SUMMED_ARRAYS else values
        for name, values in update.arrays.items()
    }
    metrics = dict(update.metrics)
    if "users" in metrics:
        metrics["users"] = metrics["users"] * weight
    return ClientUpdate(update.client_id, update.items, update.counts * weight, arrays, metrics)


def answer_arrays(update: ClientUpdate, evaluations: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A client's answer to a round (its update and its evaluation sums per split) as named
    arrays, to be stored or sent as ``.npz`` (nothing to unpickle)."""
    header = {
        "client_id": int(update.client_id),
        "metrics": {k: float(v) for k, v in update.metrics.items()},
        "arrays": sorted(update.arrays),
        "evaluations": {s: {k: float(v) for k, v in e[0].items()} for s, e in evaluations.items()},
    }
    out = {
        "header": np.frombuffer(json.dumps(header).encode(), np.uint8),
        "items": update.items,
        "counts": update.counts,
    }
    out |= {f"array.{name}": value for name, value in update.arrays.items()}
    for split, (_, recommended) in evaluations.items():
        if recommended is not None:
            out[f"recommended.{split}"] = recommended
    return out


def answer_from_arrays(
    arrays: Mapping[str, np.ndarray],
) -> tuple[ClientUpdate, dict[str, tuple[dict[str, float], np.ndarray | None]]]:
    """The inverse of :func:`answer_arrays`."""
    header = json.loads(arrays["header"].tobytes().decode())
    update = ClientUpdate(
        header["client_id"],
        arrays["items"],
        arrays["counts"],
        {name: arrays[f"array.{name}"] for name in header["arrays"]},
        header["metrics"],
    )
    evaluations = {
        split: (sums, arrays.get(f"recommended.{split}"))
        for split, sums in header["evaluations"].items()
    }
    return update, evaluations
