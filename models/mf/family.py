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
from models.federation.family import Phase, item_labels, optional_arrays, trained_mask
from models.federation.sampling import fresh_rng
from models.metrics import add_sums, rating_error_sums
from models.mf.als import RatingRows, predict_ratings, solve_users
from models.mf.federated import (
    GlobalState,
    MFConfig,
    client_bias_update,
    client_rating_sums,
    client_round,
    evaluate_client_splits,
    from_dense_sum,
    init_global_state,
    server_bias_update,
    server_update,
    to_dense,
)
from models.mf.params import ItemParams
from models.mf.recommend import align_item_params, warm_start_params
from models.mf.recommender import MFRecommender
from models.privacy.released_metrics import MetricRelease, bounded_error_sums, capped_rows
from models.promotion import BASELINE
from models.protocol import ClientUpdate
from models.recommenders import seen_in_training
from models.server_optimizers import ServerOptimizerState

_EMPTY = np.zeros(0, np.int64)
# what a client answers in the "mean" phase (:func:`~models.mf.federated.client_rating_sums`)
_MEAN_SUMS = ("rating_sum", "n")
# pseudo-count shrinking the trivial baseline's item biases towards 0
BASELINE_SHRINK = 10.0


@dataclass(frozen=True)
class ExplicitMF:
    """Federated MF (:mod:`models.mf.federated`) behind the family interface.

    ``item_ids`` are the caller's ids of the item indices (default: the indices); ``ranking``
    False evaluates rating errors only; ``baseline`` evaluates the trivial baseline too
    (``baseline/<split>``, see :meth:`baseline_prediction`).
    """

    config: MFConfig
    item_ids: np.ndarray | None = field(default=None, compare=False)
    titles: np.ndarray | None = field(default=None, compare=False)  # reasons name items by them
    ranking: bool = True
    baseline: bool = True  # evaluate the trivial baseline beside the model (not for a champion)
    # a private run's final evaluation: each user's rating errors bounded for the release
    # (:mod:`models.privacy.released_metrics`); None evaluates every row exactly
    released: MetricRelease | None = None

    name: ClassVar[str] = "explicit"
    eval_splits: ClassVar[tuple[str, ...]] = ("train", "valid", "test")
    # phases every client answers once that :meth:`to_dense` encodes (secure aggregation)
    secure_everyone_phases: ClassVar[tuple[str, ...]] = ("mean",)

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def private(self) -> bool:
        return self.config.dp is not None

    def phases(self, rounds: int) -> list[Phase]:
        # Under DP the first of the ``rounds`` sampled rounds releases the global mean and the
        # item biases on their own channel (the same mechanism and noise multiplier as a training
        # round, so the accountant counts ``rounds`` rounds); the rest train factors on the
        # residual. Without DP a round of exact sums gives the global mean.
        if self.config.dp is not None:
            return [Phase("biases", 1), Phase("train", rounds - 1)]
        return [Phase("mean", 1, everyone=True), Phase("train", rounds)]

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
            if self.private:  # exact sums of the ratings: never part of a private run
                raise ValueError("a private run has no 'mean' phase (its biases phase is noised)")
            return ClientUpdate(
                client.client_id, _EMPTY, _EMPTY, {}, client_rating_sums(client)
            ), {}
        if phase == "biases":
            assert self.config.dp is not None
            evaluations = self.evaluate(client, state, eval_splits) if eval_splits else {}
            return client_bias_update(client, state.params, self.config.dp, rng), evaluations
        return client_round(client, state.params, self.config, rng, eval_splits)

    def evaluate(
        self, client: ClientData, state: GlobalState, splits: Sequence[str]
    ) -> dict[str, Evaluation]:
        evaluations = evaluate_client_splits(
            client, state.params, self.config, splits, ranking=self.ranking
        )
        held_out = {s: client.rows(s) for s in splits if s != "train"}
        if self.released is not None:  # each user's rating errors bounded (ranking sums are)
            held_out = self._bounded_errors(client, state, held_out, evaluations)
        mean, bias = self.baseline_prediction(state)
        for split, rows in held_out.items() if self.baseline else ():
            predicted = mean + bias[rows.items]
            if self.config.clip_to is not None:
                predicted = np.clip(predicted, *self.config.clip_to)
            evaluations[f"{BASELINE}/{split}"] = (self._error_sums(predicted, rows.ratings), None)
        return evaluations

    def _error_sums(self, predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
        if self.released is None:
            return rating_error_sums(predicted, actual)
        return bounded_error_sums(predicted, actual, self.released.error_clip)

    def _bounded_errors(
        self,
        client: ClientData,
        state: GlobalState,
        held_out: dict[str, RatingRows],
        evaluations: dict[str, Evaluation],
    ) -> dict[str, RatingRows]:
        """The rating-error sums of each held-out split over at most ``released.max_rows`` rows
        per user (sampled from OS entropy), errors clipped to ``released.error_clip``; returns
        the rows used."""
        assert self.released is not None
        rng = fresh_rng()
        users = solve_users(client.rows("train"), state.params, reg=self.config.reg)
        capped = {}
        for split, rows in held_out.items():
            capped[split] = rows = capped_rows(rows, self.released.max_rows, rng)
            predicted = predict_ratings(users, state.params, rows.users, rows.items)
            if self.config.clip_to is not None:
                predicted = np.clip(predicted, *self.config.clip_to)
            sums, recommended = evaluations[split]
            evaluations[split] = (sums | self._error_sums(predicted, rows.ratings), recommended)
        return capped

    def server_update(
        self, state: GlobalState, updates: Sequence[ClientUpdate], phase: str
    ) -> GlobalState:
        if phase == "mean":
            total = add_sums(u.metrics for u in updates)
            mean = total["rating_sum"] / total["n"] if total.get("n", 0) > 0 else 0.0
            return replace(state, params=replace(state.params, global_mean=float(mean)))
        if phase == "biases":  # the released biases are the private trivial baseline too
            released = server_bias_update(state, updates, self.config)
            return replace(released, baseline=released.params.bias.copy())
        updated = server_update(state, updates, self.config)
        updated = replace(updated, baseline=self._baseline(state, updates))
        n_items = state.params.n_items
        counted = [(u.items, u.counts.astype(np.float64)) for u in updates]
        popularity = aggregate_item_sums(counted, n_items) if counted else np.zeros(n_items)
        if self.private:  # noisy counts: floored at 0 (post-processing)
            return replace(updated, popularity=np.maximum(popularity, 0.0))
        trained = seen_in_training(state.trained, popularity)
        return replace(updated, popularity=popularity, trained=trained)

    def _baseline(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> np.ndarray | None:
        """The trivial baseline's item biases, kept from the first training round: ALS's summed
        statistics hold, per item, the count and ``sum (r - mu - b_u)`` (the last row of the
        Gram and right-hand side), so ``b_i = sum / (count + BASELINE_SHRINK)`` costs no extra
        upload. FedAvg's updates hold no sums (the global mean alone); under DP the baseline is
        the biases phase's release, kept from that phase."""
        if state.baseline is not None or self.private or self.config.algorithm != "als":
            return state.baseline
        n_items, k = state.params.n_items, self.config.n_factors
        counts = aggregate_item_sums(
            [(u.items, u.counts.astype(np.float64)) for u in updates], n_items
        )
        sums = aggregate_item_sums([(u.items, u.arrays["rhs"][:, k]) for u in updates], n_items)
        return sums / (counts + BASELINE_SHRINK)

    def baseline_prediction(self, state: GlobalState) -> tuple[float, np.ndarray]:
        """The trivial baseline of the rating predictions: a global mean and item biases,
        independent of the trained factors. Under DP they are the biases phase's release (the
        global mean stays what that phase released), which the accountant counted: the gate then
        asks the factors' noisy rounds to do better than the released biases alone."""
        bias = state.baseline if state.baseline is not None else np.zeros(state.params.n_items)
        return state.params.global_mean, bias

    def servable(self, state: GlobalState) -> MFRecommender:
        n_items = state.params.n_items
        popularity = np.zeros(n_items) if state.popularity is None else state.popularity
        return MFRecommender(
            state.params,
            item_labels(self.item_ids, n_items),
            popularity,
            self.config.reg,
            self.config.clip_to,
            None if self.private else state.trained,
            self.titles,
        )

    def warm_start(self, state: GlobalState, champion: object) -> tuple[GlobalState, int] | None:
        if not isinstance(champion, MFRecommender):
            return None
        if champion.params.n_factors != self.config.n_factors:
            return None
        ids = item_labels(self.item_ids, state.params.n_items)
        params, carried = warm_start_params(state.params, champion.params, champion.item_ids, ids)
        trained = None
        if not self.private:  # the champion's trained items keep what it learned of them
            index = {item: i for i, item in enumerate(ids)}
            trained = np.zeros(len(ids), dtype=bool)
            trained[[index[i] for i in champion.known_items if i in index]] = True
        return replace(state, params=params, trained=trained), carried

    def for_champion(self, champion: object) -> tuple[ExplicitMF, GlobalState] | str:
        if not isinstance(champion, MFRecommender):
            return "it is not an MF model"
        ids = champion.item_ids if self.item_ids is None else item_labels(self.item_ids, 0)
        aligned = align_item_params(champion.params, champion.item_ids, ids)
        config = replace(self.config, reg=champion.reg, n_factors=aligned.n_factors, dp=None)
        return replace(self, config=config, baseline=False), GlobalState(aligned)

    def state_arrays(self, state: GlobalState) -> dict[str, np.ndarray]:
        arrays = {
            "factors": state.params.factors,
            "bias": state.params.bias,
            "global_mean": np.array(state.params.global_mean),
            "round": np.array(state.round),
        }
        if state.optimizer is not None:
            arrays |= {"opt_first": state.optimizer.first, "opt_second": state.optimizer.second}
        return arrays | optional_arrays(
            popularity=state.popularity, baseline=state.baseline, trained=state.trained
        )

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> GlobalState:
        params = ItemParams(arrays["factors"], arrays["bias"], float(arrays["global_mean"]))
        optimizer = None
        if "opt_first" in arrays:
            optimizer = ServerOptimizerState(arrays["opt_first"], arrays["opt_second"])
        popularity = arrays.get("popularity", None)
        baseline = arrays.get("baseline", None)
        return GlobalState(
            params, optimizer, int(arrays["round"]), popularity, baseline, trained_mask(arrays)
        )

    def describe(self, state: GlobalState) -> None:
        return None

    def to_dense(self, update: ClientUpdate, n_items: int) -> np.ndarray:
        """A training update over every item (:func:`~models.mf.federated.to_dense`); the "mean"
        phase's answer as its two numbers, the rating sum and the row count."""
        if update.items.size == 0 and not update.arrays and set(update.metrics) == set(_MEAN_SUMS):
            return np.array([update.metrics[name] for name in _MEAN_SUMS], dtype=np.float64)
        return to_dense(update, n_items, self.config)

    def from_dense_sum(self, total: np.ndarray, n_items: int) -> ClientUpdate:
        """The inverse of :meth:`to_dense` on a sum of clients' vectors (a "mean" phase's has
        two numbers; every other vector is longer)."""
        if total.size == len(_MEAN_SUMS):
            rating_sum, n = (float(v) for v in total)
            metrics = {"rating_sum": rating_sum, "n": float(np.rint(n))}  # n: integers summed
            return ClientUpdate(-1, _EMPTY, _EMPTY, {}, metrics)
        return from_dense_sum(total, n_items, self.config)
