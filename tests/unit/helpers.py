"""Small datasets with known structure for unit tests (no files, no services)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from models.data.schema import Interactions, encode_interactions


def low_rank_interactions(
    n_users: int = 60,
    n_items: int = 40,
    density: float = 0.5,
    rank: int = 3,
    seed: int = 0,
    noise: float = 0.0,
) -> Interactions:
    """Ratings from an exact rank-``rank`` model plus optional noise, on a random subset of cells."""
    rng = np.random.default_rng(seed)
    p = rng.normal(0, 1, (n_users, rank))
    q = rng.normal(0, 1, (n_items, rank))
    full = 3.0 + 0.5 * p @ q.T / np.sqrt(rank) + noise * rng.normal(size=(n_users, n_items))
    mask = rng.random((n_users, n_items)) < density
    mask[np.arange(n_users), rng.integers(0, n_items, n_users)] = True  # every user has a row
    mask[rng.integers(0, n_users, n_items), np.arange(n_items)] = True  # every item has a row
    u, i = np.nonzero(mask)
    frame = pd.DataFrame(
        {
            "user": u + 1000,
            "item": i + 1,
            "rating": full[u, i],
            "timestamp": rng.integers(10**9, 2 * 10**9, u.size),
        }
    )
    return encode_interactions(frame, rating_scale=None, source="low_rank")


def pooled_train_matrix(data, clients) -> sparse.csr_matrix:
    """The binary users x items matrix of every client's training rows, pooled (the centralized
    model's input), rows in ``data``'s user order."""
    rows, cols = [], []
    for c in clients:
        m = c.matrix("train").tocoo()
        rows.append(np.searchsorted(data.user_ids, c.user_ids[m.row]))
        cols.append(m.col)
    r, c = np.concatenate(rows), np.concatenate(cols)
    return sparse.csr_matrix((np.ones(r.size), (r, c)), shape=(data.n_users, data.n_items))


def without_met(answer: pd.DataFrame, met: dict[str, set[str]], k: int) -> pd.DataFrame:
    """A top-K answer (``user_id``, ``rank``, ``item_id``, ...) with each user's ``met`` items
    taken out, cut to ``k`` per user and ranked again from 1: what a model that never
    recommends a history item, positive or not, answers when asked for more than ``k``."""
    kept = answer[[item not in met.get(user, set())
                   for user, item in zip(answer.user_id, answer.item_id, strict=True)]]  # fmt: skip
    kept = kept.groupby("user_id", sort=False).head(k).copy()
    kept["rank"] = kept.groupby("user_id", sort=False).cumcount() + 1
    return kept.reset_index(drop=True)
