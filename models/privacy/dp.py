"""User-level differential privacy for federated ALS, with Google's ``dp-accounting``.

Each round, each user's contribution to the item statistics is bounded before it leaves the
client, and calibrated Gaussian noise is added to the sum:

- a user contributes at most ``max_items`` of its training rows (a seeded sample);
- its factor vector ``p_u`` is clipped to norm ``factor_clip``, so ``x_u = [p_u, 1]`` has
  ``||x_u||^2 <= factor_clip^2 + 1``;
- its residual target ``r - mu - b_u`` is clipped to ``[-residual_clip, residual_clip]``.

One user then changes, over at most ``max_items`` items, the packed Gram by at most
``||x x^T||_F = ||x||^2``, the right-hand side by at most ``residual_clip * ||x||`` and the count
by 1; :attr:`UserLevelDP.sensitivity` is the L2 norm of all of that. Every client adds its share
of Gaussian noise with standard deviation ``noise_multiplier * sensitivity / sqrt(shares)`` to the
statistics of **every** item (so untouched items are hidden too); when ``shares`` clients answer,
the sum carries the full noise, and secure aggregation keeps the server from seeing anything
less noisy. The privacy unit is a user, each round is a (subsampled) Gaussian mechanism, and the
accountant (:func:`epsilon`: the tighter of dp-accounting's PLD and RDP bounds) composes the
rounds.

Implicit ALS (:func:`clipped_implicit_statistics`) is bounded the same way: a user's clipped factor
``x`` (``||x|| <= factor_clip``) adds ``x x^T`` to the client's ``user_gram``, and over at most
``max_items`` items ``alpha x x^T`` to the item's Gram, ``(1 + alpha) x`` to its right-hand side and
1 to its count; :meth:`UserLevelDP.implicit_sensitivity` is the L2 norm of that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.mf.als import ItemStatistics, RatingRows, UserParams


@dataclass(frozen=True)
class UserLevelDP:
    noise_multiplier: float
    max_items: int = 100
    factor_clip: float = 0.5
    residual_clip: float = 2.0
    shares: int = 1  # clients that add a share of the noise (the round's quorum)
    ridge_scale: float = 3.0  # extra ridge on the server: this many noise deviations x sqrt(k)
    # items whose noisy count is below this many noise deviations get zero factors
    # (post-processing: their statistics are mostly noise; explicit items are then served by
    # their released bias)
    count_floor: float = 4.0
    # explicit MF: the released item biases' prior (variance) and the ratings' variance in units
    # of it (the shrinkage's pseudo-count without noise); see :func:`released_biases`
    bias_prior_var: float = (
        0.4  # chosen on ML-1M validation rows at epsilon 8 (benchmarks/README.md)
    )
    bias_reg: float = 5.0
    # explicit MF: project each summed noisy Gram onto the positive semi-definite cone
    psd: bool = True

    def __post_init__(self) -> None:
        # the bounds set the noise's scale: a fractional, zero or infinite bound would make the
        # accountant count a mechanism that is not the one applied
        for name in ("max_items", "shares"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        for name in ("factor_clip", "residual_clip", "bias_prior_var"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive finite number")
        for name in ("noise_multiplier", "ridge_scale", "count_floor", "bias_reg"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a finite number >= 0")

    @classmethod
    def for_implicit(cls, noise_multiplier: float, max_items: int, shares: int) -> UserLevelDP:
        """The bounds picked for implicit ALS on ML-1M's validation rows at epsilon 8 (benchmarks/README.md,
        privacy): a deeper ridge than explicit ALS needs (3 deviations fall off a cliff)."""
        return cls(noise_multiplier, max_items, shares=shares, ridge_scale=4.0)

    @property
    def sensitivity(self) -> float:
        x2 = self.factor_clip**2 + 1.0
        per_item = x2**2 + (self.residual_clip**2) * x2 + 1.0
        return math.sqrt(self.max_items * per_item)

    def implicit_sensitivity(self, alpha: float) -> float:
        """One user's largest L2 change of the implicit-ALS statistics (binary feedback)."""
        c2 = self.factor_clip**2
        per_item = (alpha * c2) ** 2 + (1.0 + alpha) ** 2 * c2 + 1.0
        return math.sqrt(self.max_items * per_item + c2**2)

    def noise_std(self, sensitivity: float) -> float:
        """The standard deviation of one client's share of the noise."""
        return self.noise_multiplier * sensitivity / math.sqrt(self.shares)

    @property
    def bias_sensitivity(self) -> float:
        """One user's largest L2 change of the bias channel: per item, a weighted count and a
        weighted sum of clipped residuals (:func:`clipped_bias_sums`)."""
        return math.sqrt(self.max_items * (self.residual_clip**2 + 1.0))

    @property
    def factor_sensitivity(self) -> float:
        """One user's largest L2 change of the factor channel (:func:`clipped_factor_statistics`):
        per item ``w p p^T``, ``w t p`` and ``w``, with ``||p|| <= factor_clip``, ``|t| <=
        residual_clip`` and ``sum w^2 <= max_items`` over the user's items."""
        c2 = self.factor_clip**2
        return math.sqrt(self.max_items * (c2**2 + self.residual_clip**2 * c2 + 1.0))


