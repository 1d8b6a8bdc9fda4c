"""Federated two-stage training: what a client computes and what the server does with it, for
implicit ALS, item-kNN and the LightGBM re-ranker, plus the plain loop without orchestration.

Every client payload is a :class:`~models.protocol.ClientUpdate` of arrays and metric sums:

- implicit ALS: per-item ``gram``/``rhs`` sums over its observed rows, and ``user_gram`` (one k x k
  sum over its users);
- item-kNN (and EASE, ADMM SLIM): the upper triangle of its item co-occurrence counts
  (``pair_*``) and, for ADMM SLIM only, in ``metrics`` its number of users with training rows
  (``users``);
- re-ranker: its new trees as the UTF-8 bytes of a LightGBM model string (``trees``) and how many
  query groups they were fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import sparse

from models.aggregation import aggregate_item_sums
from models.client import SELECT, ClientData
from models.federation.evaluation import (
    Evaluation,
    evaluate_scores,
    exclude_seen,
    ranking_evaluation,
    summarize_splits,
)
from models.federation.loop import run_family
from models.mf.als import ItemStatistics, RatingRows
from models.mf.implicit import implicit_statistics, solve_items_implicit, solve_users_implicit
from models.mf.params import ItemParams, init_item_params
from models.neural.family import NeuralConfig
from models.privacy.dp import (
    UserLevelDP,
    clipped_implicit_statistics,
    limit_items,
    noisy_dense,
    noisy_gram,
)
from models.protocol import ClientUpdate
from models.ranking.boosting import RankerConfig, TreeEnsemble, boost_client, round_weights
from models.ranking.features import Candidates
from models.ranking.knn import cooccurrence, cosine_neighbours, pack_cooccurrence, sum_cooccurrence
from models.ranking.recommender import RankingRecommender
from models.ranking.slim import SlimConfig


@dataclass(frozen=True)
class RankingConfig:
    """Hyperparameters of the two-stage recommender (implicit feedback)."""

    n_factors: int = 64
    reg: float = 50.0  # reg and alpha picked on ML-1M's validation rows (benchmarks/README.md)
    alpha: float = 2.0
    init_std: float = 0.01
    neighbours: int = 200
    shrink: float = 10.0
    n_candidates: int = 100
    # EASE's ridge (models/ranking/ease.py); None: no EASE source or features
    ease_reg: float | None = None
    # ADMM SLIM (models/ranking/slim.py) from the same sums, for re-ranker features (not a
    # candidate source); None: no SLIM
    slim: SlimConfig | None = None
    # a Mult-DAE/Mult-VAE network trained by FedAvg after the co-occurrence round, as a candidate
    # source and features of the re-ranker (models/neural); None: no network
    neural: NeuralConfig | None = None
    top_k: int = 10
    ranker: RankerConfig | None = field(default_factory=RankerConfig)
    # the rating at or above which a row was a positive in training (the data's threshold): the
    # served model reads a rated history the same way; None: every history row
    positive_threshold: float | None = None
    # user-level differential privacy of the implicit-ALS statistics (models/privacy/dp.py); the
    # model is then implicit ALS alone: kNN and the re-ranker have no DP mechanism here
    dp: UserLevelDP | None = None

    def __post_init__(self) -> None:
        for name in ("n_factors", "neighbours", "n_candidates", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("reg", "alpha", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.shrink < 0:
            raise ValueError(f"shrink={self.shrink} must be >= 0")
        if self.dp is not None and self.ranker is not None:
            raise ValueError("differential privacy covers implicit ALS only: use no re-ranker")


def _binary_rows(client: ClientData, split: str) -> RatingRows:
    rows = client.rows(split)
    return RatingRows(
        rows.users, rows.items, np.ones(len(rows)), n_users=rows.n_users, n_items=rows.n_items
    )


def _item_params(factors: np.ndarray) -> ItemParams:
    return ItemParams(factors, np.zeros(factors.shape[0]), 0.0)


def init_item_factors(n_items: int, config: RankingConfig, seed: int) -> np.ndarray:
    """The implicit-ALS starting item factors, drawn from the run's seed."""
    return init_item_params(
        n_items, config.n_factors, 0.0, np.random.default_rng(seed), config.init_std
    ).factors


