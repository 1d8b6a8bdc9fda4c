"""Which extra features or LightGBM settings lift the re-ranker, measured on validation users held
out from it (ML-1M, the split and candidates of :mod:`benchmarks.ranking`).

The retrieval models are those of the two-stage benchmark (implicit ALS, item-kNN, EASE lambda
800; centralized ALS, which the federated one equals) and the candidates are the re-ranker's own
(``ranker_client_data``: history = training rows, label = the candidate is a validation row, for
every user: the folds below hold users out, not the selection users of ``fedrec train``). A
pooled LightGBM ranker with the benchmark's 100 trees (the federated one matches it on test) is
trained on the users of all folds but one and scores the held-out fold; validation NDCG@10 is
summed over every fold and divided by the users with a validation row, so users whose validation
items missed the candidates count as 0 and figures compare across candidate counts.

Feature groups added to :data:`~models.ranking.features.FEATURES` (each from training rows only):

- ``time``: the item's time centre and spread (per-item sums of timestamps), the user's training
  span, the item's count and share in the user's median time bin and in the user's active window,
  the share of the item's ratings before the user's median, the item's age at the user's median;
- ``seq``: items rated next to each other (within ``--seq-window`` positions in time) by the same
  user, cosine-normalised; per candidate the sum and the largest value over the history;
- ``more``: EASE at lambda 200 and 3200, EASE on the user-degree-weighted co-occurrences, RP3beta;
- ``ratings``: the item's mean rating and share of 5s among positives, the user's mean rating,
  EASE over a rating-weighted history and over the 5-star history;
- ``admm``: ADMM SLIM's score, rank and z-score (``--admm-*``); it and EASE 800 are also scored
  as single models over the full catalogue (``single_models`` in the JSON);
- ``profile``: the candidate's popularity and year standardised over the user's history, the
  user's means, the overlap of its genres with the user's genre distribution;
- ``gfcf``: GF-CF (Shen et al., CIKM 2021): the degree-normalised item-item filter
  ``R~^T R~`` (``R~ = D_u^-1/2 R D_i^-1/2``) plus ``--gfcf-alpha`` times the ideal low-pass
  filter of its top ``--gfcf-k`` eigenvectors; score, rank and z-score of the whole filter and
  of the low-pass part alone, both also scored as single models. It needs the co-occurrences
  weighted by each user's inverse history length and the item counts, sums the clients can
  send as they send ``X^T X``.

Label sets: ``pseudo`` trains the ranker on pseudo-validation queries only (``--pseudo-fraction``
of each user's training rows held out, ALS, kNN and EASE refitted on the rest, candidates built
the same way; the real validation and test rows stay unlabelled candidates), ``pseudo_valid`` on
those and the validation queries of the training folds. ``--slim-iterations N`` builds every set's
candidates with ADMM SLIM in the retrieval stage (:mod:`models.ranking.slim`, its ``slim_*``
features). Each set other than ``base`` reports its mean per-user difference from ``base`` and
that difference's standard error; ``--combine`` adds one more set, ``combined``, of the
named sets' features together (do the small gains add up?); ``--per-user`` writes the per-user figures for other pairings.
``--variants`` trains the ranker other ways on the base features (graded labels from the
validation row's rating, monotone constraints, DART, linear trees, LambdaRank on graded labels),
each with every ``--lgb-seeds`` seed on the same folds, against the base ranker with the same
seeds: the seed alone moves the ranker about as much as these variants do.

    uv run python -m benchmarks.ranking_ablation --sets base time seq more ratings
    uv run python -m benchmarks.ranking_ablation --sets base --trees 200     # LightGBM settings
    uv run python -m benchmarks.ranking_ablation --sets base --candidates 50
    uv run python -m benchmarks.ranking_ablation --sets base admm profile pseudo pseudo_valid
    uv run python -m benchmarks.ranking_ablation --sets base --slim-iterations 100
    uv run python -m benchmarks.ranking_ablation --sets base gfcf ratings profile \
        --combine gfcf ratings profile --slim-iterations 40
    uv run python -m benchmarks.ranking_ablation --sets base --slim-iterations 40 \
        --variants graded graded5 monotone dart linear_tree lambdarank_graded
"""

from __future__ import annotations

import argparse
import time

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy import sparse

from benchmarks.common import HelpFormatter, load_movielens, machine, write_json
from benchmarks.ranking import _pooled_train, recbole_split
from models.client import ClientData
from models.data.partitions import build_clients
from models.data.schema import Interactions, keep_positives
from models.data.sharding import assign_clients
from models.mf.implicit import CentralizedImplicitALS
from models.ranking.ease import ease_weights
from models.ranking.features import CATEGORICAL, FEATURES, Retrieval
from models.ranking.federated import (
    RankingConfig,
    knn_client_update,
    knn_server_update,
    ranker_client_data,
)
from models.ranking.knn import sum_cooccurrence
from models.ranking.recommender import RankingRecommender
from models.ranking.slim import SlimConfig, federated_slim_weights