@dataclass(frozen=True)
class PrivateDefaults:
    """What a private run uses where the operator sets nothing (``fedrec train --dp-epsilon E``):
    chosen for privacy, measured on ML-1M (benchmarks/README.md, privacy against utility), not the non-private
    defaults. ``n_factors`` None keeps the non-private default."""

    rounds: int
    max_items: int
    n_factors: int | None = None


# Explicit MF: one round, the biases phase. At epsilon <= 16 on ML-1M every further round's noise
# cost more than the factors it trained gave back (benchmarks/README.md), so the private model is the global
# mean plus released item biases, each user's bias folded in on the client.
PRIVATE_EXPLICIT = PrivateDefaults(rounds=1, max_items=50, n_factors=4)
# Implicit ALS: the bounds of the implicit benchmark (3 rounds, 100 items per user).
PRIVATE_IMPLICIT = PrivateDefaults(rounds=3, max_items=100)
# With secure aggregation, the share of a round's clients that must answer: each adds its share of
# the noise for that many, so the sum of everyone carries ``1 / SECURE_PRIVATE_QUORUM`` times the
# calibrated variance (the quorum 2 of the plain default would give 5x at 10 clients). 0.9 (one
# dropout in 10 allowed) against 0.8: 0.0007 lower RMSE on ML-1M validation rows at epsilon 8.
SECURE_PRIVATE_QUORUM = 0.9


def limit_items(rows: RatingRows, max_items: int, rng: np.random.Generator) -> RatingRows:
    """At most ``max_items`` rows per user, sampled at random."""
    order = np.lexsort((rng.random(len(rows)), rows.users))
    users = rows.users[order]
    first = np.searchsorted(users, users)  # index of each user's first row in the sorted order
    keep = order[np.arange(len(rows)) - first < max_items]
    return RatingRows(rows.users[keep], rows.items[keep], rows.ratings[keep],
                      n_users=rows.n_users, n_items=rows.n_items)  # fmt: skip


def user_weights(users: np.ndarray, max_items: int) -> np.ndarray:
    """Per row, its user's weight ``min(1, sqrt(max_items / n_u))``: a user's rows then count
    as at most ``max_items`` unit rows in any sum of squares, and every row is used (adaptive
    weighting, as in Chien et al. 2021 and Krichene et al. 2023, instead of sampling rows)."""
    n = np.bincount(users)
    return np.minimum(1.0, np.sqrt(max_items / np.maximum(n, 1)))[users]


