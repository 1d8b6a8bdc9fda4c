"""Who takes part in a round, and each client's random stream."""

from __future__ import annotations

import numpy as np


def client_rng(seed: int, round_: int, client_id: int) -> np.random.Generator:
    """The generator of one client in one round, derived from the run seed alone (order-free)."""
    return np.random.default_rng([seed, round_, client_id])


def sample_clients(n_clients: int, fraction: float, seed: int, round_: int) -> np.ndarray:
    """Client indices taking part in a round: a seeded sample of ``ceil(fraction * n)``, at least 1."""
    if fraction >= 1.0:
        return np.arange(n_clients)
    size = max(1, int(np.ceil(fraction * n_clients)))
    rng = np.random.default_rng([seed, round_, 2**31 - 1])
    return np.sort(rng.choice(n_clients, size=size, replace=False))
