"""Explicit-feedback matrix factorisation as a model family: a round of the global mean's sums
(unless private), then rounds of exact ALS or FedAvg-style training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from models.aggregation import aggregate_item_sums
from models.client import ClientData
from models.federation.evaluation import Evaluation
from models.federation.family import Phase
from models.metrics import add_sums
from models.mf.federated import (
    GlobalState,
    MFConfig,
    client_rating_sums,
    client_round,
    evaluate_client_splits,
    from_dense_sum,
    init_global_state,
    server_update,
    to_dense,
)
from models.mf.params import ItemParams
from models.mf.recommend import align_item_params, warm_start_params
from models.mf.recommender import MFRecommender
from models.protocol import ClientUpdate
from models.server_optimizers import ServerOptimizerState

_EMPTY = np.zeros(0, np.int64)


@dataclass(frozen=True)
class ExplicitMF:
    """Federated MF (:mod:`models.mf.federated`) behind the family interface.

    ``item_ids`` are the caller's ids of the item indices (default: the indices); ``ranking``
    False evaluates rating errors only.
    """

    config: MFConfig
    item_ids: np.ndarray | None = field(default=None, compare=False)
    ranking: bool = True

    name: ClassVar[str] = "explicit"
    eval_splits: ClassVar[tuple[str, ...]] = ("train", "valid", "test")

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def private(self) -> bool:
        return self.config.dp is not None

    def phases(self, rounds: int) -> list[Phase]:
        # Under DP the mean would be one more release: the model starts from the scale's middle.
        mean = [] if self.config.dp is not None else [Phase("mean", 1, everyone=True)]
        return [*mean, Phase("train", rounds)]

    def initial_state(self, n_items: int, seed: int) -> GlobalState:
        return init_global_state(n_items, self.config, [], seed)

    def client_round(
        self,
        client: ClientData,
        state: GlobalState,
        phase: str,
        rng: np.random.Generator,
        eval_splits: Sequence[str],
    ) -> tuple[ClientUpdate, dict[str, Evaluation]]:
        if phase == "mean":
            return ClientUpdate(
                client.client_id, _EMPTY, _EMPTY, {}, client_rating_sums(client)
            ), {}
        return client_round(client, state.params, self.config, rng, eval_splits)

    def evaluate(
        self, client: ClientData, state: GlobalState, splits: Sequence[str]
    ) -> dict[str, Evaluation]:
        return evaluate_client_splits(
            client, state.params, self.config, splits, ranking=self.ranking
        )

    def server_update(
        self, state: GlobalState, updates: Sequence[ClientUpdate], phase: str
    ) -> GlobalState:
        if phase == "mean":
            total = add_sums(u.metrics for u in updates)
            mean = total["rating_sum"] / total["n"] if total.get("n", 0) > 0 else 0.0
            return replace(state, params=replace(state.params, global_mean=float(mean)))
        updated = server_update(state, updates, self.config)
        n_items = state.params.n_items
        counted = [(u.items, u.counts.astype(np.float64)) for u in updates]
        popularity = aggregate_item_sums(counted, n_items) if counted else np.zeros(n_items)
        return replace(updated, popularity=popularity)

    def _ids(self, n_items: int) -> np.ndarray:
        ids = np.arange(n_items) if self.item_ids is None else self.item_ids
        return np.asarray(ids).astype(str)

    def servable(self, state: GlobalState) -> MFRecommender:
        n_items = state.params.n_items
        popularity = np.zeros(n_items) if state.popularity is None else state.popularity
        return MFRecommender(
            state.params, self._ids(n_items), popularity, self.config.reg, self.config.clip_to
        )

    def warm_start(self, state: GlobalState, champion: object) -> tuple[GlobalState, int] | None:
        if not isinstance(champion, MFRecommender):
            return None
        if champion.params.n_factors != self.config.n_factors:
            return None
        ids = self._ids(state.params.n_items)
        params, carried = warm_start_params(state.params, champion.params, champion.item_ids, ids)
        return replace(state, params=params), carried

    def for_champion(self, champion: object) -> tuple[ExplicitMF, GlobalState] | str:
        if not isinstance(champion, MFRecommender):
            return "it is not an MF model"
        ids = champion.item_ids if self.item_ids is None else self._ids(0)
        aligned = align_item_params(champion.params, champion.item_ids, ids)
        config = replace(self.config, reg=champion.reg, n_factors=aligned.n_factors, dp=None)
        return replace(self, config=config), GlobalState(aligned)

    def state_arrays(self, state: GlobalState) -> dict[str, np.ndarray]:
        arrays = {
            "factors": state.params.factors,
            "bias": state.params.bias,
            "global_mean": np.array(state.params.global_mean),
            "round": np.array(state.round),
        }
        if state.optimizer is not None:
            arrays |= {"opt_first": state.optimizer.first, "opt_second": state.optimizer.second}
        if state.popularity is not None:
            arrays["popularity"] = state.popularity
        return arrays

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> GlobalState:
        params = ItemParams(arrays["factors"], arrays["bias"], float(arrays["global_mean"]))
        optimizer = None
        if "opt_first" in arrays:
            optimizer = ServerOptimizerState(arrays["opt_first"], arrays["opt_second"])
        popularity = arrays.get("popularity", None)
        return GlobalState(params, optimizer, int(arrays["round"]), popularity)

    def describe(self, state: GlobalState) -> None:
        return None

    def to_dense(self, update: ClientUpdate, n_items: int) -> np.ndarray:
        return to_dense(update, n_items, self.config)

    def from_dense_sum(self, total: np.ndarray, n_items: int) -> ClientUpdate:
        return from_dense_sum(total, n_items, self.config)
