"""The global (item-side) parameters of the MF model, and their safe on-disk format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ItemParams:
    """Item factors ``q_i``, item biases ``b_i`` and the global mean ``mu``: everything the server holds.

    User parameters are not here by design: each client rebuilds them from these and its own rows.
    """

    factors: np.ndarray  # (n_items, k)
    bias: np.ndarray  # (n_items,)
    global_mean: float

    @property
    def n_items(self) -> int:
        return self.factors.shape[0]

    @property
    def n_factors(self) -> int:
        return self.factors.shape[1]

    def stacked(self) -> np.ndarray:
        """``[q_i, b_i]`` as one (n_items, k + 1) array: the vector the server optimizers update."""
        return np.column_stack([self.factors, self.bias])

    @classmethod
    def from_stacked(cls, stacked: np.ndarray, global_mean: float) -> ItemParams:
        return cls(np.ascontiguousarray(stacked[:, :-1]), stacked[:, -1].copy(), global_mean)

    def save(self, path: str | Path) -> None:
        """Write as ``.npz`` (plain arrays, no pickle)."""
        np.savez(path, factors=self.factors, bias=self.bias, global_mean=np.array(self.global_mean))

    @classmethod
    def load(cls, path: str | Path) -> ItemParams:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["factors"], data["bias"], float(data["global_mean"]))


def init_item_params(
    n_items: int, n_factors: int, global_mean: float, rng: np.random.Generator, init_std: float
) -> ItemParams:
    """Random small item factors, zero biases: the same draw for the centralized and federated solvers."""
    factors = rng.normal(0.0, init_std, size=(n_items, n_factors))
    return ItemParams(factors, np.zeros(n_items), float(global_mean))
