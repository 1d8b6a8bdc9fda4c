"""Robust aggregation of per-item updates (for the FedAvg family), and simulated attacks.

Clients touch different items, so every rule works per item over the clients that touched it:

- ``median``: the coordinate-wise median (Yin et al., 2018);
- ``trimmed_mean``: per coordinate, drop ``ceil(trim * m)`` of the largest and of the smallest of
  the ``m`` values (keeping at least one), average the rest (Yin et al., 2018, rounding up so
  that an item touched by few clients is still trimmed);
- ``norm_clip``: scale each client's whole update down to at most ``clip_factor`` times the
  median update norm of the round, then the usual count-weighted average (Sun et al., 2019).

With any robust rule, an item touched by fewer than ``min_clients`` clients keeps its parameters
for the round: one attacker among two clients outvotes any statistic, and a sign-flipping attacker
that owns an item drives it to divergence, which then spreads through every user who rated it.

ALS is not covered: it adds exact sufficient statistics, and a robust statistic of those is not a
solve of anything; robust rules apply to the averaging algorithms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from models.aggregation import aggregate_item_average

AggregationRule = Literal["mean", "median", "trimmed_mean", "norm_clip"]
Attack = Literal["none", "sign_flip", "scale", "random"]
Contribution = tuple[np.ndarray, np.ndarray, np.ndarray]  # items, values (m, d), weights (m,)


def _stack(contributions: Sequence[Contribution], n_items: int) -> np.ndarray:
    """(clients, n_items, d) with NaN where a client did not touch an item."""
    d = contributions[0][1].shape[1]
    stacked = np.full((len(contributions), n_items, d), np.nan)
    for c, (items, values, _) in enumerate(contributions):
        stacked[c, items] = values
    return stacked


def coordinate_median(contributions: Sequence[Contribution], n_items: int) -> np.ndarray:
    """Per item and coordinate, the median over the clients that touched the item (0 if none)."""
    if not contributions:
        raise ValueError("cannot aggregate zero client contributions")
    stacked = _stack(contributions, n_items)
    touched = ~np.isnan(stacked[:, :, 0]).all(axis=0)
    out = np.zeros(stacked.shape[1:])
    out[touched] = np.nanmedian(stacked[:, touched], axis=0)
    return out


def trimmed_mean(contributions: Sequence[Contribution], n_items: int, trim: float) -> np.ndarray:
    """Per item and coordinate, the mean after dropping ``min(ceil(trim * m), (m - 1) // 2)``
    values at each end, ``m`` being the number of clients that touched the item (0 if none)."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim={trim} must be in [0, 0.5)")
    if not contributions:
        raise ValueError("cannot aggregate zero client contributions")
    stacked = np.sort(_stack(contributions, n_items), axis=0)  # NaN (untouched) sort last
    present = (~np.isnan(stacked[:, :, :1])).sum(axis=0)  # (n_items, 1)
    cut = np.minimum(np.ceil(trim * present - 1e-9), (present - 1) // 2)
    rank = np.arange(stacked.shape[0])[:, None, None]
    keep = (rank >= cut) & (rank < present - cut)
    kept = np.where(keep, stacked, 0.0).sum(axis=0)
    n_kept = np.maximum(keep.sum(axis=0), 1)
    return np.where(present > 0, kept / n_kept, 0.0)


def clip_norms(
    contributions: Sequence[Contribution], clip_factor: float
) -> tuple[list[Contribution], float]:
    """Each client's update scaled to a norm of at most ``clip_factor`` x the round's median
    norm; returns the clipped contributions and the bound."""
    if clip_factor <= 0:
        raise ValueError(f"clip_factor={clip_factor} must be > 0")
    norms = np.array([np.linalg.norm(values) for _, values, _ in contributions])
    bound = float(clip_factor * np.median(norms)) if norms.size else 0.0
    clipped = []
    for (items, values, weights), norm in zip(contributions, norms, strict=True):
        scale = min(1.0, bound / norm) if norm > 0 else 1.0
        clipped.append((items, values * scale, weights))
    return clipped, bound


def aggregate_robust(
    contributions: Sequence[Contribution],
    n_items: int,
    rule: AggregationRule,
    *,
    trim: float = 0.2,
    clip_factor: float = 2.0,
    min_clients: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """The aggregated per-item update under ``rule``, and the per-item total weight, zero for the
    items the round leaves alone (the server step uses it as a mask)."""
    average, weight = aggregate_item_average(contributions, n_items)
    if rule == "mean":
        return average, weight
    clients_per_item = np.zeros(n_items, dtype=np.int64)
    for items, _, _ in contributions:
        clients_per_item[items] += 1
    weight = np.where(clients_per_item >= min_clients, weight, 0.0)
    if rule == "median":
        return coordinate_median(contributions, n_items), weight
    if rule == "trimmed_mean":
        return trimmed_mean(contributions, n_items, trim), weight
    if rule == "norm_clip":
        clipped, _ = clip_norms(contributions, clip_factor)
        return aggregate_item_average(clipped, n_items)[0], weight
    raise ValueError(
        f"aggregation rule {rule!r} is unknown; allowed: mean, median, trimmed_mean, norm_clip"
    )


def choose_attackers(n_clients: int, fraction: float, seed: int) -> tuple[int, ...]:
    """The ids of ``round(fraction * n_clients)`` clients that play the attacker in a simulation:
    a seeded choice, the same every round."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"attack fraction={fraction} must be in [0, 1]")
    count = round(fraction * n_clients)
    chosen = np.random.default_rng([seed, 7_919]).permutation(n_clients)[:count]
    return tuple(int(c) for c in np.sort(chosen))


def attack_update(
    values: np.ndarray, attack: Attack, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """What a malicious client sends instead of its honest per-item update.

    ``sign_flip``: ``-scale * values``; ``scale``: ``scale * values`` (boosting); ``random``:
    Gaussian noise with ``scale`` times the honest update's standard deviation.
    """
    if attack == "none":
        return values
    if attack == "sign_flip":
        return -scale * values
    if attack == "scale":
        return scale * values
    if attack == "random":
        return rng.normal(0.0, scale * (float(values.std()) or 1.0), size=values.shape)
    raise ValueError(f"attack {attack!r} is unknown; allowed: none, sign_flip, scale, random")
