"""The servable ranking recommender: retrieval (implicit ALS + item-kNN), then the LightGBM
re-ranker, top-K with a reason per item. Without a re-ranker it ranks by implicit ALS alone.

It holds no user data: a user is served from the history in the request, as in training. Saved as
``.npz`` + Parquet + JSON (LightGBM model strings inside JSON): nothing is unpickled on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy import sparse

from models.data.validate import USER_SIDE_FEATURES
from models.mf.recommend import top_k
from models.neural.network import Architecture, Params, load_network, save_network
from models.ranking.boosting import TreeEnsemble
from models.ranking.features import (
    GENRE_PREFIX,
    Candidates,
    Retrieval,
    candidate_features,
    check_user_features,
)
from models.ranking.knn import strongest_neighbour
from models.recommenders import (
    NO_HISTORY,
    UNKNOWN_ITEM,
    ServedItems,
    asked_items,
    best_first,
    check_requests,
    rows_matrix,
    title_column,
    trained_column,
)

KIND = "ranking"
# the retrieval models that can rank alone (without a re-ranker), as the reasons name them
BASES = {"ease": "EASE", "als": "implicit ALS"}
RESPONSE_COLUMNS = ("user_id", "rank", "item_id", "score", "reason")
# Features grouped by what they say about a recommendation; an explanation names the group whose
# summed pred_contrib raised the item's score most.
_REASONS = {
    "knn": ("similar to items you liked", ("knn_score", "knn_rank", "knn_max_similarity")),
    "als": ("matches your taste profile", ("als_score", "als_rank", "als_z", "als_gap")),
    "ease": (
        "often chosen together with items you liked",
        ("ease_score", "ease_rank", "ease_z", "ease_gap"),
    ),
    "nn": ("fits the pattern of your whole history", ("nn_score", "nn_rank", "nn_z", "nn_gap")),
    "slim": (
        "often chosen together with items you liked",
        ("slim_score", "slim_rank", "slim_z", "slim_gap"),
    ),
    "popularity": ("popular with everyone", ("item_popularity",)),
    "genre": ("in genres you often choose", ("genre_affinity",)),
    "year": ("from years you often choose", ("item_year",)),
    "people": ("popular with people like you", ("user_age", "user_gender", "user_occupation")),
    "activity": ("suits how active you are", ("user_activity",)),
}


@dataclass(frozen=True)
class RankingRecommender(ServedItems):
    """Retrieval plus an optional re-ranker, with the caller's item ids and titles.

    Attributes
    ----------
    retrieval : Retrieval
    ranker : TreeEnsemble or None
        None: rank by the ``base`` retrieval model's score alone.
    item_ids : ndarray of str
    titles : ndarray of str or None
        For explanations ("similar to <title> you liked"); item ids are used without them.
    positive_threshold : float or None
        A request's history rows rated below it are left out, as training left them out; None
        (or a history without ratings): every row is a positive.
    trained : ndarray of bool or None
        Whether training saw rows of each item. An item without any has nothing learned of it
        (no co-occurrence, factors from no data), so it is served as an unknown one: never
        recommended nor scored, ignored in a history. None: every item counts as trained.
    base : {"ease", "als"}
        The retrieval model that ranks without a re-ranker: EASE when the model has it (above
        implicit ALS on ML-100K's and ML-1M's held-out rows), else implicit ALS (a private run,
        or ``--ease-reg 0``). Models saved without it rank by implicit ALS, as they did.
    """

    kind: ClassVar[str] = KIND
    # request columns beyond user_id and history_items: the side features the re-ranker uses
    # when a request has them, the items to score, the history's ratings
    request_columns: ClassVar[tuple[str, ...]] = (*USER_SIDE_FEATURES, "items", "history_ratings")
    requirements: ClassVar[tuple[str, ...]] = ("numpy", "pandas", "scipy", "pyarrow", "lightgbm")

    retrieval: Retrieval
    ranker: TreeEnsemble | None
    item_ids: np.ndarray
    titles: np.ndarray | None = None
    positive_threshold: float | None = None
    trained: np.ndarray | None = None
    base: str = "als"

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"base={self.base!r}: allowed {', '.join(BASES)}")
        if self.base == "ease" and self.retrieval.ease is None:
            raise ValueError("base='ease' needs the retrieval's EASE weights")

    @property
    def _ranked_by(self) -> str:
        """What orders the candidates: the re-ranker, or the base retrieval model."""
        if self.ranker is not None and len(self.ranker):
            return "the re-ranker"
        return BASES[self.base]

    @property
    def n_items(self) -> int:
        return self.retrieval.n_items

    # --- scoring, shared by federated evaluation and serving -------------------------------
    def score_candidates(
        self,
        history: sparse.csr_matrix,
        exclude: sparse.csr_matrix,
        user_features: pd.DataFrame | None = None,
        users: np.ndarray | None = None,
        asked: sparse.csr_matrix | None = None,
    ) -> tuple[Candidates, np.ndarray]:
        """The candidates of each user (rows of ``history``), or the ``asked`` pairs, and their
        final scores."""
        candidates = candidate_features(
            self.retrieval, history, exclude, user_features, users, asked
        )
        if self.ranker is None or len(self.ranker) == 0:
            return candidates, candidates.features[f"{self.base}_score"].to_numpy()
        return candidates, self.ranker.predict(candidates.features)

    def score_matrix(
        self,
        history: sparse.csr_matrix,
        exclude: sparse.csr_matrix,
        users: np.ndarray,
        user_features: pd.DataFrame | None = None,
    ) -> np.ndarray:
        """(len(users), n_items) scores: candidates scored, everything else ``-inf``."""
        candidates, scores = self.score_candidates(history, exclude, user_features, users)
        out = np.full((len(users), self.n_items), -np.inf)
        row = np.searchsorted(users, candidates.users)
        out[row, candidates.items] = scores
        return out

    # --- serving ---------------------------------------------------------------------------
    def recommend(self, requests: pd.DataFrame, k: int = 10) -> pd.DataFrame:
        """Top-``k`` unseen items per request row (``user_id``, ``history_items``), with reasons.

        Optional columns ``age``, ``gender``, ``occupation`` feed the re-ranker. A history with no
        known item gets the most popular items, with score NaN and that reason. Past the
        candidates (``k`` above what the retrieval models' top-N give), a list goes on in the base
        retrieval model's order, with score NaN and that reason. A row with an
        ``items`` list gets those items scored instead, best first (``rank`` counts from 1 and
        ``k`` does not apply); an item it cannot score (unknown, already in the history, or a history with
        no known item) gets score NaN and the reason.
        """
        check_requests(requests, k)
        check_user_features(requests)
        index = self.served_index()
        read = self.request_histories(requests, self.positive_threshold)
        notes = [h.note for h in read]
        history = rows_matrix([h.positives for h in read], self.n_items)
        seen = rows_matrix([h.met for h in read], self.n_items)
        asks = [asked_items(requests, u) for u in range(len(requests))]
        asked = [a or [] for a in asks]
        has_history = np.diff(history.indptr) > 0
        ranked_users = np.flatnonzero(has_history & np.array([a is None for a in asks], dtype=bool))
        user_features = _request_user_features(requests)
        out: list[tuple[str, int, str, float, str]] = []
        by_user: dict[int, list[tuple[int, float, str]]] = {}
        if ranked_users.size:
            by_user = self._ranked_with_reasons(history, seen, user_features, ranked_users, k)
        scored = self._scored(history, seen, user_features, asked, index)
        for u, user in enumerate(requests["user_id"].astype(str)):
            if asks[u] is not None:
                for rank, (item, score, reason) in enumerate(
                    best_first(scored.get(u, [])), start=1
                ):
                    reason = "; ".join(filter(None, [reason, notes[u]]))
                    out.append((user, rank, item, score, reason))
                continue
            if u in by_user:
                ranked = by_user[u]
            else:
                excluded = seen[u].toarray().ravel() > 0  # rated below the threshold, say
                if self.trained is not None:
                    excluded |= ~self.trained
                best, _ = top_k(self.retrieval.popularity, excluded, k)
                # a popularity count is not a ranking score: NaN, the reason says why
                ranked = [(int(i), float("nan"), f"{NO_HISTORY}: most popular items") for i in best]
            for rank, (item, score, reason) in enumerate(ranked, start=1):
                reason = "; ".join(filter(None, [reason, notes[u]]))
                out.append((user, rank, str(self.item_ids[item]), score, reason))
        return pd.DataFrame(out, columns=list(RESPONSE_COLUMNS))

    def _scored(
        self,
        history: sparse.csr_matrix,
        seen: sparse.csr_matrix,
        user_features: pd.DataFrame | None,
        asked: list[list[str]],
        index: dict[str, int],
    ) -> dict[int, list[tuple[str, float, str]]]:
        """The asked items of each row, in order: (item id, score or NaN, why not scored).
        ``history`` holds each row's positives, ``seen`` every item of its history."""
        pairs = [(u, index[i]) for u, items in enumerate(asked) for i in items if i in index]
        users = np.array(sorted({u for u, _ in pairs if history[u].nnz}), dtype=np.int64)
        scores: dict[tuple[int, int], float] = {}
        by = self._ranked_by
        if users.size:
            matrix = sparse.csr_matrix(
                (np.ones(len(pairs)), tuple(np.array(pairs, dtype=np.int64).T)),
                shape=history.shape,
            )
            candidates, values = self.score_candidates(
                history, history, user_features, users, asked=matrix
            )
            met = np.asarray(seen[candidates.users, candidates.items]).ravel() > 0
            values = np.where(met, np.nan, values)
            keys = zip(candidates.users.tolist(), candidates.items.tolist(), strict=True)
            scores = dict(zip(keys, values.tolist(), strict=True))
        out: dict[int, list[tuple[str, float, str]]] = {}
        for u, items in enumerate(asked):
            for item in items:
                i = index.get(item)
                if i is None:
                    why, score = UNKNOWN_ITEM, float("nan")
                elif not history[u].nnz:
                    why, score = f"{NO_HISTORY}: not scored", float("nan")
                elif (u, i) not in scores or scores[(u, i)] != scores[(u, i)]:  # NaN: met
                    why, score = "in the history: not scored", float("nan")
                else:
                    why, score = f"asked: scored by {by}", scores[(u, i)]
                out.setdefault(u, []).append((item, score, why))
        return out

    def _ranked_with_reasons(
        self,
        history: sparse.csr_matrix,
        seen: sparse.csr_matrix,
        user_features: pd.DataFrame | None,
        users: np.ndarray,
        k: int,
    ) -> dict[int, list[tuple[int, float, str]]]:
        exclude = history  # the candidates and their features as training made them
        if self.trained is not None:  # an untrained item is never a candidate
            untrained = np.broadcast_to(~self.trained, history.shape).astype(np.float64)
            exclude = (history + sparse.csr_matrix(untrained)).tocsr()
        candidates, scores = self.score_candidates(history, exclude, user_features, users)
        # an item of the history below the positive threshold is a candidate, as it was in
        # training, but the user has met it: never recommended
        met = np.asarray(seen[candidates.users, candidates.items]).ravel() > 0
        top_rows = []
        bounds = np.searchsorted(candidates.users, users)
        bounds = np.append(bounds, len(candidates))
        for n in range(len(users)):
            lo, hi = bounds[n], bounds[n + 1]
            order = np.argsort(-scores[lo:hi], kind="stable")
            top_rows.append(lo + order[~met[lo:hi][order]][:k])
        chosen = np.concatenate(top_rows) if top_rows else np.zeros(0, dtype=np.int64)
        reasons = self._reasons(candidates, chosen, history)
        out: dict[int, list[tuple[int, float, str]]] = {}
        for row, reason in zip(chosen, reasons, strict=True):
            out.setdefault(int(candidates.users[row]), []).append(
                (int(candidates.items[row]), float(scores[row]), reason)
            )
        short = np.array([u for u in users if len(out.get(int(u), ())) < k], dtype=np.int64)
        if short.size:
            self._beyond_candidates(history, (exclude + seen).tocsr(), short, k, out)
        return out

    def _beyond_candidates(
        self,
        history: sparse.csr_matrix,
        exclude: sparse.csr_matrix,
        users: np.ndarray,
        k: int,
        out: dict[int, list[tuple[int, float, str]]],
    ) -> None:
        """Fill each of ``users``' lists up to ``k`` after its candidates, in the base retrieval
        model's order: the candidates' ranking is unchanged whatever ``k`` is. The re-ranker has
        not scored these items: score NaN, and the reason says so."""
        base = getattr(self.retrieval, f"{self.base}_scores")(history[users])
        why = f"beyond the {self.retrieval.n_candidates} candidates of each retrieval model: "
        why += f"ranked by {BASES[self.base]}, not scored"
        for n, u in enumerate(users.tolist()):
            listed = out.setdefault(u, [])
            excluded = exclude[u].toarray().ravel() > 0
            excluded[[item for item, _, _ in listed]] = True
            best, _ = top_k(base[n], excluded, k - len(listed))
            listed.extend((int(i), float("nan"), why) for i in best)

    def _reasons(
        self, candidates: Candidates, rows: np.ndarray, history: sparse.csr_matrix
    ) -> list[str]:
        """One short reason per chosen pair: the feature group that raises it most above the
        user's other recommendations (LightGBM's ``pred_contrib``), in words; kNN features name
        the history item behind them."""
        if rows.size == 0:
            return []
        neighbour = candidates.neighbour[rows]
        if self.retrieval.similarity is not None and np.any(neighbour < 0):
            missing = neighbour < 0
            found, _ = strongest_neighbour(
                history,
                self.retrieval.similarity,
                candidates.users[rows][missing],
                candidates.items[rows][missing],
            )
            neighbour = neighbour.copy()
            neighbour[missing] = found
        groups = list(_REASONS)
        if self.ranker is None or len(self.ranker) == 0:  # ranked by its base; name a neighbour
            top_group = ["knn" if n >= 0 else self.base for n in neighbour]
        else:
            contrib = self.ranker.contributions(candidates.features.iloc[rows])
            # an earlier version's ranker reads fewer features: its missing groups weigh 0
            position = {name: j for j, name in enumerate(self.ranker.features)}
            by_group = np.column_stack(
                [
                    contrib[:, [position[f] for f in _REASONS[g][1] if f in position]].sum(axis=1)
                    for g in groups
                ]
            )
            # What sets this item apart within the user's list: contributions relative to the
            # list's mean (the ALS score lifts every item of a list, so on its own it would be
            # the reason for nearly all of them).
            users = candidates.users[rows]
            for u in np.unique(users):
                mine = users == u
                by_group[mine] -= by_group[mine].mean(axis=0)
            # A group none of whose features a pair has (no network, no demographics) cannot be
            # its reason, even where every group it has pulls the item down.
            features = candidates.features.iloc[rows]
            absent = np.column_stack(
                [
                    features[[f for f in _REASONS[g][1] if f in features]].isna().all(axis=1)
                    for g in groups
                ]
            )
            by_group[absent] = -np.inf
            top_group = [groups[j] for j in by_group.argmax(axis=1)]
        reasons = []
        for group, near in zip(top_group, neighbour, strict=True):
            if group == "knn" and near >= 0:
                reasons.append(f"similar to {self.item_label(int(near))}, which you liked")
            else:
                reasons.append(_REASONS[group][0])
        return reasons

    # --- persistence -----------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        r = self.retrieval
        np.savez(folder / "retrieval.npz", item_factors=r.item_factors)
        if r.similarity is not None:
            sparse.save_npz(folder / "similarity.npz", r.similarity.tocsr())
        if r.ease is not None:
            np.savez(folder / "ease.npz", weights=r.ease)
        if r.slim is not None:
            sparse.save_npz(folder / "slim.npz", r.slim.tocsr())
        if r.network is not None:
            save_network(folder / "network.npz", *r.network)
        items = pd.DataFrame({"item_id": self.item_ids.astype(str), "popularity": r.popularity})
        items = self.with_item_columns(items)
        if r.item_features is not None:
            items = pd.concat([items, r.item_features.reset_index(drop=True)], axis=1)
        items.to_parquet(folder / "items.parquet", index=False)
        if self.ranker is not None:
            self.ranker.save(folder / "ranker.json")
        meta = {
            "kind": KIND,
            "format": 1,
            "reg": r.reg,
            "alpha": r.alpha,
            "n_candidates": r.n_candidates,
            "positive_threshold": self.positive_threshold,
            "base": self.base,
        }
        (folder / "recommender.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: str | Path) -> RankingRecommender:
        folder = Path(folder)
        meta = json.loads((folder / "recommender.json").read_text())
        if meta.get("kind") != KIND:
            raise ValueError(f"{folder}: not a ranking recommender (kind={meta.get('kind')!r})")
        with np.load(folder / "retrieval.npz", allow_pickle=False) as data:
            factors = data["item_factors"]
        similarity = None
        if (folder / "similarity.npz").exists():
            similarity = sparse.load_npz(folder / "similarity.npz").tocsr()
        ease = None
        if (folder / "ease.npz").exists():
            with np.load(folder / "ease.npz", allow_pickle=False) as data:
                ease = data["weights"]
        slim = None
        if (folder / "slim.npz").exists():
            slim = sparse.load_npz(folder / "slim.npz").tocsr()
        network = None
        if (folder / "network.npz").exists():
            network = load_network(folder / "network.npz")
        items = pd.read_parquet(folder / "items.parquet")
        feature_cols = [c for c in items.columns if c == "year" or c.startswith(GENRE_PREFIX)]
        retrieval = Retrieval(
            factors,
            float(meta["reg"]),
            float(meta["alpha"]),
            similarity,
            items["popularity"].to_numpy(np.float64),
            items[feature_cols] if feature_cols else None,
            int(meta["n_candidates"]),
            ease,
            network,
            slim,
        )
        ranker = (
            TreeEnsemble.load(folder / "ranker.json") if (folder / "ranker.json").exists() else None
        )
        threshold = meta.get("positive_threshold")  # absent from models saved before it was kept
        return cls(
            retrieval, ranker, items["item_id"].to_numpy(dtype=str), title_column(items),
            None if threshold is None else float(threshold), trained_column(items),
            meta.get("base", "als"),  # models saved before it was kept ranked by implicit ALS
        )  # fmt: skip


def align_recommender(model: RankingRecommender, item_ids: np.ndarray) -> RankingRecommender:
    """The same model re-indexed to another catalogue (ids compared as text): items it does not
    know get zero factors, no neighbours and no popularity, so it can be evaluated on today's data."""
    lookup = {str(item): i for i, item in enumerate(model.item_ids)}
    source = np.array([lookup.get(str(item), -1) for item in item_ids], dtype=np.int64)
    known = np.flatnonzero(source >= 0)
    pick = sparse.csr_matrix(
        (np.ones(known.size), (known, source[known])), shape=(len(item_ids), model.n_items)
    )  # today's index x the model's index
    r = model.retrieval
    factors = np.zeros((len(item_ids), r.item_factors.shape[1]))
    factors[known] = r.item_factors[source[known]]
    popularity = np.zeros(len(item_ids))
    popularity[known] = r.popularity[source[known]]
    similarity = None if r.similarity is None else (pick @ r.similarity @ pick.T).tocsr()
    ease = None if r.ease is None else np.asarray(pick @ (pick @ r.ease).T).T
    slim = None if r.slim is None else (pick @ r.slim @ pick.T).tocsr()
    features = None
    if r.item_features is not None:
        features = r.item_features.iloc[np.maximum(source, 0)].reset_index(drop=True)
        features.loc[source < 0, :] = np.nan
    titles = None
    if model.titles is not None:
        titles = np.where(source >= 0, model.titles[np.maximum(source, 0)], None)
    network = None if r.network is None else _align_network(*r.network, source)
    retrieval = Retrieval(
        factors, r.reg, r.alpha, similarity, popularity, features, r.n_candidates, ease, network,
        slim,
    )  # fmt: skip
    trained = None
    if model.trained is not None:  # an item it does not know is one it has not trained
        trained = (source >= 0) & model.trained[np.maximum(source, 0)]
    return RankingRecommender(
        retrieval, model.ranker, np.asarray(item_ids).astype(str), titles,
        model.positive_threshold, trained, model.base,
    )  # fmt: skip


def _align_network(
    params: Params, arch: Architecture, source: np.ndarray
) -> tuple[Params, Architecture]:
    """The network over another catalogue (``source``: the old index of each new item, -1 if
    unknown): unknown items are no input and get the lowest logit the old catalogue had."""
    known = source >= 0
    out = dict(params)
    first = params["enc0_w"]
    out["enc0_w"] = np.where(known[:, None], first[np.maximum(source, 0)], 0).astype(first.dtype)
    last = f"dec{len(arch.decoder_dims) - 2}"
    weights, bias = params[f"{last}_w"], params[f"{last}_b"]
    out[f"{last}_w"] = np.where(known[None, :], weights[:, np.maximum(source, 0)], 0).astype(
        weights.dtype
    )
    floor = bias.min() - 10.0 * (np.abs(weights).sum(axis=0).max() + 1.0)
    out[f"{last}_b"] = np.where(known, bias[np.maximum(source, 0)], floor).astype(bias.dtype)
    return out, replace(arch, n_items=source.size)


def _request_user_features(requests: pd.DataFrame) -> pd.DataFrame | None:
    present = [c for c in USER_SIDE_FEATURES if c in requests]
    return requests[present].reset_index(drop=True) if present else None
