"""The neural model (Mult-DAE/Mult-VAE, :mod:`models.neural.network`) as a model family,
trained by FedAvg or FedAdam with local epochs on each client's users.

A client sends the change of the whole network times its number of users, as one flat vector
(``network_delta``), plus its users and its per-item training counts: sums, so the server's
weighted average is the sum of the vectors over the sum of the users, and cohorts of per-user
clients add up exactly. No user id, history or per-user vector leaves a client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import pandas as pd

from models.aggregation import aggregate_item_sums
from models.client import ClientData
from models.federation.evaluation import Evaluation, evaluate_scores, popularity_baselines
from models.federation.family import Phase, item_labels, optional_arrays, trained_mask
from models.neural.federated import (
    FederatedConfig,
    ServerState,
    client_update,
    init_server_state,
    server_update,
)
from models.neural.network import Architecture, Kind, Params, init_params, logits
from models.neural.recommender import NeuralRecommender
from models.neural.training import TrainConfig
from models.protocol import ClientUpdate
from models.recommenders import seen_in_training
from models.server_optimizers import ServerOptimizerState

DELTA = "network_delta"


@dataclass(frozen=True)
class NeuralConfig:
    """The network's shape, the clients' local optimisation and the server step."""

    kind: Kind = "vae"
    hidden: tuple[int, ...] = (600,)
    latent: int = 200
    train: TrainConfig = field(default_factory=TrainConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    top_k: int = 10

    def architecture(self, n_items: int) -> Architecture:
        return Architecture(n_items, self.kind, self.hidden, self.latent)


@dataclass(frozen=True)
class NeuralState:
    """The global network, the server optimizer's moments (FedAdam), the round, popularity
    (the last round's summed counts) and which items some client had training rows of."""

    params: Params
    arch: Architecture
    server: ServerState | None = None
    round: int = 0
    popularity: np.ndarray | None = None
    trained: np.ndarray | None = None


def _flat(params: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(params[n], np.float64).ravel() for n in names])


def _unflat(vector: np.ndarray, arch: Architecture) -> Params:
    out, start = {}, 0
    for name, shape in arch.shapes().items():
        size = int(np.prod(shape))
        out[name] = vector[start : start + size].reshape(shape)
        start += size
    return out


