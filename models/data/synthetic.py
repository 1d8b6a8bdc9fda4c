"""A seeded synthetic interaction dataset with a known latent-factor ground truth.

The shape mimics MovieLens: long-tail item popularity, skewed user activity, ratings from user
and item biases plus a factor dot product, and users grouped into regions whose tastes differ,
so that sharding by region gives the non-IID clients federated training has to cope with.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from models.data.errors import DataValidationError
from models.data.schema import ITEM, RATING, TIMESTAMP, USER, Interactions, encode_interactions

MIN_PER_USER = 5
N_REGIONS = 10
N_GENRES = 8
OCCUPATIONS = (
    "student",
    "engineer",
    "educator",
    "administrator",
    "artist",
    "healthcare",
    "retired",
    "other",
)
# 2020-01-01 UTC; users join over the following two years.
_START = 1_577_836_800
_JOIN_SPAN = 2 * 365 * 86_400
_MEAN_GAP = 2 * 86_400
# Sampling rounds drawn from the popularity law before falling back to uniform top-ups.
_POPULAR_ROUNDS = 6
_MAX_ROUNDS = 200
# Variance of the factor dot product, in rating units on a 1..5 scale (spread 4).
_DOT_VARIANCE = 0.36
# A user accepts a proposed item with probability floor + (1 - floor) * sigmoid(slope * affinity)
# (affinity: the standardised factor dot product); ``taste`` multiplies the slope and divides the
# floor, so above 1 what a user meets follows their taste more and popularity less.
_ACCEPT_FLOOR = 0.15
_ACCEPT_SLOPE = 2.0


def generate_synthetic(
    *,
    n_users: int = 2000,
    n_items: int = 1000,
    n_interactions: int = 100_000,
    n_factors: int = 8,
    rating_scale: tuple[float, float] = (1.0, 5.0),
    side_features: bool = True,
    taste: float = 1.0,
    seed: int = 0,
) -> Interactions:
    """Generate explicit ratings from a latent-factor model, deterministically from ``seed``.

    Each rating is ``mu + b_u + b_i + p_u . q_i + noise``, standardised over the rows drawn and
    scaled to ``rating_scale`` (mean near 3.5 and spread about 1.1 on 1..5), rounded to whole
    steps (half steps when the scale ends are not integers) and clipped. Item popularity
    follows a Zipf law over a random order of the items, and popular items are rated a little
    higher; user activity is lognormal with at least ``MIN_PER_USER`` interactions each and at
    most half the items. Which items a user meets leans towards those they like. Each user's
    timestamps increase.

    Parameters
    ----------
    n_users, n_items : int
        Requested sizes; every user appears, items no one drew do not.
    n_interactions : int
        Exact number of distinct (user, item) rows; between ``MIN_PER_USER * n_users`` and
        ``n_users * (n_items // 2)``.
    n_factors : int
        Rank of the latent ground truth.
    rating_scale : tuple of float
        Inclusive (min, max) of the ratings.
    side_features : bool
        Add ``item_features`` (``genre_0`` .. ``genre_7`` int8 flags correlated with the item
        factors, ``year`` Int64) and ``user_features`` (``age``, ``occupation``, and ``region``
        ``"r0"`` .. ``"r9"``, a natural sharding key whose users share tastes).
    taste : float
        How strongly which items a user meets follows their taste rather than popularity: a
        proposed item is accepted with probability ``f + (1 - f) * sigmoid(2 * taste * a)``, ``a``
        the user's standardised affinity to it and ``f = 0.15 / taste``. 1 gives data where the
        most-popular list is nearly as good as a learned model on small samples; about 6 makes a
        model that learns users' tastes beat it clearly. Must be > 0.
    seed : int
        Seed of the single ``np.random.Generator`` everything is drawn from.

    Returns
    -------
    Interactions
        Caller ids are integers from 0; rows are grouped by user in time order.

    Raises
    ------
    DataValidationError
        When a size or the rating scale is out of range.
    """
    low, high = _check_arguments(n_users, n_items, n_interactions, n_factors, rating_scale)
    if not (math.isfinite(taste) and taste > 0):
        raise DataValidationError(f"taste={taste} is not a valid strength", allowed="> 0")
    rng = np.random.default_rng(seed)

    region = rng.choice(N_REGIONS, size=n_users, p=rng.dirichlet(np.full(N_REGIONS, 2.0)))
    factor_std = math.sqrt(math.sqrt(_DOT_VARIANCE / n_factors))
    centres = rng.normal(0.0, factor_std, (N_REGIONS, n_factors))
    # Half of each user's taste is their region's, so regions differ the way real shards do.
    user_factors = math.sqrt(0.5) * (
        centres[region] + rng.normal(0.0, factor_std, (n_users, n_factors))
    )
    item_factors = rng.normal(0.0, factor_std, (n_items, n_factors))
    log_popularity = -rng.permutation(np.log1p(np.arange(n_items)))
    popularity = np.exp(log_popularity)
    popularity /= popularity.sum()
    user_bias = rng.normal(0.0, 0.35, n_users)
    item_bias = 0.3 * _standardise(log_popularity) + rng.normal(0.0, 0.4, n_items)

    counts = _draw_activity(rng, n_users, n_interactions, cap=n_items // 2)
    users, items = _draw_pairs(rng, counts, popularity, user_factors, item_factors, taste)
    signal = (
        user_bias[users]
        + item_bias[items]
        + np.einsum("ij,ij->i", user_factors[users], item_factors[items])
        + rng.normal(0.0, 0.5, len(users))
    )
    # Users meet items they like, so the observed signal runs high; centre it on what was seen.
    signal = _standardise(signal)
    frame = pd.DataFrame(
        {
            USER: users.astype(np.int64),
            ITEM: items.astype(np.int64),
            RATING: _to_scale(signal, low, high),
            TIMESTAMP: _draw_timestamps(rng, counts),
        }
    )
    user_features = item_features = None
    if side_features:
        user_features = _user_features(rng, region, user_factors / factor_std)
        item_features = _item_features(rng, item_factors / factor_std, log_popularity)
    source = (
        f"synthetic(seed={seed}, n_users={n_users}, n_items={n_items}, "
        f"n_interactions={n_interactions}, n_factors={n_factors}, "
        f"rating_scale={(low, high)}, side_features={side_features}"
        + (f", taste={taste})" if taste != 1.0 else ")")
    )
    return encode_interactions(
        frame,
        rating_scale=(low, high),
        source=source,
        user_features=user_features,
        item_features=item_features,
        features_list_every_item=True,  # one row per generated item, drawn or not
    )


def _check_arguments(
    n_users: int,
    n_items: int,
    n_interactions: int,
    n_factors: int,
    rating_scale: tuple[float, float],
) -> tuple[float, float]:
    for name, value, least in (
        ("n_users", n_users, 1),
        ("n_items", n_items, 2 * MIN_PER_USER),
        ("n_factors", n_factors, 1),
    ):
        if value < least:
            raise DataValidationError(f"{name}={value} is too small", allowed=f">= {least}")
    fewest, most = MIN_PER_USER * n_users, n_users * (n_items // 2)
    if not fewest <= n_interactions <= most:
        raise DataValidationError(
            f"n_interactions={n_interactions} is out of range for {n_users} users and "
            f"{n_items} items",
            allowed=f"{fewest} ({MIN_PER_USER} per user) to {most} (half the items per user)",
        )
    low, high = float(rating_scale[0]), float(rating_scale[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise DataValidationError(
            f"rating_scale={rating_scale!r} is not a valid range",
            allowed="(min, max) with finite min < max",
        )
    return low, high


def _standardise(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def _draw_activity(rng: np.random.Generator, n_users: int, total: int, *, cap: int) -> np.ndarray:
    """Per-user counts: ``MIN_PER_USER`` each, the rest lognormally, none above ``cap``."""
    weights = rng.lognormal(0.0, 1.0, n_users)
    counts = np.full(n_users, MIN_PER_USER, dtype=np.int64)
    extra = total - int(counts.sum())
    while extra > 0:
        room = cap - counts
        open_weights = np.where(room > 0, weights, 0.0)
        added = rng.multinomial(extra, open_weights / open_weights.sum())
        counts += np.minimum(added, room)
        extra = total - int(counts.sum())
    return counts


def _draw_pairs(
    rng: np.random.Generator,
    counts: np.ndarray,
    popularity: np.ndarray,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    taste: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user, item) pairs, ``counts[u]`` for user ``u``, grouped by user in random order.

    Rounds of draws with replacement are filtered to fresh pairs until every user has enough:
    popularity-weighted first, then uniform so heavy users can still reach the tail.
    """
    n_users, n_items = len(counts), len(popularity)
    cdf = np.cumsum(popularity)
    dot_std = math.sqrt(_DOT_VARIANCE)
    need = counts.copy()
    taken = np.empty(0, dtype=np.int64)
    for attempt in range(_MAX_ROUNDS):
        if not need.any():
            break
        # Draw more than needed: about half the draws are refused or repeats.
        users = np.repeat(np.arange(n_users, dtype=np.int64), 3 * need + (need > 0))
        if attempt < _POPULAR_ROUNDS:
            items = np.searchsorted(cdf, rng.random(len(users)) * cdf[-1], side="right")
            items = np.minimum(items, n_items - 1)
        else:
            items = rng.integers(0, n_items, len(users))
        affinity = np.einsum("ij,ij->i", user_factors[users], item_factors[items]) / dot_std
        # Users meet what they like more often, so who-saw-what carries signal, as in real logs.
        floor, odds = _ACCEPT_FLOOR / taste, 1.0 + np.exp(-_ACCEPT_SLOPE * taste * affinity)
        accept = rng.random(len(users)) < floor + (1.0 - floor) / odds
        keys = users[accept] * n_items + items[accept]
        keys = keys[~_contains(taken, keys)]
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]
        key_users = keys // n_items
        rank = np.arange(len(keys)) - np.searchsorted(key_users, key_users, side="left")
        keys = keys[rank < need[key_users]]
        need -= np.bincount(keys // n_items, minlength=n_users)
        # Two sorted runs: the stable sort (timsort) merges them in linear time.
        taken = np.sort(np.concatenate([taken, np.sort(keys)]), kind="stable")
    if need.any():
        raise RuntimeError("synthetic sampling did not converge; lower n_interactions")
    # Sorted keys list each user's items in id order; shuffle so time does not follow item id.
    order = rng.permutation(len(taken))
    taken = taken[order[np.argsort(taken[order] // n_items, kind="stable")]]
    return taken // n_items, taken % n_items


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``np.isin`` for a sorted haystack, by binary search (much faster than hashing here)."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def _to_scale(signal: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map a unit-spread signal onto [low, high], rounded to whole (or half) steps."""
    span = high - low
    step = 1.0 if low.is_integer() and high.is_integer() else 0.5
    value = low + 0.64 * span + (span / 3.5) * signal
    return np.clip(low + step * np.round((value - low) / step), low, high)


def _draw_timestamps(rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
    """Increasing Unix seconds per user, for rows grouped by user in ``counts`` order."""
    n_users = len(counts)
    joined = _START + rng.integers(0, _JOIN_SPAN, n_users)
    pace = _MEAN_GAP * rng.lognormal(0.0, 1.0, n_users)
    owner = np.repeat(np.arange(n_users), counts)
    gaps = np.ceil(rng.exponential(1.0, len(owner)) * pace[owner]).astype(np.int64) + 1
    elapsed = np.cumsum(gaps)
    first_row = np.concatenate([[0], np.cumsum(counts)[:-1]])
    before_user = elapsed[first_row] - gaps[first_row]
    return joined[owner] + elapsed - before_user[owner]


def _user_features(
    rng: np.random.Generator, region: np.ndarray, factors: np.ndarray
) -> pd.DataFrame:
    n_users = len(region)
    age = np.clip(np.round(rng.normal(34.0, 11.0, n_users) + 4.0 * factors[:, 0]), 13, 80)
    shares = rng.dirichlet(np.full(len(OCCUPATIONS), 2.0))
    occupation = np.asarray(OCCUPATIONS)[rng.choice(len(OCCUPATIONS), size=n_users, p=shares)]
    return pd.DataFrame(
        {
            "age": age.astype(np.int64),
            "occupation": pd.array(occupation, dtype="str"),
            "region": pd.array(np.char.add("r", region.astype(str)), dtype="str"),
        },
        index=pd.RangeIndex(n_users),
    )


def _item_features(
    rng: np.random.Generator, factors: np.ndarray, log_popularity: np.ndarray
) -> pd.DataFrame:
    n_items, n_factors = factors.shape
    loadings = rng.normal(0.0, 1.0, (n_factors, N_GENRES)) / math.sqrt(n_factors)
    score = factors @ loadings + rng.normal(0.0, 0.7, (n_items, N_GENRES))
    # Each genre gets its own prevalence; thresholds are quantiles so it holds exactly.
    prevalence = rng.uniform(0.08, 0.3, N_GENRES)
    flags = score > np.quantile(score, 1.0 - prevalence, axis=0).diagonal()
    features = pd.DataFrame(flags.astype(np.int8), columns=[f"genre_{g}" for g in range(N_GENRES)])
    era = 0.5 * factors[:, 0] + 0.3 * _standardise(log_popularity) + rng.normal(0.0, 0.8, n_items)
    features["year"] = pd.array(np.clip(np.round(1995 + 12 * era), 1920, 2024), dtype="Int64")
    return features
