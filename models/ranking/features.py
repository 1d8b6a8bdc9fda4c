"""The retrieval stage and the re-ranker's features, computed on a client from its own rows.

Candidates are the union of each retrieval model's top-N unseen items (implicit ALS, item-kNN,
and EASE and the Mult-DAE network where the retrieval state has them). ADMM SLIM, where present,
scores these candidates (``slim_*`` features) but adds none: its weights are sparse, so for a short
history most items tie at 0 and its top-N is partly arbitrary (on held-out ML-1M validation users
SLIM as a source as well lowered NDCG@10 by 0.0018, 2.2 paired standard errors).
Each (user, candidate) pair gets the features in :data:`FEATURES`; side features the data does not
have are NaN, which LightGBM treats as missing, so one feature set serves every dataset.

Besides each model's raw score and rank among the user's unseen items, ``*_z`` is the score
standardised over the user's unseen items and ``*_gap`` its distance below the user's best, in the
same standard deviations: a tree's threshold on them means the same for every user, where raw
scores drift with the length of a history.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from models.data.validate import USER_FEATURE_VALUES, is_blank, user_feature_known
from models.mf.als import RatingRows
from models.mf.implicit import solve_users_implicit
from models.mf.params import ItemParams
from models.neural.network import Architecture, Params, logits
from models.ranking.ease import ease_scores
from models.ranking.knn import knn_scores
from models.ranking.slim import slim_scores

FEATURES = (
    "als_score",
    "als_rank",
    "knn_score",
    "knn_rank",
    "knn_max_similarity",
    "ease_score",
    "ease_rank",
    "nn_score",
    "nn_rank",
    "als_z",
    "als_gap",
    "ease_z",
    "ease_gap",
    "nn_z",
    "nn_gap",
    "slim_score",
    "slim_rank",
    "slim_z",
    "slim_gap",
    "item_popularity",
    "user_activity",
    "genre_affinity",
    "item_year",
    "user_age",
    "user_gender",
    "user_occupation",
)
CATEGORICAL = ("user_gender", "user_occupation")
GENRE_PREFIX = "genre_"


def check_user_features(requests: pd.DataFrame) -> None:
    """Refuse request rows whose ``age`` or ``gender`` holds a value the re-ranker cannot read.

    Raises
    ------
    RequestError
        Naming the request row (0-based), its user, the column, the value and what is allowed.
    """
    from models.recommenders import RequestError

    for column, allowed in USER_FEATURE_VALUES.items():
        if column not in requests:
            continue
        for row, value in enumerate(requests[column]):
            if is_blank(value) or user_feature_known(column, value):
                continue
            user = requests["user_id"].iloc[row]
            raise RequestError(
                f"request row {row} (user {str(user)!r}): {column} {value!r} is not a valid "
                f"{column}; allowed: {allowed}"
            )


@dataclass(frozen=True)
class Retrieval:
    """The retrieval stage's global state: nothing in it belongs to a user.

    Attributes
    ----------
    item_factors : ndarray (n_items, k)
        Implicit-ALS item factors.
    reg, alpha : float
        The ridge and confidence scale used to fold a user in.
    similarity : csr_matrix (n_items, n_items) or None
        Column ``i``: the kNN neighbours of item ``i`` with their cosine similarity.
    popularity : ndarray (n_items,)
        Training interactions per item (summed client counts).
    item_features : DataFrame or None
        Public catalogue features by item index: ``year`` and ``genre_*`` flags where known.
    n_candidates : int
        N of each retrieval model's top-N.
    ease : ndarray (n_items, n_items) or None
        EASE's item-item weights ``B`` (:mod:`models.ranking.ease`), from the same summed
        co-occurrences as the kNN similarity.
    network : (params, Architecture) or None
        A Mult-DAE/Mult-VAE network (:mod:`models.neural.network`) trained by FedAvg; its logits
        over the catalogue are the ``nn_*`` features.
    slim : csr_matrix (n_items, n_items) or None
        ADMM SLIM's sparse item-item weights (:mod:`models.ranking.slim`), from the same summed
        co-occurrences; its scores of the other models' candidates are the ``slim_*`` features.
    """

    item_factors: np.ndarray
    reg: float
    alpha: float
    similarity: sparse.csr_matrix | None
    popularity: np.ndarray
    item_features: pd.DataFrame | None = None
    n_candidates: int = 100
    ease: np.ndarray | None = None
    network: tuple[Params, Architecture] | None = None
    slim: sparse.csr_matrix | None = None

    @property
    def n_items(self) -> int:
        return self.item_factors.shape[0]

    def als_scores(self, history: sparse.csr_matrix) -> np.ndarray:
        """Fold each user in from its history (implicit ALS), score every item."""
        coo = history.tocoo()
        rows = RatingRows(
            coo.row, coo.col, np.ones(coo.nnz), n_users=history.shape[0], n_items=self.n_items
        )
        params = ItemParams(self.item_factors, np.zeros(self.n_items), 0.0)
        users = solve_users_implicit(rows, params, reg=self.reg, alpha=self.alpha)
        return users.factors @ self.item_factors.T

    def knn_scores(self, history: sparse.csr_matrix) -> np.ndarray | None:
        return None if self.similarity is None else knn_scores(history, self.similarity)

    def ease_scores(self, history: sparse.csr_matrix) -> np.ndarray | None:
        return None if self.ease is None else ease_scores(history, self.ease)

    def slim_scores(self, history: sparse.csr_matrix) -> np.ndarray | None:
        return None if self.slim is None else slim_scores(history, self.slim)

    def nn_scores(self, history: sparse.csr_matrix) -> np.ndarray | None:
        """The network's logits of every item for each row of ``history`` (None without one)."""
        if self.network is None:
            return None
        params, arch = self.network
        out = np.empty(history.shape)
        for lo in range(0, history.shape[0], 1000):  # bounded memory for many users
            out[lo : lo + 1000] = logits(params, arch, history[lo : lo + 1000])
        return out


