"""Robust aggregation of per-item updates (for the FedAvg family), and simulated attacks.

Clients touch different items, so every rule works per item over the clients that touched it:

- ``median``: the coordinate-wise median (Yin et al., 2018);
- ``trimmed_mean``: per coordinate, drop the ``f`` largest and the ``f`` smallest of the values
  and average the rest (Yin et al., 2018);
- ``norm_clip``: scale each client's whole update down to at most ``clip_factor`` times the
  median update norm of the round, then the usual count-weighted average (Sun et al., 2019);
- ``screened_mean``: leave out the round's ``f`` clients whose updates lie farthest from the
  coordinate-wise median (mean squared distance of their item rows), then the usual
  count-weighted average of the others. The coordinate-wise rules drop the ``f`` extreme values of
  every coordinate, honest ones too where no attacker sits, so attackers on one side pull what is
  left towards them; leaving whole clients out keeps the honest average unbiased.

``f = ceil(trim * n)`` is how many of the round's ``n`` clients the rules assume malicious. A
malicious client is not bound to the items it rated: it can send a value for any item, so the
whole ``f`` may sit among the few clients that touched a rare item. The median of ``m`` values of
which at most ``f`` are the attackers' lies between two honest values only when ``m >= 2f + 1``,
and so does the mean of the values left after ``f`` are dropped at each end. An item touched by
fewer clients (or by fewer than ``min_clients``) therefore keeps its parameters for the round
under ``median``, ``trimmed_mean`` and ``screened_mean`` (whose screen is measured against that
median, so it leaves no item moved by a client it could not check); under ``norm_clip``, an item
touched by fewer than ``min_clients`` does. Scaling the trim to the clients of each item instead
(``ceil(trim * m)``) lets two attackers among an item's four clients set its value, and a run
diverges from it.

ALS is not covered: it adds exact sufficient statistics, and a robust statistic of those is not a
solve of anything; robust rules apply to the averaging algorithms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from models.aggregation import aggregate_item_average

AggregationRule = Literal["mean", "median", "trimmed_mean", "norm_clip", "screened_mean"]
ROBUST_RULES = ("median", "trimmed_mean", "norm_clip", "screened_mean")
_MEDIAN_BASED = ("median", "trimmed_mean", "screened_mean")
Attack = Literal["none", "sign_flip", "scale", "random"]
Contribution = tuple[np.ndarray, np.ndarray, np.ndarray]  # items, values (m, d), weights (m,)


def _stack(contributions: Sequence[Contribution], n_items: int) -> np.ndarray:
    """(clients, n_items, d) with NaN where a client did not touch an item."""
    d = contributions[0][1].shape[1]
    stacked = np.full((len(contributions), n_items, d), np.nan)
    for c, (items, values, _) in enumerate(contributions):
        stacked[c, items] = values
    return stacked


def tolerated(n_clients: int, trim: float) -> int:
    """``ceil(trim * n_clients)``: how many of a round's clients the robust rules assume malicious
    (each item then needs ``2 f + 1`` clients for the median or the trimmed mean to move it)."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim={trim} must be in [0, 0.5)")
    return math.ceil(trim * n_clients - 1e-9)


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
    """Per item and coordinate, the mean after dropping ``f = ceil(trim * n)`` values at each end,
    ``n`` being the number of contributions; 0 for an item that ``2 f`` or fewer clients touched
    (nothing would be left that an attacker could not have set)."""
    if not contributions:
        raise ValueError("cannot aggregate zero client contributions")
    cut = tolerated(len(contributions), trim)
    stacked = np.sort(_stack(contributions, n_items), axis=0)  # NaN (untouched) sort last
    present = (~np.isnan(stacked[:, :, :1])).sum(axis=0)  # (n_items, 1)
    rank = np.arange(stacked.shape[0])[:, None, None]
    keep = (rank >= cut) & (rank < present - cut)
    kept = np.where(keep, stacked, 0.0).sum(axis=0)
    n_kept = np.maximum(keep.sum(axis=0), 1)
    return np.where(present > 2 * cut, kept / n_kept, 0.0)


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


def screen_clients(
    contributions: Sequence[Contribution], median: np.ndarray, checked: np.ndarray, drop: int
) -> list[int]:
    """The indices of the contributions kept: all but the ``drop`` whose rows on ``checked`` items
    lie farthest, in mean squared distance, from ``median``. A client that touched no checked
    item cannot be measured and is left out first."""
    distance = np.full(len(contributions), np.inf)
    for c, (items, values, _) in enumerate(contributions):
        seen = checked[items]
        if seen.any():
            distance[c] = float(np.mean(np.sum((values[seen] - median[items[seen]]) ** 2, axis=1)))
    order = np.argsort(distance, kind="stable")
    return sorted(int(c) for c in order[: len(contributions) - drop])


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
    items the round leaves alone (the server step uses it as a mask): those fewer than
    ``min_clients`` touched, under ``median``, ``trimmed_mean`` and ``screened_mean`` those fewer
    than ``2 * tolerated(n, trim) + 1`` of the round's ``n`` clients touched, and under
    ``screened_mean`` those only screened-out clients touched."""
    average, weight = aggregate_item_average(contributions, n_items)
    if rule == "mean":
        return average, weight
    clients_per_item = np.zeros(n_items, dtype=np.int64)
    for items, _, _ in contributions:
        clients_per_item[items] += 1
    if rule not in ROBUST_RULES:
        raise ValueError(
            f"aggregation rule {rule!r} is unknown; allowed: mean, {', '.join(ROBUST_RULES)}"
        )
    needed = min_clients
    if rule in _MEDIAN_BASED:
        needed = max(min_clients, 2 * tolerated(len(contributions), trim) + 1)
    moved = clients_per_item >= needed
    if rule == "median":
        return coordinate_median(contributions, n_items), np.where(moved, weight, 0.0)
    if rule == "trimmed_mean":
        return trimmed_mean(contributions, n_items, trim), np.where(moved, weight, 0.0)
    if rule == "norm_clip":
        clipped, _ = clip_norms(contributions, clip_factor)
        return aggregate_item_average(clipped, n_items)[0], np.where(moved, weight, 0.0)
    median = coordinate_median(contributions, n_items)
    kept = screen_clients(contributions, median, moved, drop=tolerated(len(contributions), trim))
    if not kept:  # a round of fewer clients than the screen drops moves nothing
        return np.zeros_like(average), np.zeros_like(weight)
    average, kept_weight = aggregate_item_average([contributions[c] for c in kept], n_items)
    return average, np.where(moved, kept_weight, 0.0)


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
