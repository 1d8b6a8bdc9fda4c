"""The two-stage recommender as a model family: rounds of implicit ALS, one round of item
co-occurrences (item-kNN, and EASE when configured), rounds of FedAvg training of a Mult-DAE
network when configured (the neural family's client and server steps), then rounds of the
LightGBM re-ranker.

Under DP only the implicit-ALS rounds run: kNN, EASE and the re-ranker have no DP mechanism here,
and the cold-start popularity comes from the last round's noisy counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy import sparse

from models.client import SELECT, ClientData
from models.federation.evaluation import Evaluation, popularity_baselines
from models.federation.family import Phase, item_labels, optional_arrays
from models.neural.family import Neural, NeuralState
from models.protocol import ClientUpdate
from models.ranking.boosting import TreeEnsemble
from models.ranking.ease import federated_ease_weights
from models.ranking.features import Retrieval
from models.ranking.federated import (
    RankerData,
    RankingConfig,
    evaluate_ranking,
    implicit_client_round,
    implicit_evaluate,
    implicit_server_update,
    init_item_factors,
    knn_client_update,
    knn_server_update,
    noisy_popularity,
    ranker_client_data,
    ranker_client_round,
    ranker_server_update,
)
from models.ranking.recommender import RankingRecommender, align_recommender
from models.ranking.slim import federated_slim_weights

# Stages of the state: what evaluates it and what it serves.
ALS, RETRIEVAL, RANKER = "als", "retrieval", "ranker"
NEURAL = "neural"  # the phase that trains the network (the state's stage stays "retrieval")
_NETWORK = "network."  # prefix of the network's arrays in a saved state
_STAGES = (ALS, RETRIEVAL, RANKER)


@dataclass(frozen=True)
class TwoStageState:
    """The server's state between rounds. ``served`` fixes the model to evaluate (a champion)."""

    factors: np.ndarray
    round: int = 0
    stage: str = ALS
    popularity: np.ndarray | None = None
    similarity: sparse.csr_matrix | None = None
    ease: np.ndarray | None = None
    slim: sparse.csr_matrix | None = None
    network: NeuralState | None = None
    ensemble: TreeEnsemble = field(default_factory=TreeEnsemble)
    retrieval_key: str = ""  # identifies the retrieval state (clients cache candidates by it)
    served: RankingRecommender | None = None


# A client's memory between re-ranker rounds: candidates and features are built once per
# retrieval state (retrieval does not change while the re-ranker trains).
_RANKER_DATA: dict[tuple[int, int, str], RankerData] = {}


def forget_ranker_data() -> None:
    """Empty the clients' cache of candidates and features, as a fresh process starts: for a
    caller that times the first re-ranker round of a new run in the same process."""
    _RANKER_DATA.clear()


def _base(state: TwoStageState) -> str:
    """The retrieval model that ranks without a re-ranker (``RankingRecommender.base``)."""
    return "als" if state.ease is None else "ease"


