"""Server-side optimizers that apply an aggregated pseudo-gradient (Reddi et al., 2021).

The pseudo-gradient is the clients' weighted-average change ``delta`` of the global parameters.
Only rows in ``touched`` move, and only their moment estimates change, so an item no client
touched this round keeps both its parameters and its optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ServerRule = Literal["sgd", "adam", "yogi"]


@dataclass(frozen=True)
class ServerOptimizerState:
    """First and second moment estimates, row-aligned with the parameters."""

    first: np.ndarray
    second: np.ndarray

    @classmethod
    def zeros_like(cls, params: np.ndarray, tau: float) -> ServerOptimizerState:
        # Reddi et al. initialise v to tau^2 so that the first steps are not divided by ~0.
        return cls(np.zeros_like(params), np.full_like(params, tau * tau))


def apply_server_update(
    params: np.ndarray,
    delta: np.ndarray,
    touched: np.ndarray,
    state: ServerOptimizerState | None,
    *,
    rule: ServerRule,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[np.ndarray, ServerOptimizerState]:
    """One server step ``x <- x + step(delta)`` on the rows in ``touched``.

    Parameters
    ----------
    params : ndarray of shape (n, d)
    delta : ndarray of shape (n, d)
        Aggregated client change (a descent direction, not a gradient).
    touched : ndarray of bool, shape (n,)
    state : ServerOptimizerState or None
        Moment estimates; required by ``adam`` and ``yogi``, ignored (and passed through) by ``sgd``.
    rule : {"sgd", "adam", "yogi"}
        ``sgd`` is FedAvg's server step ``x + lr * delta`` (lr = 1 is plain FedAvg).
    lr, beta1, beta2, tau : float

    Returns
    -------
    params, state
        New arrays; the inputs are not modified.
    """
    new = params.copy()
    if rule == "sgd":
        new[touched] += lr * delta[touched]
        return new, state
    if rule not in ("adam", "yogi"):
        raise ValueError(f"server optimizer rule {rule!r} is unknown; allowed: sgd, adam, yogi")
    if state is None:
        raise ValueError(f"server optimizer rule {rule!r} needs moment state; got None")
    d = delta[touched]
    first = state.first.copy()
    second = state.second.copy()
    first[touched] = beta1 * first[touched] + (1.0 - beta1) * d
    if rule == "adam":
        second[touched] = beta2 * second[touched] + (1.0 - beta2) * d * d
    else:
        v = second[touched]
        second[touched] = v - (1.0 - beta2) * d * d * np.sign(v - d * d)
    new[touched] += lr * first[touched] / (np.sqrt(second[touched]) + tau)
    return new, ServerOptimizerState(first, second)