@dataclass(frozen=True)
class Candidates:
    """Candidate (user, item) pairs grouped by user, with their features.

    ``users`` index the rows of the history matrix; pairs of one user are contiguous, so
    ``group_sizes`` gives LightGBM's query groups. ``neighbour`` is the history item that adds most
    to the pair's kNN score (-1 if none): the "similar to ... you liked" of an explanation.
    """

    users: np.ndarray
    items: np.ndarray
    features: pd.DataFrame
    neighbour: np.ndarray

    @property
    def group_sizes(self) -> np.ndarray:
        _, sizes = np.unique(self.users, return_counts=True)
        return sizes

    def __len__(self) -> int:
        return self.users.size


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    n = min(n, scores.shape[1])
    return np.argpartition(-scores, n - 1, axis=1)[:, :n]


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every item in each row, best first."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[1] + 1)[None, :], axis=1)
    return ranks


def _standardized(
    scores: np.ndarray, rows: np.ndarray, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: the score standardised over its user's finite (unseen) scores, and its distance
    below the user's best in the same units."""
    finite = np.isfinite(scores)
    n = np.maximum(finite.sum(axis=1), 1)
    mean = np.where(finite, scores, 0.0).sum(axis=1) / n
    centred = np.where(finite, scores - mean[:, None], 0.0)
    std = np.sqrt((centred**2).sum(axis=1) / n) + 1e-12
    best = scores.max(axis=1)
    value = scores[rows, items]
    return (value - mean[rows]) / std[rows], (best[rows] - value) / std[rows]


def _category_code(value: object) -> float:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    try:  # numeric codes (ML-1M's occupation), whether sent as numbers or as text
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float(zlib.crc32(str(value).encode()) % 1000)


def _user_columns(user_features: pd.DataFrame | None, n_users: int) -> dict[str, np.ndarray]:
    out = {
        name: np.full(n_users, np.nan) for name in ("user_age", "user_gender", "user_occupation")
    }
    if user_features is None:
        return out
    if "age" in user_features:
        out["user_age"] = pd.to_numeric(user_features["age"], errors="coerce").to_numpy(float)
    if "gender" in user_features:
        gender = user_features["gender"].astype(str).str.upper()
        out["user_gender"] = gender.map({"M": 0.0, "F": 1.0}).to_numpy(float)
    if "occupation" in user_features:
        out["user_occupation"] = np.array(
            [_category_code(v) for v in user_features["occupation"]], dtype=float
        )
    return out


def candidate_features(
    retrieval: Retrieval,
    history: sparse.csr_matrix,
    exclude: sparse.csr_matrix,
    user_features: pd.DataFrame | None = None,
    users: np.ndarray | None = None,
    asked: sparse.csr_matrix | None = None,
) -> Candidates:
    """Candidates and features for the users (rows) of ``history``.

    Parameters
    ----------
    history : csr_matrix (n_users, n_items)
        What each user interacted with: the retrieval models' input.
    exclude : csr_matrix (n_users, n_items)
        Items never to recommend (at least the history).
    user_features : DataFrame or None
        Rows aligned with ``history``: ``age``, ``gender``, ``occupation`` where known.
    users : ndarray or None
        Only these rows (default: every row with a history).
    asked : csr_matrix (n_users, n_items) or None
        Pairs to score instead of the retrieval models' candidates (those not in ``exclude``).
    """
    history = history.tocsr()
    n_items = history.shape[1]
    if users is None:
        users = np.flatnonzero(np.diff(history.indptr) > 0)
    users = np.asarray(users, dtype=np.int64)
    hist = history[users]
    seen = exclude.tocsr()[users].toarray() > 0
    als = np.where(seen, -np.inf, retrieval.als_scores(hist))
    knn_raw = retrieval.knn_scores(hist)
    knn = None if knn_raw is None else np.where(seen, -np.inf, knn_raw)
    ease_raw = retrieval.ease_scores(hist)
    ease = None if ease_raw is None else np.where(seen, -np.inf, ease_raw)
    nn_raw = retrieval.nn_scores(hist)
    nn = None if nn_raw is None else np.where(seen, -np.inf, nn_raw)
    slim_raw = retrieval.slim_scores(hist)
    slim = None if slim_raw is None else np.where(seen, -np.inf, slim_raw)
    n = retrieval.n_candidates
    if asked is not None:
        picked = asked.tocsr()[users].toarray() > 0
    else:
        picked = np.zeros((len(users), n_items), dtype=bool)
        for source in (als, knn, ease, nn):
            if source is not None:
                np.put_along_axis(picked, _top(source, n), True, axis=1)
    picked &= ~seen
    rows, items = np.nonzero(picked)  # row-major: each user's pairs are contiguous
    columns: dict[str, np.ndarray] = {
        "als_score": als[rows, items],
        "als_rank": _ranks(als)[rows, items].astype(float),
    }
    if knn is not None:
        columns["knn_score"] = knn[rows, items]
        columns["knn_rank"] = _ranks(knn)[rows, items].astype(float)
        max_sim, neighbour = _max_similarity(hist, retrieval.similarity, rows, items)
        columns["knn_max_similarity"] = max_sim
    else:
        neighbour = np.full(rows.size, -1, dtype=np.int64)
        for name in ("knn_score", "knn_rank", "knn_max_similarity"):
            columns[name] = np.full(rows.size, np.nan)
    if ease is not None:
        columns["ease_score"] = ease[rows, items]
        columns["ease_rank"] = _ranks(ease)[rows, items].astype(float)
    else:
        columns["ease_score"] = columns["ease_rank"] = np.full(rows.size, np.nan)
    for name, scores in (("nn", nn), ("slim", slim)):
        if scores is not None:
            columns[f"{name}_score"] = scores[rows, items]
            columns[f"{name}_rank"] = _ranks(scores)[rows, items].astype(float)
        else:
            columns[f"{name}_score"] = columns[f"{name}_rank"] = np.full(rows.size, np.nan)
    for name, scores in (("als", als), ("ease", ease), ("nn", nn), ("slim", slim)):
        if scores is None:
            columns[f"{name}_z"] = columns[f"{name}_gap"] = np.full(rows.size, np.nan)
        else:
            columns[f"{name}_z"], columns[f"{name}_gap"] = _standardized(scores, rows, items)
    columns["item_popularity"] = np.log1p(retrieval.popularity[items])
    activity = np.diff(hist.indptr).astype(float)
    columns["user_activity"] = np.log1p(activity[rows])
    columns["genre_affinity"], columns["item_year"] = _item_columns(retrieval, hist, rows, items)
    per_user = _user_columns(
        None if user_features is None else user_features.iloc[users].reset_index(drop=True),
        len(users),
    )
    for name, values in per_user.items():
        columns[name] = values[rows]
    features = pd.DataFrame({name: columns[name] for name in FEATURES})
    return Candidates(users[rows], items.astype(np.int64), features, neighbour)


def _max_similarity(
    hist: sparse.csr_matrix, similarity: sparse.csr_matrix, rows: np.ndarray, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: the largest ``sim[j, item]`` over history items ``j``, and that ``j``."""
    max_sim = np.zeros(rows.size)
    neighbour = np.full(rows.size, -1, dtype=np.int64)
    bounds = np.searchsorted(rows, np.arange(hist.shape[0] + 1))
    for u in range(hist.shape[0]):
        lo, hi = bounds[u], bounds[u + 1]
        if lo == hi:
            continue
        sources = hist.indices[hist.indptr[u] : hist.indptr[u + 1]]
        if sources.size == 0:
            continue
        block = similarity[sources].toarray()[:, items[lo:hi]]  # (history, candidates)
        best = block.argmax(axis=0)
        values = block[best, np.arange(hi - lo)]
        max_sim[lo:hi] = values
        neighbour[lo:hi] = np.where(values > 0, sources[best], -1)
    return max_sim, neighbour


def _item_columns(
    retrieval: Retrieval, hist: sparse.csr_matrix, rows: np.ndarray, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Genre affinity (the share of the user's history in the item's genres, averaged over the
    item's genres) and the item's year; NaN without item features."""
    catalogue = retrieval.item_features
    nan = np.full(rows.size, np.nan)
    if catalogue is None:
        return nan, nan
    year = (
        pd.to_numeric(catalogue["year"], errors="coerce").to_numpy(float)[items]
        if "year" in catalogue
        else nan
    )
    genre_cols = [c for c in catalogue.columns if c.startswith(GENRE_PREFIX)]
    if not genre_cols:
        return nan, year
    genres = catalogue[genre_cols].to_numpy(float)  # (n_items, g)
    binary = hist.copy().astype(float)
    binary.data[:] = 1.0
    share = np.asarray(binary @ genres)  # (users, g): history items per genre
    share /= np.maximum(np.diff(hist.indptr), 1)[:, None]
    item_genres = genres[items]
    n_genres = item_genres.sum(axis=1)
    affinity = (share[rows] * item_genres).sum(axis=1) / np.maximum(n_genres, 1)
    return np.where(n_genres > 0, affinity, np.nan), year