# --- implicit ALS --------------------------------------------------------------------------
def implicit_client_round(
    client: ClientData,
    item_factors: np.ndarray,
    config: RankingConfig,
    eval_splits: Sequence[str] = (),
    rng: np.random.Generator | None = None,
) -> tuple[ClientUpdate, dict[str, Evaluation]]:
    """Evaluate the incoming item factors on ``eval_splits`` (ranking), then the client's half of
    the implicit item step; one fold-in for both. Under DP (``config.dp``, drawing from ``rng``)
    the statistics are bounded per user and carry the client's share of noise on every item."""
    rows = _binary_rows(client, "train")
    params = _item_params(item_factors)
    users = solve_users_implicit(rows, params, reg=config.reg, alpha=config.alpha)
    evaluations = {}
    for split in eval_splits:
        evaluations[split] = evaluate_scores(
            client, split, config.top_k, lambda u: users.factors[u] @ item_factors.T
        )
    if config.dp is None:
        stats = implicit_statistics(rows, users, alpha=config.alpha)
        s, user_gram = stats.items, stats.user_gram
    else:
        rng = rng if rng is not None else np.random.default_rng()
        dp = config.dp
        limited = limit_items(rows, dp.max_items, rng)
        s, user_gram = clipped_implicit_statistics(limited, users.factors, config.alpha, dp)
        std = dp.noise_std(dp.implicit_sensitivity(config.alpha))
        s = noisy_dense(s, client.n_items, std, rng)
        user_gram = noisy_gram(user_gram, std, rng)
    # under DP only the noised statistics leave: the row count is not part of what is counted
    metrics = {"train_n": float(len(rows))} if config.dp is None else {}
    update = ClientUpdate(
        client.client_id, s.items, s.counts,
        {"gram": s.grams, "rhs": s.rhs, "user_gram": user_gram}, metrics,
    )  # fmt: skip
    return update, evaluations


def implicit_evaluate(
    client: ClientData, item_factors: np.ndarray, config: RankingConfig, splits: Sequence[str]
) -> dict[str, Evaluation]:
    """Ranking sums of the implicit-ALS order on each split (for clients sitting a round out)."""
    rows = _binary_rows(client, "train")
    users = solve_users_implicit(
        rows, _item_params(item_factors), reg=config.reg, alpha=config.alpha
    )
    return {
        split: evaluate_scores(
            client, split, config.top_k, lambda u: users.factors[u] @ item_factors.T
        )
        for split in splits
    }


def implicit_server_update(
    item_factors: np.ndarray, updates: Sequence[ClientUpdate], config: RankingConfig
) -> np.ndarray:
    """Sum the clients' statistics and solve every item: equal to a centralized sweep."""
    n_items = item_factors.shape[0]
    updates = [u for u in updates if u.items.size > 0]
    if not updates:
        return item_factors
    counts = aggregate_item_sums([(u.items, u.counts) for u in updates], n_items)
    grams = aggregate_item_sums([(u.items, u.arrays["gram"]) for u in updates], n_items)
    rhs = aggregate_item_sums([(u.items, u.arrays["rhs"]) for u in updates], n_items)
    user_gram = np.sum([u.arrays["user_gram"] for u in updates], axis=0)
    if config.dp is None:
        touched = np.flatnonzero(counts > 0)
        stats = ItemStatistics(
            touched, counts[touched].astype(np.int64), grams[touched], rhs[touched]
        )
        return solve_items_implicit(
            _item_params(item_factors), stats, user_gram, reg=config.reg
        ).factors
    # Noisy sums: solve every item with a ridge a few noise deviations deep, then zero the items
    # whose count does not stand out of the noise (both are post-processing).
    dp = config.dp
    noise = dp.noise_multiplier * dp.implicit_sensitivity(config.alpha)
    reg = config.reg + dp.ridge_scale * noise * math.sqrt(config.n_factors)
    every = np.arange(n_items)
    stats = ItemStatistics(every, np.ones(n_items, np.int64), grams, rhs)
    factors = solve_items_implicit(_item_params(item_factors), stats, user_gram, reg=reg).factors
    factors[counts < dp.count_floor * noise] = 0.0
    return factors