DAY = 86400.0
FEATURE_SETS = ("time", "seq", "more", "ratings", "admm", "profile", "gfcf")


def _recommender(
    data: Interactions, clients: list[ClientData], args: argparse.Namespace
) -> RankingRecommender:
    """The benchmark's retrieval stage (ALS, item-kNN, EASE 800) fitted on the clients' training
    rows, as a recommender without a ranker."""
    config = RankingConfig()
    als = CentralizedImplicitALS(
        config.n_factors, reg=config.reg, alpha=config.alpha, n_iter=10,
        init_std=config.init_std, seed=args.seed,
    ).fit(_pooled_train(data, clients))  # fmt: skip
    updates = [knn_client_update(c, count_users=args.slim_iterations > 0) for c in clients]
    similarity, popularity = knn_server_update(updates, data.n_items, config)
    ease = ease_weights(sum_cooccurrence([u.arrays for u in updates], data.n_items), reg=800.0)
    slim = None
    if args.slim_iterations > 0:
        n_users = int(sum(u.metrics["users"] for u in updates))
        slim = federated_slim_weights(
            [u.arrays for u in updates], data.n_items, n_users,
            SlimConfig(iterations=args.slim_iterations),
        )  # fmt: skip
    catalogue = data.item_features.drop(columns=["title"])
    retrieval = Retrieval(
        als.item_params_.factors, config.reg, config.alpha, similarity, popularity, catalogue,
        args.candidates, ease, slim=slim,
    )  # fmt: skip
    return RankingRecommender(retrieval, None, data.item_ids.astype(str), None)


def pseudo_split(data: Interactions, split: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Split codes of a pseudo-validation world: ``fraction`` of each user's training rows (at
    least one, for users with 3 or more) become its labels (1), the rest its history (0); the
    real validation and test rows are unseen (2), so they stay unlabelled candidates."""
    users = data.frame["user"].to_numpy()
    train = np.flatnonzero(split == 0)
    rng = np.random.default_rng([seed, 8])
    order = train[np.lexsort((rng.random(train.size), users[train]))]
    u = users[order]
    start = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    counts = np.diff(np.r_[start, u.size])
    position = np.arange(u.size) - np.repeat(start, counts)
    held = np.where(counts >= 3, np.maximum(1, (counts * fraction).astype(int)), 0)
    out = np.full(split.shape, 2, dtype=np.int8)
    out[order] = np.where(position < np.repeat(held, counts), 1, 0)
    return out


def pseudo_candidates(args: argparse.Namespace) -> pd.DataFrame:
    """Training candidates of the pseudo-validation world (:func:`pseudo_split`): retrieval
    refitted on the remaining training rows, history = those rows, label = a held-out row."""
    data = keep_positives(load_movielens("ml-1m"), 3.0)
    split = pseudo_split(data, recbole_split(data, args.seed), args.pseudo_fraction, args.seed)
    owner = assign_clients(
        data, n_clients=args.clients, strategy="iid", rng=np.random.default_rng(args.seed)
    )
    clients = build_clients(data, owner, split)
    base = _recommender(data, clients, args)
    parts = []
    for c in clients:
        prepared = ranker_client_data(c, base, (), leave_out_selection=False)
        parts.append(
            prepared.train.features.assign(
                uid=c.user_ids[prepared.train.users], item=prepared.train.items,
                label=prepared.labels,
            )
        )  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def candidates(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Training candidates (label = validation row), test candidates (label = test row) and every
    row of the split (global user, item, split, timestamp, rating)."""
    data = keep_positives(load_movielens("ml-1m"), 3.0)
    split = recbole_split(data, args.seed)
    owner = assign_clients(
        data, n_clients=args.clients, strategy="iid", rng=np.random.default_rng(args.seed)
    )
    clients = build_clients(data, owner, split)
    base = _recommender(data, clients, args)
    train, test, rows = [], [], []
    for c in clients:
        prepared = ranker_client_data(c, base, ("test",), leave_out_selection=False)
        part = prepared.train.features.assign(
            uid=c.user_ids[prepared.train.users], item=prepared.train.items, label=prepared.labels
        )
        train.append(part)
        held, _ = prepared.splits["test"]
        labels = np.asarray(c.matrix("test")[held.users, held.items]).ravel() > 0
        test.append(held.features.assign(uid=c.user_ids[held.users], item=held.items, label=labels))
        f = c.frame
        rows.append(
            pd.DataFrame({
                "uid": c.user_ids[f["user"].to_numpy()], "item": f["item"].to_numpy(),
                "split": f["split"].to_numpy(), "timestamp": f["timestamp"].to_numpy(),
                "rating": f["rating"].to_numpy(),
            })
        )  # fmt: skip
    return (
        pd.concat(train, ignore_index=True),
        pd.concat(test, ignore_index=True),
        pd.concat(rows, ignore_index=True),
    )