def clipped_bias_sums(
    rows: RatingRows, center: float, dp: UserLevelDP
) -> tuple[np.ndarray, np.ndarray]:
    """The bias channel of one client: per item, the weighted count ``sum w_u`` and the weighted
    sum ``sum w_u clip(r - center)`` over its rows (``w_u`` of :func:`user_weights`, the residual
    clipped to ``[-residual_clip, residual_clip]``). One user changes them by at most
    :attr:`UserLevelDP.bias_sensitivity` in L2."""
    w = user_weights(rows.users, dp.max_items)
    target = clip_values(rows.ratings - center, dp.residual_clip)
    counts = np.bincount(rows.items, weights=w, minlength=rows.n_items)
    sums = np.bincount(rows.items, weights=w * target, minlength=rows.n_items)
    return counts, sums


def released_biases(
    counts: np.ndarray,
    sums: np.ndarray,
    center: float,
    dp: UserLevelDP,
) -> tuple[float, np.ndarray]:
    """Post-processing of the summed noisy bias channel: the global mean ``mu = center +
    sum(sums) / sum(counts)`` and each item's bias, the posterior mean under a prior
    ``N(0, bias_prior_var)``, ratings of variance ``bias_reg * bias_prior_var`` and the channel's
    noise of variance ``s^2``: ``(s_i - (mu - center) n_i) / (n + bias_reg + s^2 /
    (bias_prior_var n))`` with ``n = max(n_i, 1)``, a regularisation that grows as an item's
    count falls towards its noise (rare items are served by a bias near 0)."""
    total = float(counts.sum())
    shift = float(sums.sum()) / total if total > 1.0 else 0.0
    noise_var = (dp.noise_multiplier * dp.bias_sensitivity) ** 2
    n = np.maximum(counts, 1.0)
    shrink = dp.bias_reg + noise_var / (dp.bias_prior_var * n)
    bias = (sums - shift * counts) / (np.maximum(counts, 0.0) + shrink)
    return center + shift, bias


def clipped_factor_statistics(
    rows: RatingRows, users: UserParams, mean: float, item_bias: np.ndarray, dp: UserLevelDP
) -> ItemStatistics:
    """The factor channel of one client: per item ``sum w p p^T`` (packed), ``sum w t p`` and
    ``sum w`` with the user's factor clipped to ``factor_clip``, its residual ``t = r - mu - b_u -
    b_i`` (item biases fixed, released on their own channel) clipped to ``residual_clip``, and
    ``w`` of :func:`user_weights`."""
    factors = clip_rows(users.factors, dp.factor_clip)
    w = user_weights(rows.users, dp.max_items)
    target = rows.ratings - mean - users.bias[rows.users] - item_bias[rows.items]
    target = clip_values(target, dp.residual_clip)
    layout = rows.by_item
    grams, rhs = layout.packed_statistics(factors, w * target, gram_weights=w)
    counts = np.bincount(rows.items, weights=w, minlength=rows.n_items)[layout.keys]
    return ItemStatistics(layout.keys.astype(np.int64), counts, grams, rhs)


def solve_private_factors(
    factors: np.ndarray, stats: ItemStatistics, *, reg: float, extra_ridge: float,
    floor: float, psd: bool,
) -> np.ndarray:  # fmt: skip
    """Item factors from summed noisy factor statistics: each Gram projected onto the PSD cone
    (``psd``), a ridge of ``reg`` per (noisy, floored at 0) weighted count plus ``extra_ridge``;
    items whose noisy count is below ``floor`` get zero factors (served by their bias)."""
    from models.mf.linalg import ridge_solve, unpack_symmetric

    k = factors.shape[1]
    out = np.zeros_like(factors)
    counts = np.asarray(stats.counts, dtype=np.float64)
    kept = counts >= floor
    if not np.any(kept):
        return out
    grams = unpack_symmetric(stats.grams[kept], k)
    if psd:
        values, vectors = np.linalg.eigh(grams)
        grams = (vectors * np.maximum(values, 0.0)[:, None, :]) @ np.swapaxes(vectors, 1, 2)
    ridge = np.repeat((reg * np.maximum(counts[kept], 0.0) + extra_ridge)[:, None], k, axis=1)
    out[stats.items[kept]] = ridge_solve(grams, stats.rhs[kept], ridge)
    return out