def noisy_popularity(updates: Sequence[ClientUpdate], n_items: int) -> np.ndarray:
    """Item popularity from a round's (noisy, under DP) summed counts, floored at 0."""
    counts = aggregate_item_sums([(u.items, u.counts) for u in updates], n_items)
    return np.maximum(counts, 0.0)


# --- item-kNN ------------------------------------------------------------------------------
def knn_client_update(client: ClientData, *, count_users: bool = False) -> ClientUpdate:
    """The client's item co-occurrence counts over its users' training rows (upper triangle) and,
    with ``count_users`` (for ADMM SLIM's item means), how many of its users have training rows."""
    history = client.matrix("train")
    counts = cooccurrence(history)
    diagonal = counts.diagonal()
    items = np.flatnonzero(diagonal > 0)
    return ClientUpdate(
        client.client_id,
        items.astype(np.int64),
        diagonal[items].astype(np.int64),
        pack_cooccurrence(counts),
        {"users": float(np.count_nonzero(np.diff(history.indptr)))} if count_users else {},
    )


def knn_server_update(
    updates: Sequence[ClientUpdate], n_items: int, config: RankingConfig
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """The kNN similarity from the summed co-occurrences, and item popularity (its diagonal)."""
    counts = sum_cooccurrence([u.arrays for u in updates], n_items)
    similarity = cosine_neighbours(counts, neighbours=config.neighbours, shrink=config.shrink)
    return similarity, counts.diagonal().astype(np.float64)


# --- the re-ranker -------------------------------------------------------------------------
@dataclass(frozen=True)
class RankerData:
    """A client's re-ranker rows, built once per training (retrieval does not change)."""

    train: Candidates  # candidates of users with validation rows, history = train rows
    labels: np.ndarray  # 1 where the candidate is among the user's validation rows
    splits: dict[str, tuple[Candidates, np.ndarray]]  # candidates and users for evaluation
    # Scores of the ensemble's members seen so far, per row set: members only get appended, so
    # each round adds just the new members' scores.
    _scores: dict[str, tuple[tuple[int, int], np.ndarray]] = field(
        default_factory=dict, compare=False
    )

    def ensemble_scores(self, part: str, ensemble: TreeEnsemble) -> np.ndarray:
        """The ensemble's raw scores of the ``train`` rows or a split's candidates."""
        features = self.train.features if part == "train" else self.splits[part][0].features
        done, partial = 0, np.zeros(len(features))
        if part in self._scores:
            key, cached = self._scores[part]
            if key[0] <= len(ensemble) and ensemble.prefix_key(key[0]) == key:
                done, partial = key[0], cached
        scores = partial + ensemble.predict(features, start=done)
        self._scores[part] = (ensemble.prefix_key(len(ensemble)), scores)
        return scores

    @property
    def n_groups(self) -> int:
        return int(np.unique(self.train.users).size)


def ranker_client_data(
    client: ClientData,
    recommender: RankingRecommender,
    eval_splits: Sequence[str] = ("valid", "test"),
    *,
    leave_out_selection: bool = True,
) -> RankerData:
    """Candidates and labels from the client's own rows: history = training rows, label = the
    candidate is in the user's validation rows. The selection users' rows are no labels (the
    ``select`` split compares models on them) unless ``leave_out_selection`` is False, and users
    none of whose candidates is labelled 1 are dropped from training (a listwise objective learns
    nothing from them), as are users without training rows. An evaluation split holds every user
    with a row in it, as :func:`evaluate_ranking` counts them."""
    history = client.matrix("train")
    valid = client.matrix("valid")
    valid_users = np.flatnonzero(np.diff(valid.indptr) > 0)
    learners = valid_users[np.diff(history.indptr)[valid_users] > 0]
    if leave_out_selection:
        learners = learners[~client.selected[learners]]
    # the validation users' candidates serve the labels, and the valid and select splits (whose
    # exclusions are the training rows too): built once, for every validation user if asked
    asked = [s for s in eval_splits if s in ("valid", SELECT)]
    pool = recommender.score_candidates(
        history, history, client.user_features, valid_users if asked else learners
    )[0]
    labels = np.zeros(0, dtype=bool)  # a client without validation rows: nothing to learn from
    if pool.users.size:
        labels = np.asarray(valid[pool.users, pool.items]).ravel() > 0
    learning = np.isin(pool.users, learners)
    positive_users = np.unique(pool.users[labels & learning])
    keep = np.isin(pool.users, positive_users)
    train = _candidate_rows(pool, keep)
    splits = {}
    for split in eval_splits:
        if split in asked:
            held = valid_users[client.selected[valid_users]] if split == SELECT else valid_users
            splits[split] = (_candidate_rows(pool, np.isin(pool.users, held)), held)
            continue
        held = np.flatnonzero(np.diff(client.matrix(split).indptr) > 0)
        split_candidates = recommender.score_candidates(
            history, exclude_seen(client, split), client.user_features, held
        )[0]
        splits[split] = (split_candidates, held)
    return RankerData(train, labels[keep].astype(np.float64), splits)


def _candidate_rows(candidates: Candidates, keep: np.ndarray) -> Candidates:
    """The candidate pairs where ``keep`` is True (a user's pairs stay contiguous)."""
    return Candidates(
        candidates.users[keep],
        candidates.items[keep],
        candidates.features[keep].reset_index(drop=True),
        candidates.neighbour[keep],
    )


def _candidate_matrix(
    candidates: Candidates, users: np.ndarray, scores: np.ndarray, n_items: int
) -> np.ndarray:
    out = np.full((len(users), n_items), -np.inf)
    out[np.searchsorted(users, candidates.users), candidates.items] = scores
    return out


def ranker_client_round(
    client: ClientData,
    data: RankerData,
    ensemble: TreeEnsemble,
    config: RankingConfig,
    seed: int,
    *,
    order: str = "als",
) -> tuple[ClientUpdate, dict[str, Evaluation]]:
    """Evaluate the incoming ensemble (two-stage ranking of each split), then boost this round's
    trees on the client's rows from the ensemble's scores. Before the first tree the candidates
    are ranked by the retrieval score ``order`` names (``als``: implicit ALS's, whose top
    candidates are its full ranking's, so the figures are those of the implicit-ALS model)."""
    assert config.ranker is not None
    evaluations = {}
    for split, (candidates, users) in data.splits.items():
        raw = (
            data.ensemble_scores(split, ensemble)
            if len(ensemble)
            else candidates.features[f"{order}_score"].to_numpy()
        )
        scores = _candidate_matrix(candidates, users, raw, client.n_items)
        evaluations[split] = ranking_evaluation(client, split, users, scores, config.top_k)
    if data.n_groups == 0:
        return ClientUpdate(
            client.client_id, np.zeros(0, np.int64), np.zeros(0, np.int64)
        ), evaluations
    _, groups = np.unique(data.train.users, return_counts=True)
    init = data.ensemble_scores("train", ensemble)
    text = boost_client(data.train.features, data.labels, groups, init, config.ranker, seed)
    update = ClientUpdate(
        client.client_id,
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        {"trees": np.frombuffer(text.encode(), dtype=np.uint8)},
        {"groups": float(data.n_groups), "train_n": float(len(data.labels))},
    )
    return update, evaluations


def ranker_server_update(ensemble: TreeEnsemble, updates: Sequence[ClientUpdate]) -> TreeEnsemble:
    """Add the round's client boosters, weighted by their share of query groups."""
    updates = [u for u in updates if "trees" in u.arrays]
    if not updates:
        return ensemble
    weights = round_weights([int(u.metrics["groups"]) for u in updates])
    texts = [u.arrays["trees"].tobytes().decode() for u in updates]
    return ensemble.extend(texts, weights)


# --- evaluation ----------------------------------------------------------------------------
def evaluate_ranking(
    client: ClientData, recommender: RankingRecommender, splits: Sequence[str], k: int
) -> dict[str, Evaluation]:
    """Top-K ranking sums of ``recommender`` on the client's held-out rows of each split; users
    are served from their training rows, as at inference."""
    history = client.matrix("train")
    out, valid = {}, None
    for split in splits:
        if split == SELECT and valid is not None:  # the selection users' rows of valid's scores
            mine = client.selected[valid[0]]
            users, scores = valid[0][mine], valid[1][mine]
        else:
            relevant = client.matrix(split)
            users = np.flatnonzero(np.diff(relevant.indptr) > 0)
            scores = recommender.score_matrix(
                history, exclude_seen(client, split), users, client.user_features
            )
        if split == "valid":
            valid = (users, scores)
        out[split] = ranking_evaluation(client, split, users, scores, k)
    return out


# --- the reference loop --------------------------------------------------------------------
@dataclass
class TwoStageResult:
    recommender: RankingRecommender
    history: list[dict[str, float]]  # one entry per round: stage, round, metrics, seconds, bytes


def run_two_stage(
    clients: Sequence[ClientData],
    n_items: int,
    config: RankingConfig,
    *,
    rounds: int,
    seed: int = 0,
    client_fraction: float = 1.0,
    item_ids: np.ndarray | None = None,
    item_features: pd.DataFrame | None = None,
    titles: np.ndarray | None = None,
    eval_splits: Sequence[str] = ("valid", "test"),
    on_round: Callable[[dict[str, float]], None] | None = None,
) -> TwoStageResult:
    """The two-stage family (implicit ALS for ``rounds`` rounds, one co-occurrence round, the
    network's rounds if configured, then ``config.ranker.rounds`` re-ranker rounds) through the
    reference loop, in this process.

    History: one entry per round (``stage`` "als", "neural" or "ranker"), one "retrieval" entry evaluating
    the retrieval model on ``eval_splits`` once it is complete, and with a re-ranker a "final"
    entry evaluating the two-stage model.
    """
    from models.ranking.family import TwoStage

    family = TwoStage(config, item_ids, titles, item_features)
    history: list[dict[str, float]] = []

    def record(entry: dict) -> None:
        history.append(entry)
        if on_round is not None:
            on_round(entry)

    def evaluated(stage: str, state: object) -> dict:
        parts = [family.evaluate(c, state, eval_splits) for c in clients]
        return {"stage": stage} | summarize_splits(parts, config.top_k, n_items)

    stepped = [p for p in family.phases(rounds) if not p.everyone]
    last_step = np.cumsum([p.rounds for p in stepped])
    last_retrieval = [p.name for p in family.phases(rounds) if p.name != "ranker"][-1]

    def on_step(metrics: dict[str, float]) -> None:
        phase = stepped[int(np.searchsorted(last_step, metrics["step"]))]
        record({"stage": phase.name, "round": int(metrics["step"])} | metrics)

    def on_phase(phase: object, state: object) -> None:
        if phase.name == last_retrieval:
            record(evaluated("retrieval", replace(state, stage="retrieval")))

    state, _ = run_family(
        family, clients, n_items, rounds=rounds, seed=seed, client_fraction=client_fraction,
        eval_splits=(), on_step=on_step, on_phase=on_phase,
    )  # fmt: skip
    if config.ranker is not None:
        record(evaluated("final", state))
    return TwoStageResult(family.servable(state), history)