def _ranks(scores: np.ndarray) -> np.ndarray:
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[1] + 1)[None, :], axis=1)
    return ranks


def _ease(gram: np.ndarray, reg: float) -> np.ndarray:
    gram = gram + reg * np.eye(gram.shape[0])
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights


class Training:
    """The pooled training rows as matrices, global users sorted."""

    def __init__(self, rows: pd.DataFrame) -> None:
        train = rows[rows["split"] == 0]
        self.n_items = int(rows["item"].max()) + 1
        self.users, self.row = np.unique(train["uid"].to_numpy(), return_inverse=True)
        self.items = train["item"].to_numpy()
        self.ratings = train["rating"].to_numpy(float)
        self.times = (train["timestamp"].to_numpy(float) - train["timestamp"].min()) / DAY
        self.uid = train["uid"].to_numpy()
        self.x = self.matrix(np.ones(self.items.size))
        self.seen = self.x.toarray() > 0
        self.single: dict[str, np.ndarray] = {}  # single models' full scores, by name

    def matrix(self, values: np.ndarray) -> sparse.csr_matrix:
        shape = (self.users.size, self.n_items)
        return sparse.csr_matrix((values, (self.row, self.items)), shape=shape)

    def gather(self, frames: list[pd.DataFrame], scores: dict[str, np.ndarray]) -> list[dict]:
        """Per frame, each named user x item score matrix's value, rank and per-user z-score."""
        outs = [{} for _ in frames]
        for name, s in scores.items():
            s = np.where(self.seen, -np.inf, np.asarray(s))
            ranks = _ranks(s)
            finite = np.isfinite(s)
            n = np.maximum(finite.sum(axis=1), 1)
            mean = np.where(finite, s, 0.0).sum(axis=1) / n
            std = np.sqrt((np.where(finite, s - mean[:, None], 0.0) ** 2).sum(axis=1) / n) + 1e-12
            for out, frame in zip(outs, frames, strict=True):
                r = np.searchsorted(self.users, frame["uid"].to_numpy())
                i = frame["item"].to_numpy()
                out[f"{name}_score"] = s[r, i]
                out[f"{name}_rank"] = ranks[r, i].astype(float)
                out[f"{name}_z"] = (s[r, i] - mean[r]) / std[r]
        return outs


def time_features(t: Training, frames: list[pd.DataFrame], bin_days: float) -> list[dict]:
    count = np.bincount(t.items, minlength=t.n_items).astype(float)
    mean = np.bincount(t.items, t.times, t.n_items) / np.maximum(count, 1)
    square = np.bincount(t.items, t.times**2, t.n_items) / np.maximum(count, 1)
    spread = np.sqrt(np.maximum(square - mean**2, 0.0))
    mean[count == 0] = np.nan
    n_bins = int(t.times.max() / bin_days) + 1
    hist = np.zeros((t.n_items, n_bins))
    np.add.at(hist, (t.items, (t.times / bin_days).astype(int)), 1.0)
    cum, total = np.cumsum(hist, axis=1), np.cumsum(hist.sum(axis=0))
    first = np.where(count > 0, (hist > 0).argmax(axis=1), 0) * bin_days
    by_user = pd.DataFrame({"uid": t.uid, "t": t.times}).groupby("uid")["t"]
    med, lo, hi = by_user.median(), by_user.min(), by_user.max()
    outs = []
    for frame in frames:
        u, i = frame["uid"].to_numpy(), frame["item"].to_numpy()
        m, a, b = med.loc[u].to_numpy(), lo.loc[u].to_numpy(), hi.loc[u].to_numpy()
        mb = np.clip((m / bin_days).astype(int), 0, n_bins - 1)
        ab = np.clip((a / bin_days).astype(int), 0, n_bins - 1)
        bb = np.clip((b / bin_days).astype(int), 0, n_bins - 1)
        below = np.where(ab > 0, cum[i, ab - 1], 0.0)
        window = cum[i, bb] - below
        window_total = total[bb] - np.where(ab > 0, total[ab - 1], 0.0)
        outs.append({
            "t_gap": m - mean[i], "t_item_spread": spread[i], "t_user_span": np.log1p(b - a),
            "t_bin_count": np.log1p(hist[i, mb]),
            "t_bin_share": hist[i, mb] / np.maximum(total[mb] - np.r_[0, total][mb], 1),
            "t_window_share": window / np.maximum(window_total, 1),
            "t_item_age": m - first[i], "t_before": cum[i, mb] / np.maximum(count[i], 1),
        })  # fmt: skip
    return outs