def clip_rows(factors: np.ndarray, bound: float) -> np.ndarray:
    """Every row scaled down to L2 norm at most ``bound`` (a non-finite value counts as 0: a
    NaN would pass any clip, and no noise hides it)."""
    factors = np.nan_to_num(factors, nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(factors, axis=1, keepdims=True)
    return factors * np.minimum(1.0, bound / np.maximum(norms, 1e-12))


def clip_values(values: np.ndarray, bound: float) -> np.ndarray:
    """``values`` clipped to ``[-bound, bound]``, a NaN counting as 0 and an infinity as the
    bound it passed (a NaN would pass any clip, and no noise hides it)."""
    finite = np.nan_to_num(values, nan=0.0, posinf=bound, neginf=-bound)
    return np.clip(finite, -bound, bound)


def clipped_statistics(
    rows: RatingRows, users: UserParams, global_mean: float, dp: UserLevelDP
) -> ItemStatistics:
    """The client's ALS item statistics with every user's contribution bounded."""
    factors = clip_rows(users.factors, dp.factor_clip)
    x = np.column_stack([factors, np.ones(factors.shape[0])])
    target = rows.ratings - global_mean - users.bias[rows.users]
    target = clip_values(target, dp.residual_clip)
    layout = rows.by_item
    grams, rhs = layout.packed_statistics(x, target)
    return ItemStatistics(layout.keys.astype(np.int64), layout.counts, grams, rhs)


def noisy_dense(
    stats: ItemStatistics, n_items: int, std: float, rng: np.random.Generator
) -> ItemStatistics:
    """The statistics over every item, plus Gaussian noise of deviation ``std`` on each value."""
    counts = rng.normal(0.0, std, n_items)
    grams = rng.normal(0.0, std, (n_items, stats.grams.shape[1]))
    rhs = rng.normal(0.0, std, (n_items, stats.rhs.shape[1]))
    counts[stats.items] += stats.counts
    grams[stats.items] += stats.grams
    rhs[stats.items] += stats.rhs
    return ItemStatistics(np.arange(n_items, dtype=np.int64), counts, grams, rhs)


# The PLD accountant's grid of privacy-loss values: pessimistic (an upper bound at any grid); at
# 1e-2 its epsilon is within 0.05% of 1e-4's on the mechanisms fedrec runs (1 to 100 rounds), and
# 10-50x faster to compute (calibration evaluates it some 20 times at a run's start).
PLD_DISCRETIZATION = 1e-2
# The RDP accountant's orders: the integers 2..64 and a few above. Fractional orders below 2 add
# little for the mechanisms fedrec runs (where PLD is tighter anyway) and make each evaluation of a
# subsampled Gaussian ~6x slower.
RDP_ORDERS = (*range(2, 65), 80, 96, 128, 192, 256, 512, 1024)


def _event(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    full: int,
    extra: Sequence[float] = (),
) -> object:
    # dp_accounting is imported only when privacy is asked for: it brings absl, whose logging
    # handler keeps the stderr of the moment of import (a closed stream under click's test runner).
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    sampled = gaussian
    if sampling_rate < 1.0:
        sampled = dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    events = [dp_accounting.SelfComposedDpEvent(sampled, rounds)] if rounds else []
    if full:
        events.append(dp_accounting.SelfComposedDpEvent(gaussian, full))
    events += [dp_accounting.GaussianDpEvent(sigma) for sigma in extra]
    return dp_accounting.ComposedDpEvent(events)


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    full: int = 0,
    extra: Sequence[float] = (),
) -> float:
    """The (epsilon, delta) guarantee of ``rounds`` rounds whose users are Poisson-sampled at
        ``sampling_rate``, ``full`` releases of the same noise from every user, and one release from
        every user per noise multiplier of ``extra`` (e.g. the final evaluation,
        :mod:`models.privacy.released_metrics`), all of sensitivity 1 in units of their noise.

        The smaller of two valid upper bounds on the same composition, each by ``dp-accounting``:
        the privacy loss distribution accountant (``PLDAccountant``, pessimistic discretization at
        :data:`PLD_DISCRETIZATION`; numerically tight, it counts a single Gaussian release exactly
        where RDP's conversion to (epsilon, delta) loses some 10%) and the RDP accountant (orders
    :data:`RDP_ORDERS`). Both bound
        the epsilon of the same mechanism, so their minimum does too; PLD is the smaller one at the
        rounds, rates and deltas fedrec runs, RDP can win by a little over very many compositions,
        where the PLD grid's pessimism adds up.
    """
    if rounds + full + len(extra) <= 0:
        return 0.0
    from dp_accounting import pld, rdp

    event = _event(noise_multiplier, sampling_rate, rounds, full, extra)
    by_pld = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    by_rdp = rdp.RdpAccountant(list(RDP_ORDERS))
    by_pld.compose(event)
    by_rdp.compose(event)
    return float(min(by_pld.get_epsilon(delta), by_rdp.get_epsilon(delta)))


