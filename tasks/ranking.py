"""Tasks of the implicit-feedback (ranking) family: client rounds of implicit ALS, item-kNN and
the LightGBM re-ranker, their server steps, and two-stage evaluation. Clients read only their own
partition; what they return is a ClientUpdate of aggregates plus metric sums."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE
from scipy import sparse

from models.data.partitions import ClientEntry
from models.mf.federated import Evaluation, client_rng
from models.protocol import ClientUpdate
from models.ranking.boosting import TreeEnsemble
from models.ranking.features import Retrieval
from models.ranking.federated import (
    RankerData,
    RankingConfig,
    evaluate_ranking,
    implicit_client_round,
    implicit_cohort_round,
    implicit_evaluate,
    implicit_server_update,
    init_item_factors,
    knn_client_update,
    knn_server_update,
    ranker_client_data,
    ranker_client_round,
    ranker_server_update,
)
from models.ranking.recommender import RankingRecommender, align_recommender
from tasks.clients import open_client
from tasks.faults import FaultPlan


@task(name="initialize-implicit", cache_policy=NONE)
def initialize_factors(n_items: int, config: RankingConfig, seed: int) -> np.ndarray:
    """Implicit-ALS item factors drawn from the run's seed."""
    return init_item_factors(n_items, config, seed)


@task(name="warm-start-implicit", cache_policy=NONE)
def warm_start_factors(
    factors: np.ndarray, champion: RankingRecommender, item_ids: np.ndarray
) -> tuple[np.ndarray, int]:
    """The champion's item factors for the items it knows; new items keep their fresh draw."""
    aligned = align_recommender(champion, item_ids).retrieval.item_factors
    known = np.abs(aligned).sum(axis=1) > 0
    return np.where(known[:, None], aligned, factors), int(known.sum())


@task(name="train-implicit-client", cache_policy=NONE)
def train_implicit_client(
    workspace: str,
    entry: ClientEntry,
    n_items: int,
    factors: np.ndarray,
    config: RankingConfig,
    eval_splits: tuple[str, ...] = (),
    faults: FaultPlan | None = None,
    round_: int = 0,
    seed: int = 0,
    devices: float | None = None,
) -> tuple[ClientUpdate, dict[str, Evaluation]]:
    """Rank with the incoming item factors on the client's held-out rows, then send its half of
    the implicit item step (bounded and noised under DP, from a (seed, round, client) stream).
    With ``devices`` the partition is a cohort of per-user clients sampled at that fraction."""
    if faults is not None:
        faults.inject(entry.client_id, round_)
    client = open_client(workspace, entry, n_items)
    if devices is not None:
        return implicit_cohort_round(client, factors, config, seed, round_, devices, eval_splits)
    rng = client_rng(seed, round_, entry.client_id)
    return implicit_client_round(client, factors, config, eval_splits, rng)


@task(name="evaluate-implicit-client", cache_policy=NONE)
def evaluate_implicit_client(
    workspace: str,
    entry: ClientEntry,
    n_items: int,
    factors: np.ndarray,
    config: RankingConfig,
    splits: tuple[str, ...],
) -> dict[str, Evaluation]:
    """Ranking sums of the implicit-ALS order on the client's held-out rows."""
    return implicit_evaluate(open_client(workspace, entry, n_items), factors, config, splits)


@task(name="aggregate-implicit", cache_policy=NONE)
def aggregate_implicit(
    factors: np.ndarray, updates: Sequence[ClientUpdate], config: RankingConfig
) -> np.ndarray:
    """Sum the clients' implicit statistics and solve every item (exact)."""
    return implicit_server_update(factors, updates, config)


@task(name="knn-client", cache_policy=NONE)
def knn_client(workspace: str, entry: ClientEntry, n_items: int) -> ClientUpdate:
    """The client's item co-occurrence counts over its own users."""
    return knn_client_update(open_client(workspace, entry, n_items))


@task(name="build-similarity", cache_policy=NONE)
def build_similarity(
    updates: Sequence[ClientUpdate], n_items: int, config: RankingConfig
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Item-kNN similarity and item popularity from the summed co-occurrences."""
    return knn_server_update(updates, n_items, config)


@task(name="build-ranking-model", cache_policy=NONE)
def build_ranking_model(
    factors: np.ndarray,
    similarity: sparse.csr_matrix,
    popularity: np.ndarray,
    config: RankingConfig,
    item_ids: np.ndarray,
    catalogue: pd.DataFrame | None,
    ranker: TreeEnsemble | None = None,
) -> RankingRecommender:
    """The servable model: retrieval state, the catalogue (titles, years, genres), the ranker."""
    titles, features = None, None
    if catalogue is not None:
        titles = catalogue["title"].to_numpy(dtype=object) if "title" in catalogue else None
        features = catalogue.drop(columns=["title"], errors="ignore")
        features = features if features.shape[1] else None
    retrieval = Retrieval(
        factors, config.reg, config.alpha, similarity, popularity, features, config.n_candidates
    )
    return RankingRecommender(retrieval, ranker, np.asarray(item_ids).astype(str), titles)


_RANKER_DATA: dict[tuple[str, int, str], RankerData] = {}


def _ranker_data(
    workspace: str, entry: ClientEntry, n_items: int, token: str, recommender: RankingRecommender
) -> RankerData:
    # The client's memory between ranker rounds: its candidates and features are built once per
    # training (``token``), since retrieval is fixed while the ranker trains.
    key = (workspace, entry.client_id, token)
    if key not in _RANKER_DATA:
        if len(_RANKER_DATA) >= 256:
            _RANKER_DATA.clear()
        _RANKER_DATA[key] = ranker_client_data(open_client(workspace, entry, n_items), recommender)
    return _RANKER_DATA[key]


@task(name="train-ranker-client", cache_policy=NONE)
def train_ranker_client(
    workspace: str,
    entry: ClientEntry,
    n_items: int,
    retrieval: RankingRecommender,
    ensemble: TreeEnsemble,
    config: RankingConfig,
    seed: int,
    round_: int,
    token: str,
    faults: FaultPlan | None = None,
) -> tuple[ClientUpdate, dict[str, Evaluation]]:
    """Evaluate the incoming two-stage model, then boost this round's trees on the client's rows."""
    if faults is not None:
        faults.inject(entry.client_id, 10_000 + round_)  # ranker rounds draw apart from ALS rounds
    client = open_client(workspace, entry, n_items)
    data = _ranker_data(workspace, entry, n_items, token, retrieval)
    tree_seed = int(client_rng(seed, round_, entry.client_id).integers(2**31))
    return ranker_client_round(client, data, ensemble, config, tree_seed)


@task(name="aggregate-ranker", cache_policy=NONE)
def aggregate_ranker(ensemble: TreeEnsemble, updates: Sequence[ClientUpdate]) -> TreeEnsemble:
    """Add the round's client boosters, weighted by their query groups."""
    return ranker_server_update(ensemble, updates)


@task(name="evaluate-ranking-client", cache_policy=NONE)
def evaluate_ranking_client(
    workspace: str,
    entry: ClientEntry,
    n_items: int,
    recommender: RankingRecommender,
    splits: tuple[str, ...],
    k: int,
) -> dict[str, Evaluation]:
    """Top-K ranking sums of a whole (two-stage) model on the client's held-out rows."""
    return evaluate_ranking(open_client(workspace, entry, n_items), recommender, splits, k)


@task(name="prepare-ranking-champion", cache_policy=NONE)
def align_champion(champion: RankingRecommender, item_ids: np.ndarray) -> RankingRecommender:
    """The champion re-indexed to today's catalogue."""
    return align_recommender(champion, item_ids)