def sequence_features(t: Training, frames: list[pd.DataFrame], window: int) -> list[dict]:
    order = np.lexsort((t.items, t.times, t.uid))
    uid, items = t.uid[order], t.items[order]
    a, b = [], []
    for d in range(1, window + 1):
        same = uid[d:] == uid[:-d]
        a.append(items[:-d][same])
        b.append(items[d:][same])
    a, b = np.concatenate(a), np.concatenate(b)
    pairs = sparse.csr_matrix(
        (np.ones(2 * a.size), (np.r_[a, b], np.r_[b, a])), shape=(t.n_items, t.n_items)
    )
    norm = sparse.diags(1.0 / np.sqrt(np.maximum(np.asarray(t.x.sum(axis=0)).ravel(), 1)))
    cosine = (norm @ pairs @ norm).toarray()
    total = np.asarray(t.x @ cosine)
    outs = []
    for frame in frames:
        r = np.searchsorted(t.users, frame["uid"].to_numpy())
        i = frame["item"].to_numpy()
        largest = np.zeros(len(frame))
        for u in np.unique(r):
            at = np.flatnonzero(r == u)
            history = t.x.indices[t.x.indptr[u] : t.x.indptr[u + 1]]
            largest[at] = cosine[np.ix_(history, i[at])].max(axis=0)
        outs.append({"s_sum": total[r, i], "s_max": largest})
    return outs


def more_features(t: Training, frames: list[pd.DataFrame]) -> list[dict]:
    gram = (t.x.T @ t.x).toarray()
    degree = np.asarray(t.x.sum(axis=1)).ravel()
    weighted = (t.x.T @ sparse.diags(1.0 / degree) @ t.x).toarray()
    popularity = np.maximum(np.diag(gram), 1.0)
    rp3 = weighted / popularity[:, None] / popularity[None, :] ** 0.5
    np.fill_diagonal(rp3, 0.0)
    scores = {
        "m_ease200": t.x @ _ease(gram, 200.0),
        "m_ease3200": t.x @ _ease(gram, 3200.0),
        "m_wease": t.x @ _ease(weighted, 400.0),
        "m_rp3": t.x @ rp3,
    }
    return t.gather(frames, scores)


def rating_features(t: Training, frames: list[pd.DataFrame]) -> list[dict]:
    count = np.maximum(np.bincount(t.items, minlength=t.n_items), 1)
    item_mean = np.bincount(t.items, t.ratings, t.n_items) / count
    item_five = np.bincount(t.items, (t.ratings >= 5).astype(float), t.n_items) / count
    user_mean = (
        np.asarray(t.matrix(t.ratings).sum(axis=1)).ravel() / np.asarray(t.x.sum(axis=1)).ravel()
    )
    weights = _ease((t.x.T @ t.x).toarray(), 800.0)
    scores = {
        "r_ease_rated": t.matrix(t.ratings - 2.0) @ weights,
        "r_ease_five": t.matrix((t.ratings >= 5).astype(float)) @ weights,
    }
    outs = t.gather(frames, scores)
    for out, frame in zip(outs, frames, strict=True):
        i = frame["item"].to_numpy()
        r = np.searchsorted(t.users, frame["uid"].to_numpy())
        out |= {
            "r_item_mean": item_mean[i],
            "r_item_five": item_five[i],
            "r_user_mean": user_mean[r],
        }
    return outs


def admm_slim(
    gram: np.ndarray,
    item_means: np.ndarray,
    *,
    l1: float,
    l2: float,
    alpha: float,
    rho: float,
    iterations: int,
) -> np.ndarray:
    """ADMM SLIM (Steck et al., WSDM 2020) from the co-occurrences ``X^T X`` alone: non-negative,
    L1-sparse item weights with a zero diagonal, L2 ``l2 * mean_i^alpha`` per item (RecBole's
    form), ``iterations`` ADMM steps with penalty ``rho``."""
    n = gram.shape[0]
    p = np.linalg.inv(gram + np.diag(l2 * item_means**alpha + rho)).astype(np.float32)
    b_aux = (p @ gram).astype(np.float32)
    dual = np.zeros((n, n), dtype=np.float32)
    c = np.zeros((n, n), dtype=np.float32)
    diag_p = np.diag(p) + 1e-7
    for _ in range(iterations):
        b_tilde = b_aux + p @ (rho * c - dual)
        b = b_tilde - p * (np.diag(b_tilde) / diag_p)[None, :]
        c = np.maximum(b + dual / rho - l1 / rho, 0.0)
        dual += rho * (b - c)
    return c