def calibrate(
    target_epsilon: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    full: int = 0,
    relative: Sequence[float] = (),
) -> float:
    """The smallest noise multiplier ``sigma`` (to 1e-4 relative) whose whole training, with one
    more release from every user of noise multiplier ``r * sigma`` for each ``r`` in
    ``relative`` (e.g. the final evaluation), stays within ``target_epsilon`` by :func:`epsilon`:
    a bisection whose upper end always meets the target, so the noise returned does."""
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon={target_epsilon} must be > 0")

    def spent(sigma: float) -> float:
        extra = [r * sigma for r in relative]
        return epsilon(sigma, sampling_rate, rounds, delta, full, extra)

    low, high = 0.05, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e5:
            raise ValueError(f"epsilon={target_epsilon} is out of reach in {rounds} rounds")
    while high - low > 1e-4 * high:
        middle = (low + high) / 2
        if spent(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


# Above this epsilon a guarantee protects little: the odds of any outcome may change by a factor
# of e^10, about 22,000, for one user's data. Deployed user-level DP mostly sits between 1 and 8.
WEAK_EPSILON = 10.0


def weak_guarantee(target_epsilon: float) -> str | None:
    """A warning, in one line, when ``target_epsilon`` is too large to protect much (above
    :data:`WEAK_EPSILON`); None otherwise. The run goes on: the choice is the operator's."""
    if target_epsilon <= WEAK_EPSILON:
        return None
    about = f" (about {math.exp(target_epsilon):.2g})" if target_epsilon < 700 else ""
    return (
        f"epsilon {target_epsilon:g} is a weak guarantee: one user's data may change the odds of "
        f"any outcome by a factor of up to e^{target_epsilon:g}{about}; above {WEAK_EPSILON:g} it "
        "protects little, and 1 to 8 is usual"
    )


def clipped_implicit_statistics(
    rows: RatingRows, factors: np.ndarray, alpha: float, dp: UserLevelDP
) -> tuple[ItemStatistics, np.ndarray]:
    """The client's implicit-ALS statistics (binary rows, at most ``max_items`` per user already)
    with every user's factor clipped: per-item ``sum alpha x x^T`` (packed), ``sum (1 + alpha) x``
    and counts, and ``user_gram = sum x x^T`` over all its users."""
    x = clip_rows(factors, dp.factor_clip)
    layout = rows.by_item
    extra = np.full(len(rows), alpha)
    grams, rhs = layout.packed_statistics(x, 1.0 + extra, gram_weights=extra)
    return ItemStatistics(layout.keys.astype(np.int64), layout.counts, grams, rhs), x.T @ x


def noisy_gram(gram: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """A symmetric k x k sum with Gaussian noise on its upper triangle (mirrored below)."""
    noise = np.triu(rng.normal(0.0, std, gram.shape))
    return gram + noise + np.triu(noise, 1).T