@dataclass(frozen=True)
class TwoStage:
    """:mod:`models.ranking.federated` behind the family interface.

    ``item_ids``, ``titles`` and ``item_features`` describe the public catalogue by item index.
    """

    config: RankingConfig
    item_ids: np.ndarray | None = field(default=None, compare=False)
    titles: np.ndarray | None = field(default=None, compare=False)
    item_features: pd.DataFrame | None = field(default=None, compare=False)

    name: ClassVar[str] = "two-stage"

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """With a re-ranker, which learns from the validation rows, also ``select``: the
        validation rows of the selection users it leaves out, on which models are compared."""
        return ("valid", SELECT, "test") if self.config.ranker is not None else ("valid", "test")

    @property
    def private(self) -> bool:
        return self.config.dp is not None

    def phases(self, rounds: int) -> list[Phase]:
        phases = [Phase(ALS, rounds)]
        if self.config.dp is None:
            phases.append(Phase("knn", 1, everyone=True))
            if self.config.neural is not None:
                phases.append(Phase(NEURAL, self.config.neural.federated.rounds))
        if self.config.ranker is not None:
            phases.append(Phase(RANKER, self.config.ranker.rounds, per_device=False))
        return phases

    def initial_state(self, n_items: int, seed: int) -> TwoStageState:
        network = None
        if self.config.neural is not None and self.config.dp is None:
            network = self._network_family.initial_state(n_items, seed + 1)
        return TwoStageState(init_item_factors(n_items, self.config, seed), network=network)

    @property
    def _network_family(self) -> Neural:
        assert self.config.neural is not None
        return Neural(self.config.neural)

    # --- on a client -----------------------------------------------------------------------
    def client_round(
        self,
        client: ClientData,
        state: TwoStageState,
        phase: str,
        rng: np.random.Generator,
        eval_splits: Sequence[str],
    ) -> tuple[ClientUpdate, dict[str, Evaluation]]:
        if phase == ALS:
            return implicit_client_round(client, state.factors, self.config, eval_splits, rng)
        if phase == "knn":
            return knn_client_update(client, count_users=self.config.slim is not None), {}
        if phase == NEURAL:
            assert state.network is not None
            evaluations = self._evaluate_model(client, self._recorded(state), eval_splits)
            update = self._network_family.client_round(client, state.network, "train", rng, ())[0]
            return update, evaluations
        data = self._ranker_data(client, state)
        tree_seed = int(rng.integers(2**31))
        order = ALS if self._recorded(state).stage == ALS else _base(state)
        return ranker_client_round(
            client, data, state.ensemble, self.config, tree_seed, order=order
        )

    @staticmethod
    def _recorded(state: TwoStageState) -> TwoStageState:
        """The model whose figures a round's evaluation of ``state`` records. The co-occurrence
        round is no step (what it computes belongs to the next step's model), so right after it,
        before any network round or tree, that is still the last implicit-ALS step's model."""
        fresh = (
            state.served is None
            and state.stage == RETRIEVAL
            and not len(state.ensemble)
            and (state.network is None or state.network.round == 0)
        )
        return replace(state, stage=ALS) if fresh else state

    def _ranker_data(self, client: ClientData, state: TwoStageState) -> RankerData:
        key = (client.client_id, client.n_items, state.retrieval_key)
        if key not in _RANKER_DATA:
            if len(_RANKER_DATA) >= 256:
                _RANKER_DATA.clear()
            retrieval = self.servable(replace(state, ensemble=TreeEnsemble()))
            _RANKER_DATA[key] = ranker_client_data(client, retrieval, self.eval_splits)
        return _RANKER_DATA[key]

    def evaluate(
        self, client: ClientData, state: TwoStageState, splits: Sequence[str]
    ) -> dict[str, Evaluation]:
        evaluations = self._evaluate_model(client, state, splits)
        if state.served is not None:  # a champion: the baseline is measured beside the candidate
            return evaluations
        # the trivial baseline: the most-popular list from the counts the server holds (the last
        # implicit-ALS round's, noisy under DP, or the co-occurrences' diagonal), on the same rows
        return evaluations | popularity_baselines(client, state.popularity, splits, self.top_k)

    def _evaluate_model(
        self, client: ClientData, state: TwoStageState, splits: Sequence[str]
    ) -> dict[str, Evaluation]:
        """The model's ranking sums on ``splits`` (implicit ALS's order before the co-occurrence
        round, else the served two-stage model's)."""
        if not splits:
            return {}
        if state.served is None and state.stage == ALS:
            return implicit_evaluate(client, state.factors, self.config, splits)
        return evaluate_ranking(client, self.servable(state), splits, self.top_k)

    # --- on the server ---------------------------------------------------------------------
    def server_update(
        self, state: TwoStageState, updates: Sequence[ClientUpdate], phase: str
    ) -> TwoStageState:
        n_items = state.factors.shape[0]
        if phase == ALS:
            factors = implicit_server_update(state.factors, updates, self.config)
            popularity = noisy_popularity(updates, n_items)
            return replace(state, factors=factors, popularity=popularity, round=state.round + 1)
        if phase == "knn":
            similarity, popularity = knn_server_update(updates, n_items, self.config)
            ease = None
            if self.config.ease_reg is not None:
                parts = [u.arrays for u in updates]
                ease = federated_ease_weights(parts, n_items, reg=self.config.ease_reg)
            slim = None
            if self.config.slim is not None:
                n_users = int(sum(u.metrics.get("users", 0.0) for u in updates))
                slim = federated_slim_weights(
                    [u.arrays for u in updates], n_items, n_users, self.config.slim
                )
            digest = hashlib.sha256(state.factors.tobytes())
            digest.update(similarity.data.tobytes())
            return replace(
                state,
                stage=RETRIEVAL,
                similarity=similarity,
                popularity=popularity,
                ease=ease,
                slim=slim,
                retrieval_key=digest.hexdigest()[:16],
            )
        if phase == NEURAL:
            assert state.network is not None
            network = self._network_family.server_update(state.network, updates, "train")
            digest = hashlib.sha256(state.retrieval_key.encode())
            for value in network.params.values():
                digest.update(value.tobytes())
            return replace(
                state, network=network, round=state.round + 1, retrieval_key=digest.hexdigest()[:16]
            )
        ensemble = ranker_server_update(state.ensemble, updates)
        return replace(state, ensemble=ensemble, stage=RANKER, round=state.round + 1)

    def servable(self, state: TwoStageState) -> RankingRecommender:
        if state.served is not None:
            return state.served
        n_items = state.factors.shape[0]
        popularity = np.zeros(n_items) if state.popularity is None else state.popularity
        c = self.config
        network = None
        if state.network is not None and state.network.round > 0:  # trained at least once
            network = (state.network.params, state.network.arch)
        retrieval = Retrieval(
            state.factors, c.reg, c.alpha, state.similarity, popularity, self.item_features,
            c.n_candidates, state.ease, network, state.slim,
        )  # fmt: skip
        ranker = state.ensemble if len(state.ensemble) else None
        # which items some client had positives of: the co-occurrences' diagonal, summed over
        # every client (under DP the server holds noisy counts only, and cannot tell)
        trained = None
        if not self.private and state.stage != ALS and state.popularity is not None:
            trained = state.popularity > 0
        return RankingRecommender(
            retrieval, ranker, item_labels(self.item_ids, n_items), self.titles,
            c.positive_threshold, trained, _base(state),
        )  # fmt: skip

    def warm_start(
        self, state: TwoStageState, champion: object
    ) -> tuple[TwoStageState, int] | None:
        if not isinstance(champion, RankingRecommender):
            return None
        if champion.retrieval.item_factors.shape[1] != self.config.n_factors:
            return None
        n_items = state.factors.shape[0]
        aligned = align_recommender(
            champion, item_labels(self.item_ids, n_items)
        ).retrieval.item_factors
        known = np.abs(aligned).sum(axis=1) > 0
        factors = np.where(known[:, None], aligned, state.factors)
        return replace(state, factors=factors), int(known.sum())

    def for_champion(self, champion: object) -> tuple[TwoStage, TwoStageState] | str:
        if not isinstance(champion, RankingRecommender):
            return "it is not a ranking model"
        ids = champion.item_ids if self.item_ids is None else item_labels(self.item_ids, 0)
        aligned = align_recommender(champion, ids)
        state = TwoStageState(aligned.retrieval.item_factors, stage=RANKER, served=aligned)
        return self, state

    def state_arrays(self, state: TwoStageState) -> dict[str, np.ndarray]:
        arrays = {
            "factors": state.factors,
            "round": np.array(state.round),
            "stage": np.array(_STAGES.index(state.stage)),
            "retrieval_key": np.frombuffer(state.retrieval_key.encode(), np.uint8),
            "ensemble_weights": np.array([w for _, w in state.ensemble.members], np.float64),
        }
        for i, (text, _) in enumerate(state.ensemble.members):
            arrays[f"ensemble_{i}"] = np.frombuffer(text.encode(), np.uint8)
        arrays |= optional_arrays(popularity=state.popularity, ease=state.ease)
        if state.similarity is not None:
            s = state.similarity.tocsr()
            arrays |= {"sim_data": s.data, "sim_indices": s.indices, "sim_indptr": s.indptr}
        if state.slim is not None:
            s = state.slim.tocsr()
            arrays |= {"slim_data": s.data, "slim_indices": s.indices, "slim_indptr": s.indptr}
        if state.network is not None:
            network = self._network_family.state_arrays(state.network)
            arrays |= {_NETWORK + name: value for name, value in network.items()}
        return arrays

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> TwoStageState:
        factors = arrays["factors"]
        n = factors.shape[0]
        weights = arrays["ensemble_weights"]
        members = tuple(
            (arrays[f"ensemble_{i}"].tobytes().decode(), float(w)) for i, w in enumerate(weights)
        )
        similarity = None
        if "sim_data" in arrays:
            parts = (arrays["sim_data"], arrays["sim_indices"], arrays["sim_indptr"])
            similarity = sparse.csr_matrix(parts, shape=(n, n))
        slim = None
        if "slim_data" in arrays:
            parts = (arrays["slim_data"], arrays["slim_indices"], arrays["slim_indptr"])
            slim = sparse.csr_matrix(parts, shape=(n, n))
        network = None
        if any(name.startswith(_NETWORK) for name in arrays) and self.config.neural is not None:
            network = self._network_family.load_state(
                {k[len(_NETWORK) :]: v for k, v in arrays.items() if k.startswith(_NETWORK)}
            )
        return TwoStageState(
            factors,
            round=int(arrays["round"]),
            stage=_STAGES[int(arrays["stage"])],
            popularity=arrays.get("popularity", None),
            similarity=similarity,
            ease=arrays.get("ease", None),
            slim=slim,
            network=network,
            ensemble=TreeEnsemble(members),
            retrieval_key=arrays["retrieval_key"].tobytes().decode(),
        )

    def describe(self, state: TwoStageState) -> pd.Series | None:
        return state.ensemble.feature_importance() if len(state.ensemble) else None

    # --- secure aggregation (the implicit-ALS phase only) ----------------------------------
    def _dense_widths(self) -> tuple[int, int]:
        k = self.config.n_factors
        return k * (k + 1) // 2, k  # packed gram, rhs

    def to_dense(self, update: ClientUpdate, n_items: int) -> np.ndarray:
        """An implicit-ALS update as one vector over every item: per item its count, packed gram
        and rhs (zeros where untouched), then the k x k user gram and ``train_n``. Only the "als"
        phase has this encoding: co-occurrences are item x item and trees cannot be summed.

        Raises
        ------
        ValueError
            If ``update`` is not an implicit-ALS update.
        """
        missing = {"gram", "rhs", "user_gram"} - set(update.arrays)
        if missing:
            raise ValueError(
                f"client {update.client_id}: only implicit-ALS updates have a dense encoding "
                f"(missing {sorted(missing)}); the knn and ranker phases cannot be masked"
            )
        packed, k = self._dense_widths()
        block = np.zeros((n_items, 1 + packed + k))
        block[update.items, 0] = update.counts
        block[update.items, 1 : 1 + packed] = update.arrays["gram"]
        block[update.items, 1 + packed :] = update.arrays["rhs"]
        user_gram = np.asarray(update.arrays["user_gram"], dtype=np.float64).ravel()
        return np.concatenate([block.ravel(), user_gram, [update.metrics.get("train_n", 0.0)]])

    def from_dense_sum(self, total: np.ndarray, n_items: int) -> ClientUpdate:
        """The sum of every client's :meth:`to_dense` vector as one combined implicit-ALS update:
        exact counts and the touched items without DP; under DP every item with its noisy count,
        as the clients' noisy updates are."""
        packed, k = self._dense_widths()
        width = 1 + packed + k
        block = total[: n_items * width].reshape(n_items, width)
        user_gram = total[n_items * width : n_items * width + k * k].reshape(k, k)
        if self.config.dp is None:
            counts = np.rint(block[:, 0]).astype(np.int64)  # integers, up to fixed-point steps
            items = np.flatnonzero(counts > 0)
            counts = counts[items]
            metrics = {"train_n": float(np.rint(total[-1]))}
        else:
            items = np.arange(n_items)
            counts = block[:, 0].copy()
            metrics = {}
        arrays = {
            "gram": block[items, 1 : 1 + packed],
            "rhs": block[items, 1 + packed :],
            "user_gram": user_gram,
        }
        return ClientUpdate(-1, items.astype(np.int64), counts, arrays, metrics)