def full_ndcg(t: Training, rows: pd.DataFrame, scores: np.ndarray, k: int = 10) -> dict:
    """A single model's NDCG@k over the full catalogue: validation (training items excluded) and,
    with test rows given, test (validation items excluded too), per user with a relevant row."""
    out = {}
    ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2))
    seen = t.seen.copy()
    for code, name in ((1, "valid"), (2, "test")):
        part = rows[rows["split"] == code]
        part = part[np.isin(part["uid"].to_numpy(), t.users)]
        if part.empty:
            continue
        relevant = (
            sparse.csr_matrix(
                (np.ones(len(part)), (np.searchsorted(t.users, part["uid"]), part["item"])),
                shape=seen.shape,
            ).toarray()
            > 0
        )
        masked = np.where(seen, -np.inf, scores)
        top = np.argpartition(-masked, k, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(masked, top, 1), 1), 1)
        gains = np.take_along_axis(relevant, top, 1) / np.log2(np.arange(k) + 2)
        n = relevant.sum(axis=1)
        users = n > 0
        ndcg = gains.sum(axis=1)[users] / ideal[np.minimum(n[users], k) - 1]
        out[f"{name}_ndcg_at_10"] = float(ndcg.mean())
        seen = seen | relevant
    return out


def admm_features(t: Training, frames: list[pd.DataFrame], args: argparse.Namespace) -> list[dict]:
    x = t.x.astype(np.float32)
    gram = (x.T @ x).toarray().astype(np.float64)
    means = np.asarray(t.x.mean(axis=0)).ravel()
    started = time.perf_counter()
    weights = admm_slim(
        gram, means, l1=args.admm_l1, l2=args.admm_l2, alpha=args.admm_alpha, rho=args.admm_rho,
        iterations=args.admm_iterations,
    )  # fmt: skip
    scores = np.asarray(x @ weights, dtype=np.float64)
    print(f"ADMM SLIM: {time.perf_counter() - started:.0f} s, "
          f"{(weights > 0).mean():.3f} of the weights non-zero", flush=True)  # fmt: skip
    t.single["admm"] = scores
    t.single["ease800"] = np.asarray(t.x @ _ease(gram, 800.0))
    return t.gather(frames, {"admm": scores})


def gfcf_features(t: Training, frames: list[pd.DataFrame], args: argparse.Namespace) -> list[dict]:
    started = time.perf_counter()
    user_degree = np.maximum(np.asarray(t.x.sum(axis=1)).ravel(), 1.0)
    item_degree = np.maximum(np.asarray(t.x.sum(axis=0)).ravel(), 1.0)
    # R~^T R~ = D_i^-1/2 (sum over users of x_u x_u^T / d_u) D_i^-1/2
    weighted = (t.x.T @ sparse.diags(1.0 / user_degree) @ t.x).toarray()
    scale = item_degree**-0.5
    normalised = weighted * scale[:, None] * scale[None, :]
    _, vectors = np.linalg.eigh(normalised)  # ascending eigenvalues
    top = vectors[:, -args.gfcf_k :]
    low_pass = (scale[:, None] * top) @ (top.T / scale[None, :])
    x = t.x.toarray()
    linear, ideal = x @ normalised, x @ low_pass
    scores = {"gfcf": linear + args.gfcf_alpha * ideal, "gfcf_lp": ideal}
    print(f"GF-CF: {time.perf_counter() - started:.0f} s", flush=True)
    t.single |= scores
    return t.gather(frames, scores)


def profile_features(t: Training, frames: list[pd.DataFrame]) -> list[dict]:
    """The candidate against the user's taste profile: its popularity and year standardised over
    the user's history, and the ALS-free genre overlap with the user's genre distribution."""
    catalogue = keep_positives(load_movielens("ml-1m"), 3.0).item_features
    year = pd.to_numeric(catalogue["year"], errors="coerce").to_numpy(float)
    genres = catalogue[[c for c in catalogue.columns if c.startswith("genre_")]].to_numpy(float)
    popularity = np.log1p(np.asarray(t.x.sum(axis=0)).ravel())
    count = np.asarray(t.x.sum(axis=1)).ravel()

    def moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(t.x @ np.nan_to_num(values)).ravel() / count
        square = np.asarray(t.x @ np.nan_to_num(values) ** 2).ravel() / count
        return mean, np.sqrt(np.maximum(square - mean**2, 0.0)) + 1e-6

    pop_mean, pop_std = moments(popularity)
    year_mean, year_std = moments(year)
    share = np.asarray(t.x @ genres) / count[:, None]
    share /= np.maximum(share.sum(axis=1, keepdims=True), 1e-12)
    outs = []
    for frame in frames:
        r = np.searchsorted(t.users, frame["uid"].to_numpy())
        i = frame["item"].to_numpy()
        item_genres = genres[i] / np.maximum(genres[i].sum(axis=1, keepdims=True), 1)
        outs.append({
            "p_user_pop": pop_mean[r], "p_pop_z": (popularity[i] - pop_mean[r]) / pop_std[r],
            "p_user_year": year_mean[r], "p_year_z": (year[i] - year_mean[r]) / year_std[r],
            "p_genre_dot": (share[r] * item_genres).sum(axis=1),
            "p_genre_max": (share[r] * (genres[i] > 0)).max(axis=1),
        })  # fmt: skip
    return outs