@dataclass(frozen=True)
class Neural:
    """:mod:`models.neural` behind the family interface (implicit feedback: an interaction is a
    positive, whatever its rating)."""

    config: NeuralConfig = field(default_factory=NeuralConfig)
    item_ids: np.ndarray | None = field(default=None, compare=False)
    titles: np.ndarray | None = field(default=None, compare=False)
    baseline: bool = True  # evaluate the most-popular list beside the model (not for a champion)
    # the data's positive threshold, which the served model applies to a rated history
    positive_threshold: float | None = None

    name: ClassVar[str] = "neural"
    eval_splits: ClassVar[tuple[str, ...]] = ("valid", "test")
    private: ClassVar[bool] = False  # no DP mechanism for the network here

    @property
    def top_k(self) -> int:
        return self.config.top_k

    def phases(self, rounds: int) -> list[Phase]:
        return [Phase("train", rounds)]

    def initial_state(self, n_items: int, seed: int) -> NeuralState:
        arch = self.config.architecture(n_items)
        params = init_params(arch, np.random.default_rng(seed))
        return NeuralState(params, arch, init_server_state(params, self.config.federated))

    def client_round(
        self,
        client: ClientData,
        state: NeuralState,
        phase: str,
        rng: np.random.Generator,
        eval_splits: Sequence[str],
    ) -> tuple[ClientUpdate, dict[str, Evaluation]]:
        evaluations = self.evaluate(client, state, eval_splits)
        history = client.matrix("train")
        epochs = self.config.federated.local_epochs
        update = client_update(
            state.params,
            state.arch,
            history,
            self.config.train,
            local_epochs=epochs,
            start_epoch=state.round * epochs,
            rng=rng,
        )
        names = list(state.arch.shapes())
        items = np.flatnonzero(np.diff(history.tocsc().indptr) > 0)
        counts = np.diff(history.tocsc().indptr)[items]
        arrays = {DELTA: _flat(update.deltas, names) * update.users}
        metrics = {"users": float(update.users)}
        return ClientUpdate(
            client.client_id, items.astype(np.int64), counts, arrays, metrics
        ), evaluations

    def evaluate(
        self, client: ClientData, state: NeuralState, splits: Sequence[str]
    ) -> dict[str, Evaluation]:
        history = client.matrix("train")

        def score(users: np.ndarray) -> np.ndarray:
            return logits(state.params, state.arch, history[users]).astype(np.float64)

        evaluations = {split: evaluate_scores(client, split, self.top_k, score) for split in splits}
        if not self.baseline:
            return evaluations
        # the trivial baseline: the most-popular list from the counts the server holds
        return evaluations | popularity_baselines(client, state.popularity, splits, self.top_k)

    def server_update(
        self, state: NeuralState, updates: Sequence[ClientUpdate], phase: str
    ) -> NeuralState:
        n_items = state.arch.n_items
        counted = [(u.items, u.counts.astype(np.float64)) for u in updates]
        popularity, trained = state.popularity, state.trained
        if counted:
            popularity = aggregate_item_sums(counted, n_items)
            trained = seen_in_training(trained, popularity)
        users = sum(u.metrics.get("users", 0.0) for u in updates)
        if users <= 0:  # nobody trained: the network stays
            return replace(state, round=state.round + 1, popularity=popularity, trained=trained)
        mean = np.sum([u.arrays[DELTA] for u in updates], axis=0) / users
        params, server = server_update(
            state.params, _unflat(mean, state.arch), state.server, self.config.federated
        )
        return NeuralState(params, state.arch, server, state.round + 1, popularity, trained)

    def servable(self, state: NeuralState) -> NeuralRecommender:
        n_items = state.arch.n_items
        popularity = np.zeros(n_items) if state.popularity is None else state.popularity
        return NeuralRecommender(
            state.params, state.arch, item_labels(self.item_ids, n_items), popularity, self.titles,
            self.positive_threshold, state.trained,
        )  # fmt: skip

    def warm_start(self, state: NeuralState, champion: object) -> tuple[NeuralState, int] | None:
        if not isinstance(champion, NeuralRecommender) or champion.arch != state.arch:
            return None
        if not np.array_equal(champion.item_ids, item_labels(self.item_ids, state.arch.n_items)):
            return None  # the network's input and output are the catalogue: same one only
        # the champion's trained items keep what it learned of them
        return replace(state, params=champion.params, trained=champion.trained), state.arch.n_items

    def for_champion(self, champion: object) -> tuple[Neural, NeuralState] | str:
        if not isinstance(champion, NeuralRecommender):
            return "it is not a neural model"
        if self.item_ids is not None and not np.array_equal(
            champion.item_ids, item_labels(self.item_ids, 0)
        ):
            return "its catalogue differs from this run's (the network's input and output)"
        state = NeuralState(
            champion.params, champion.arch, popularity=champion.popularity, trained=champion.trained
        )
        return replace(self, baseline=False), state

    def state_arrays(self, state: NeuralState) -> dict[str, np.ndarray]:
        arch = state.arch
        arrays = {f"param.{k}": v for k, v in state.params.items()}
        arrays |= {
            "arch": np.array([arch.n_items, arch.latent, *arch.hidden], np.int64),
            "vae": np.array(arch.kind == "vae"),
            "round": np.array(state.round),
        }
        for name, moments in (state.server or {}).items():
            arrays |= {f"first.{name}": moments.first, f"second.{name}": moments.second}
        return arrays | optional_arrays(popularity=state.popularity, trained=state.trained)

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> NeuralState:
        n_items, latent, *hidden = (int(v) for v in arrays["arch"])
        arch = Architecture(n_items, "vae" if bool(arrays["vae"]) else "dae", tuple(hidden), latent)
        params = {name: arrays[f"param.{name}"] for name in arch.shapes()}
        server = None
        if any(k.startswith("first.") for k in arrays):
            server = {
                name: ServerOptimizerState(arrays[f"first.{name}"], arrays[f"second.{name}"])
                for name in arch.shapes()
            }
        popularity = arrays.get("popularity", None)
        return NeuralState(
            params, arch, server, int(arrays["round"]), popularity, trained_mask(arrays)
        )

    def describe(self, state: NeuralState) -> pd.Series | None:
        return None