def _params(args: argparse.Namespace) -> dict[str, object]:
    return {
        "objective": args.objective, "metric": "none", "learning_rate": args.lr,
        "num_leaves": args.leaves, "min_data_in_leaf": args.min_leaf,
        "bagging_fraction": args.subsample, "bagging_freq": 1 if args.subsample < 1 else 0,
        "feature_fraction": args.subsample, "lambdarank_truncation_level": 20, "num_threads": 1,
        "deterministic": True, "force_row_wise": True, "seed": args.seed, "verbosity": -1,
    }  # fmt: skip


def _fit(
    frame: pd.DataFrame,
    columns: list[str],
    args: argparse.Namespace,
    label: str = "label",
    extra: dict[str, object] | None = None,
) -> lgb.Booster:
    """A pooled ranker on the frame's ``label`` column, with ``extra`` LightGBM parameters over
    :func:`_params`; query groups are the runs of equal ``qid`` (``uid`` without one), and rows
    of the pseudo-validation world (``qid`` < 0) weigh ``--pseudo-weight``."""
    query = frame["qid"] if "qid" in frame else frame["uid"]
    groups = query.groupby((query != query.shift()).cumsum(), sort=False).size().to_numpy()
    weight = None
    if "qid" in frame and args.pseudo_weight != 1.0:
        first = np.r_[0, np.cumsum(groups)[:-1]]
        weight = np.where(query.to_numpy()[first] < 0, args.pseudo_weight, 1.0)
    data = lgb.Dataset(
        frame[columns].to_numpy(float), label=frame[label].to_numpy(float), group=groups,
        weight=None if weight is None else np.repeat(weight, groups),
        feature_name=columns, categorical_feature=[c for c in CATEGORICAL if c in columns],
    )  # fmt: skip
    return lgb.train(_params(args) | (extra or {}), data, num_boost_round=args.trees)


def ndcg_users(
    frame: pd.DataFrame, scores: np.ndarray, n_relevant: pd.Series, k: int = 10
) -> pd.Series:
    """NDCG@k of each of the frame's users, the ideal DCG from all their relevant items."""
    ranked = (
        frame[["uid", "label"]].assign(s=scores).sort_values(["uid", "s"], ascending=[True, False])
    )
    position = ranked.groupby("uid").cumcount().to_numpy()
    top = ranked[position < k]
    gains = top["label"].to_numpy(float) / np.log2(position[position < k] + 2)
    dcg = pd.Series(gains, index=top["uid"].to_numpy()).groupby(level=0).sum()
    ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2))
    n = n_relevant.reindex(dcg.index).fillna(0).clip(upper=k).astype(int).to_numpy()
    return dcg / ideal[np.maximum(n - 1, 0)]


def ndcg_sum(frame: pd.DataFrame, scores: np.ndarray, n_relevant: pd.Series, k: int = 10) -> float:
    """Sum over the frame's users of NDCG@k, the ideal DCG from all their relevant items."""
    return float(ndcg_users(frame, scores, n_relevant, k).sum())


# Ways to train the ranker on the base features: (label column, LightGBM parameters); the
# ``grade*`` columns are graded labels from the validation row's rating (:func:`graded_labels`)
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "graded": ("grade", {}),
    "graded5": ("grade5", {}),
    "lambdarank_graded": ("grade", {"objective": "lambdarank", "label_gain": [0, 1, 2, 3]}),
    "monotone": ("label", {}),  # constraints set per feature in :func:`_variant`
    "dart": ("label", {"boosting": "dart", "drop_rate": 0.1}),
    "linear_tree": ("label", {"linear_tree": True}),
}


def graded_labels(train: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``train`` with graded labels of its validation candidates: ``grade`` = rating - 2 (ratings
    3, 4, 5 give 1, 2, 3), ``grade5`` = 2 for a 5 and 1 for a 3 or 4; 0 for the others."""
    valid = rows.loc[rows["split"] == 1, ["uid", "item", "rating"]]
    rating = train[["uid", "item"]].merge(valid, on=["uid", "item"], how="left")["rating"]
    labelled = train["label"].to_numpy() > 0
    if not np.array_equal(labelled, rating.notna().to_numpy()):
        raise AssertionError("the labelled candidates are not the validation rows")
    rating = rating.to_numpy(float)
    return train.assign(
        grade=np.where(labelled, rating - 2.0, 0.0),
        grade5=np.where(labelled, np.where(rating >= 5, 2.0, 1.0), 0.0),
    )


def _variant(name: str, columns: list[str], seed: int) -> tuple[str, dict[str, object]]:
    label, extra = VARIANTS.get(name, ("label", {}))  # "base": the script's own ranker
    if name == "monotone":  # up in every score, down in every rank (rank 1 is the best)
        extra = {"monotone_constraints": [
            1 if c.endswith("_score") else -1 if c.endswith("_rank") else 0 for c in columns
        ]}  # fmt: skip
    return label, extra | {"seed": seed}


def run_variants(
    args: argparse.Namespace, train: pd.DataFrame, rows: pd.DataFrame, folds: np.ndarray
) -> dict[str, dict[str, object]]:
    """``base`` and every ``--variants`` ranker on the base features, with each LightGBM seed of
    ``--lgb-seeds`` on the same folds: per variant its validation NDCG@10 per seed, the mean over
    the seeds, and the paired per-user difference of that mean from the base's mean."""
    train = graded_labels(train, rows)
    n_valid = rows[rows["split"] == 1].groupby("uid").size()
    columns = list(FEATURES)
    per_user: dict[str, list[pd.Series]] = {}
    for name in ["base", *args.variants]:
        for seed in args.lgb_seeds:
            started = time.perf_counter()
            label, extra = _variant(name, columns, seed)
            parts = []
            for f in range(args.folds):
                booster = _fit(train[folds != f], columns, args, label, extra)
                held = train[folds == f]
                parts.append(
                    ndcg_users(held, booster.predict(held[columns].to_numpy(float)), n_valid)
                )
            per_user.setdefault(name, []).append(
                pd.concat(parts).reindex(n_valid.index).fillna(0.0)
            )
            print(f"  {name}, LightGBM seed {seed}: {per_user[name][-1].mean():.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    base = sum(per_user["base"]) / len(args.lgb_seeds)
    out: dict[str, dict[str, object]] = {}
    for name, runs in per_user.items():
        mean = sum(runs) / len(runs)
        out[name] = {
            "valid_ndcg_at_10_by_seed": [float(r.mean()) for r in runs],
            "valid_ndcg_at_10": float(mean.mean()),
        }
        if name != "base":
            diff = mean - base
            out[name]["valid_gain_vs_base"] = float(diff.mean())
            out[name]["paired_se"] = float(diff.std(ddof=1) / np.sqrt(diff.size))
    return out


def _with_pseudo(pseudo: pd.DataFrame, labelled: pd.DataFrame) -> pd.DataFrame:
    """Pseudo-validation queries (``qid`` = -1 - user) followed by the labelled ones."""
    return pd.concat(
        [pseudo.assign(qid=-1 - pseudo["uid"]), labelled.assign(qid=labelled["uid"])],
        ignore_index=True,
    )


def run(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    started = time.perf_counter()
    train, test, rows = candidates(args)
    print(f"candidates: {len(train)} training rows, {len(test)} test rows "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    pseudo = None
    if {"pseudo", "pseudo_valid"} & set(args.sets):
        pseudo = pseudo_candidates(args)
        print(f"pseudo candidates: {len(pseudo)} rows, {pseudo['label'].sum():.0f} labels "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    t = Training(rows)
    groups = {"base": [], "pseudo": [], "pseudo_valid": []}
    builders = {
        "time": lambda f: time_features(t, f, args.bin_days),
        "seq": lambda f: sequence_features(t, f, args.seq_window),
        "more": lambda f: more_features(t, f),
        "ratings": lambda f: rating_features(t, f),
        "admm": lambda f: admm_features(t, f, args),
        "profile": lambda f: profile_features(t, f),
        "gfcf": lambda f: gfcf_features(t, f, args),
    }
    for name in args.sets:
        if name in builders:
            extra_train, extra_test = builders[name]([train, test])
            train = train.assign(**extra_train)
            test = test.assign(**extra_test)
            groups[name] = list(extra_train)
    names = list(args.sets)
    if args.combine:
        groups["combined"] = [c for name in args.combine for c in groups[name]]
        names.append("combined")
    single = {}
    for name, scores in t.single.items():
        single[name] = full_ndcg(t, rows if args.test else rows[rows["split"] != 2], scores)
        print(f"  single model {name}: {single[name]}", flush=True)
    n_valid = rows[rows["split"] == 1].groupby("uid").size()
    n_test = rows[rows["split"] == 2].groupby("uid").size()
    users = train["uid"].unique()
    fold = pd.Series(np.random.default_rng(args.seed).integers(0, args.folds, users.size), users)
    fold_of_row = fold.loc[train["uid"].to_numpy()].to_numpy()
    out, per_user = {}, {}
    for name in names:
        columns = list(FEATURES) + groups[name]
        parts = []
        if name == "pseudo":
            booster = _fit(_with_pseudo(pseudo, train.iloc[:0]), columns, args)
            parts.append(
                ndcg_users(train, booster.predict(train[columns].to_numpy(float)), n_valid)
            )
        else:
            for f in range(args.folds):
                labelled = train[fold_of_row != f]
                if name == "pseudo_valid":
                    labelled = _with_pseudo(pseudo, labelled)
                booster = _fit(labelled, columns, args)
                held = train[fold_of_row == f]
                parts.append(
                    ndcg_users(held, booster.predict(held[columns].to_numpy(float)), n_valid)
                )
        per_user[name] = pd.concat(parts).reindex(n_valid.index).fillna(0.0)
        out[name] = {"valid_ndcg_at_10": float(per_user[name].mean())}
        if name != "base" and "base" in per_user:
            diff = per_user[name] - per_user["base"]
            out[name]["valid_gain_vs_base"] = float(diff.mean())
            out[name]["paired_se"] = float(diff.std(ddof=1) / np.sqrt(diff.size))
        if args.test:
            final = {"pseudo": train.iloc[:0], "pseudo_valid": train}
            booster = _fit(
                _with_pseudo(pseudo, final[name]) if name in final else train, columns, args
            )
            scores = booster.predict(test[columns].to_numpy(float))
            out[name]["test_ndcg_at_10"] = ndcg_sum(test, scores, n_test) / len(n_test)
        print(f"  {name}: {out[name]}", flush=True)
    if args.per_user:
        pd.DataFrame(per_user).rename_axis("uid").to_csv(args.per_user)
    variants = run_variants(args, train, rows, fold_of_row) if args.variants else {}
    return out, single, variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["base", "time", "seq", "more", "ratings"],
                        choices=["base", *FEATURE_SETS, "pseudo", "pseudo_valid"])  # fmt: skip
    parser.add_argument(
        "--combine", nargs="+", default=[], choices=list(FEATURE_SETS),
        help="also evaluate one more set, `combined`: the features of these sets together "
        "(each must be in --sets too)",
    )  # fmt: skip
    parser.add_argument("--gfcf-k", type=int, default=256, help="eigenvectors of `gfcf`'s low pass")
    parser.add_argument("--gfcf-alpha", type=float, default=0.3, help="weight of the low pass")
    parser.add_argument(
        "--slim-iterations", type=int, default=0,
        help="ADMM SLIM (models/ranking/slim.py) as a retrieval model: candidates and slim_* "
        "features of every set (0: none)",
    )  # fmt: skip
    parser.add_argument("--admm-l1", type=float, default=5.0)
    parser.add_argument("--admm-l2", type=float, default=5000.0)
    parser.add_argument("--admm-alpha", type=float, default=1.0)
    parser.add_argument("--admm-rho", type=float, default=4000.0)
    parser.add_argument("--admm-iterations", type=int, default=100)
    parser.add_argument(
        "--pseudo-fraction",
        type=float,
        default=1 / 8,
        help="share of each user's training rows held out as pseudo labels",
    )
    parser.add_argument(
        "--pseudo-weight",
        type=float,
        default=1.0,
        help="weight of a pseudo-validation query against a validation one",
    )
    parser.add_argument("--candidates", type=int, default=RankingConfig.n_candidates)
    parser.add_argument("--objective", default="rank_xendcg", choices=["rank_xendcg", "lambdarank"])
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--leaves", type=int, default=31)
    parser.add_argument("--min-leaf", type=int, default=200)
    parser.add_argument("--subsample", type=float, default=0.8)
    parser.add_argument(
        "--variants", nargs="+", default=[], choices=list(VARIANTS),
        help="other ways to train the ranker on the base features (graded labels, monotone "
        "constraints, DART, linear trees), each against base with every --lgb-seeds seed",
    )  # fmt: skip
    parser.add_argument("--lgb-seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--bin-days", type=float, default=30.0, help="time bins of `time`")
    parser.add_argument("--seq-window", type=int, default=1, help="positions apart for `seq`")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", action="store_true", help="also train on every user, score test")
    parser.add_argument("--out", default="ranking_ablation_ml-1m")
    parser.add_argument(
        "--per-user",
        default=None,
        help="CSV of each set's per-user validation NDCG@10, for pairing",
    )
    args = parser.parse_args()
    if not set(args.combine) <= set(args.sets):
        parser.error("--combine names sets that are not in --sets")
    if load_movielens("ml-1m") is None:
        return
    result, single, variants = run(args)
    path = write_json(
        args.out,
        {"args": vars(args), "machine": machine(), "sets": result, "single_models": single,
         "ranker_variants": variants},
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
