"""Federated MF: what a client computes and what the server does with it.

:class:`~models.mf.family.ExplicitMF` presents these to the round loops as a model family;
:func:`run_federated` runs it through the reference loop (:mod:`models.federation.loop`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from models.aggregation import aggregate_item_sums
from models.client import ClientData
from models.federation.evaluation import Evaluation
from models.federation.loop import run_family
from models.metrics import add_sums, ranking_sums, rating_error_sums
from models.mf.als import (
    ItemStatistics,
    UserParams,
    item_statistics,
    predict_ratings,
    solve_items,
    solve_users,
)
from models.mf.params import ItemParams, init_item_params
from models.mf.sgd import train_local_sgd
from models.privacy.dp import (
    UserLevelDP,
    clipped_bias_sums,
    clipped_factor_statistics,
    noisy_dense,
    released_biases,
    solve_private_factors,
)
from models.protocol import ClientUpdate
from models.robust import AggregationRule, Attack, aggregate_robust, attack_update
from models.server_optimizers import ServerOptimizerState, apply_server_update

Algorithm = Literal["als", "fedavg", "fedprox", "fedadam", "fedyogi"]
_SERVER_RULE = {"fedavg": "sgd", "fedprox": "sgd", "fedadam": "adam", "fedyogi": "yogi"}


@dataclass(frozen=True)
class MFConfig:
    """Hyperparameters of federated MF. The flow's configuration embeds these defaults.

    ``als`` is the exact federated ALS; the others train locally with SGD and differ in the
    server step (``fedavg``/``fedprox``: plain averaging, ``fedadam``/``fedyogi``: adaptive).
    ``server_lr`` of ``None`` means 1.0 for averaging (plain FedAvg) and 0.03 for the adaptive rules
    (Reddi et al.'s range).
    """

    algorithm: Algorithm = "als"
    n_factors: int = 32
    reg: float = 0.1
    init_std: float = 0.1
    local_epochs: int = 5
    local_lr: float = 0.03
    batch_size: int = 256
    prox_mu: float = 0.01
    server_lr: float | None = None
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    top_k: int = 10
    relevance_threshold: float | None = 4.0
    clip_to: tuple[float, float] | None = None
    # robust aggregation of the averaging algorithms (models/robust.py)
    aggregation: AggregationRule = "mean"
    trim: float = 0.2
    clip_factor: float = 2.0
    min_item_clients: int = 3
    # attack simulation: these clients send a poisoned update instead of their own
    attack: Attack = "none"
    attack_clients: tuple[int, ...] = ()
    attack_scale: float = 1.0
    # user-level differential privacy of the ALS statistics (models/privacy/dp.py)
    dp: UserLevelDP | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ("als", *_SERVER_RULE):
            raise ValueError(
                f"algorithm {self.algorithm!r} is unknown; allowed: als, {', '.join(_SERVER_RULE)}"
            )
        if self.algorithm == "als" and self.aggregation != "mean":
            raise ValueError(
                f"aggregation={self.aggregation!r} with algorithm='als': ALS sums exact statistics; "
                "robust rules apply to fedavg, fedprox, fedadam, fedyogi"
            )
        if self.dp is not None and self.algorithm != "als":
            raise ValueError("differential privacy is implemented for als")
        if self.algorithm == "als" and self.attack != "none":
            raise ValueError("attack simulation applies to the averaging algorithms, not als")

        for name in ("n_factors", "local_epochs", "batch_size", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("reg", "local_lr", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.server_lr is not None and not self.server_lr > 0:
            raise ValueError(f"server_lr={self.server_lr} must be > 0")

    @property
    def effective_server_lr(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return 1.0 if _SERVER_RULE.get(self.algorithm) == "sgd" else 0.03


@dataclass(frozen=True)
class GlobalState:
    """Everything the server carries from round to round (checkpointed as arrays)."""

    params: ItemParams
    optimizer: ServerOptimizerState | None = None
    round: int = 0
    popularity: np.ndarray | None = None  # the last round's summed item counts (cold start)
    # the trivial baseline's item biases (global mean + item bias), fitted from the first
    # training round's summed statistics; None: the baseline is the global mean alone
    baseline: np.ndarray | None = None
    # items a client had training rows of in some round (or carried from the champion); None
    # for a private run, which does not learn which items had rows
    trained: np.ndarray | None = None


@dataclass(frozen=True)
class RoundResult:
    """What one round produced, for logging: metric values only, no client data."""

    round: int
    n_clients: int
    upload_bytes: int
    train_rmse: float
    seconds: float  # clients' updates + server step; evaluation excluded
    metrics: dict[str, float] = field(default_factory=dict)


def client_rating_sums(client: ClientData) -> dict[str, float]:
    """The two numbers a client gives for the global mean: its training rating sum and count.
    (A private run sends neither: its mean comes with the item biases, noised.)"""
    rows = client.rows("train")
    return {"rating_sum": float(rows.ratings.sum()), "n": float(len(rows))}


def init_global_state(
    n_items: int, config: MFConfig, rating_sums: Sequence[dict[str, float]], seed: int
) -> GlobalState:
    """Global mean from the clients' sums; item factors from the run's seed (as centralized ALS)."""
    total = add_sums(rating_sums)
    mean = total["rating_sum"] / total["n"] if total.get("n", 0) > 0 else 0.0
    if (
        config.dp is not None
    ):  # under DP the exact mean would be a release; the scale's middle is not
        mean = sum(config.clip_to) / 2 if config.clip_to is not None else 0.0
    params = init_item_params(
        n_items, config.n_factors, mean, np.random.default_rng(seed), config.init_std
    )
    optimizer = None
    if _SERVER_RULE.get(config.algorithm) in ("adam", "yogi"):
        optimizer = ServerOptimizerState.zeros_like(params.stacked(), config.tau)
    return GlobalState(params, optimizer, 0)


def client_update(
    client: ClientData,
    params: ItemParams,
    config: MFConfig,
    rng: np.random.Generator,
    *,
    user_params: UserParams | None = None,
) -> ClientUpdate:
    """One client's round: fold in its users, then ALS statistics or local SGD for touched items.

    ``user_params``, when given, is the fold-in against ``params`` already computed (see
    :func:`client_round`).
    """
    rows = client.rows("train")
    if user_params is None:
        user_params = solve_users(rows, params, reg=config.reg)
    err = rows.ratings - predict_ratings(user_params, params, rows.users, rows.items)
    metrics = {"train_sse": float(err @ err), "train_n": float(err.size)}
    if config.algorithm == "als" and config.dp is not None:
        # only the noised statistics leave: the training error depends on the rows and is not
        # part of what the accountant counts. Item biases are fixed (released by the biases
        # phase); the factor channel carries the residual after them.
        dp = config.dp
        stats = clipped_factor_statistics(rows, user_params, params.global_mean, params.bias, dp)
        stats = noisy_dense(stats, params.n_items, dp.noise_std(dp.factor_sensitivity), rng)
        arrays = {"gram": stats.grams, "rhs": stats.rhs}
        return ClientUpdate(client.client_id, stats.items, stats.counts, arrays)
    if config.algorithm == "als":
        stats = item_statistics(rows, user_params, params.global_mean)
        arrays = {"gram": stats.grams, "rhs": stats.rhs}
        return ClientUpdate(client.client_id, stats.items, stats.counts, arrays, metrics)
    items, counts = np.unique(rows.items, return_counts=True)
    delta = train_local_sgd(
        rows,
        params.stacked()[items],
        params.global_mean,
        user_params,
        items,
        epochs=config.local_epochs,
        lr=config.local_lr,
        reg=config.reg,
        batch_size=config.batch_size,
        prox_mu=config.prox_mu if config.algorithm == "fedprox" else 0.0,
        rng=rng,
    )
    if config.attack != "none" and client.client_id in config.attack_clients:
        delta = attack_update(delta, config.attack, config.attack_scale, rng)
    return ClientUpdate(client.client_id, items.astype(np.int64), counts, {"delta": delta}, metrics)


def client_bias_update(
    client: ClientData, params: ItemParams, dp: UserLevelDP, rng: np.random.Generator
) -> ClientUpdate:
    """The private biases phase on one client: per item its noisy weighted count (``counts``) and
    noisy weighted sum of clipped ``r - mu`` (``rhs``, one column), over every item, with the
    noise share of :attr:`UserLevelDP.bias_sensitivity`; ``mu`` is the state's (data-free)
    starting mean."""
    counts, sums = clipped_bias_sums(client.rows("train"), params.global_mean, dp)
    std = dp.noise_std(dp.bias_sensitivity)
    counts = counts + rng.normal(0.0, std, counts.size)
    sums = sums + rng.normal(0.0, std, sums.size)
    return ClientUpdate(
        client.client_id, np.arange(params.n_items, dtype=np.int64), counts, {"rhs": sums[:, None]}
    )


def server_bias_update(
    state: GlobalState, updates: Sequence[ClientUpdate], config: MFConfig
) -> GlobalState:
    """The released global mean and item biases from the summed bias channel (post-processing);
    the noisy counts, floored at 0, become the popularity of the cold-start list."""
    assert config.dp is not None
    params = state.params
    n_items = params.n_items
    counts = aggregate_item_sums([(u.items, u.counts.astype(np.float64)) for u in updates], n_items)
    sums = aggregate_item_sums([(u.items, u.arrays["rhs"][:, 0]) for u in updates], n_items)
    mean, bias = released_biases(counts, sums, params.global_mean, config.dp)
    released = ItemParams(params.factors, bias, mean)  # factors: the seed's draw, data-free
    return GlobalState(released, state.optimizer, state.round + 1, np.maximum(counts, 0.0))


def client_round(
    client: ClientData,
    params: ItemParams,
    config: MFConfig,
    rng: np.random.Generator,
    eval_splits: Sequence[str],
) -> tuple[ClientUpdate, dict[str, Evaluation]]:
    """Evaluate the incoming global model on ``eval_splits``, then train on it: one fold-in for
    both, and one task per client and round for an orchestrator instead of two."""
    user_params = solve_users(client.rows("train"), params, reg=config.reg)
    evaluations = {
        s: _evaluate_split(client, params, user_params, config, s, True) for s in eval_splits
    }
    return client_update(client, params, config, rng, user_params=user_params), evaluations


# --- secure aggregation: an update as one dense vector over the whole catalogue -----------------
_SECURE_METRICS = ("train_sse", "train_n")


# under DP the biases phase sends two columns per item (noisy weighted count and sum)
_BIAS_WIDTHS = {"count": 1, "rhs": 1}


def _dense_widths(config: MFConfig, update: ClientUpdate | None = None) -> dict[str, int]:
    if config.dp is not None and update is not None and "gram" not in update.arrays:
        return _BIAS_WIDTHS
    # under DP the factor channel carries the factors alone (item biases are released apart)
    k1 = config.n_factors + (0 if config.dp is not None else 1)
    if config.algorithm == "als":
        return {"count": 1, "gram": k1 * (k1 + 1) // 2, "rhs": k1}
    return {"count": 1, "weighted_delta": k1}


def to_dense(update: ClientUpdate, n_items: int, config: MFConfig) -> np.ndarray:
    """The update as one vector covering every item (zeros for items the client did not touch),
    plus its metric sums: what a client masks for secure aggregation, so the server learns
    neither its values nor which items it touched. FedAvg's deltas are sent multiplied by their
    counts, so the sum of vectors holds the numerator and denominator of the weighted average."""
    widths = _dense_widths(config, update)
    block = np.zeros((n_items, sum(widths.values())))
    counts = update.counts.astype(np.float64)
    columns = {"count": counts[:, None]}
    if widths is _BIAS_WIDTHS:
        columns["rhs"] = update.arrays["rhs"]
    elif config.algorithm == "als":
        columns |= {"gram": update.arrays["gram"], "rhs": update.arrays["rhs"]}
    else:
        columns["weighted_delta"] = update.arrays["delta"] * counts[:, None]
    start = 0
    for name, width in widths.items():
        block[update.items, start : start + width] = columns[name]
        start += width
    metrics = [update.metrics.get(m, 0.0) for m in _SECURE_METRICS]
    return np.concatenate([block.ravel(), metrics])


def from_dense_sum(total: np.ndarray, n_items: int, config: MFConfig) -> ClientUpdate:
    """The unmasked sum of every client's :func:`to_dense` vector, as one combined update that
    :func:`server_update` treats exactly like the clients' updates together."""
    widths = _dense_widths(config)
    if config.dp is not None and total.size == n_items * 2 + len(_SECURE_METRICS):
        widths = _BIAS_WIDTHS  # the biases phase's vector (its length tells it apart)
    n_block = n_items * sum(widths.values())
    block = total[:n_block].reshape(n_items, -1)
    parts, start = {}, 0
    for name, width in widths.items():
        parts[name] = block[:, start : start + width]
        start += width
    metrics = dict(zip(_SECURE_METRICS, map(float, total[n_block:]), strict=True))
    if config.dp is not None:  # noisy sums over every item, counts included
        every = np.arange(n_items, dtype=np.int64)
        arrays = {name: parts[name] for name in widths if name != "count"}
        return ClientUpdate(-1, every, parts["count"][:, 0].copy(), arrays, {})
    counts = np.rint(parts["count"][:, 0]).astype(np.int64)  # integers, up to fixed-point noise
    items = np.flatnonzero(counts > 0)
    if config.algorithm == "als":
        arrays = {"gram": parts["gram"][items], "rhs": parts["rhs"][items]}
    else:
        arrays = {"delta": parts["weighted_delta"][items] / counts[items, None]}
    return ClientUpdate(-1, items.astype(np.int64), counts[items], arrays, metrics)


def server_update(
    state: GlobalState, updates: Sequence[ClientUpdate], config: MFConfig
) -> GlobalState:
    """Combine the round's client updates into the next global state.

    With no updates (every client failed or was empty) the state is returned unchanged apart from
    the round counter; the caller decides whether that is acceptable (quorum).
    """
    params = state.params
    updates = [u for u in updates if u.items.size > 0]
    if not updates:
        return GlobalState(params, state.optimizer, state.round + 1)
    n_items = params.n_items
    if config.algorithm == "als":
        counts = aggregate_item_sums([(u.items, u.counts) for u in updates], n_items)
        grams = aggregate_item_sums([(u.items, u.arrays["gram"]) for u in updates], n_items)
        rhs = aggregate_item_sums([(u.items, u.arrays["rhs"]) for u in updates], n_items)
        if config.dp is not None:
            return GlobalState(
                _private_item_step(params, counts, grams, rhs, config.dp, config),
                state.optimizer,
                state.round + 1,
            )
        touched = np.flatnonzero(counts > 0.5)
        stats = ItemStatistics(
            touched, np.rint(counts[touched]).astype(np.int64), grams[touched], rhs[touched]
        )
        return GlobalState(
            solve_items(params, stats, reg=config.reg), state.optimizer, state.round + 1
        )
    delta, weight = aggregate_robust(
        [(u.items, u.arrays["delta"], u.counts) for u in updates],
        n_items,
        config.aggregation,
        trim=config.trim,
        clip_factor=config.clip_factor,
        min_clients=config.min_item_clients,
    )
    stacked, optimizer = apply_server_update(
        params.stacked(),
        delta,
        weight > 0,
        state.optimizer,
        rule=_SERVER_RULE[config.algorithm],
        lr=config.effective_server_lr,
        beta1=config.beta1,
        beta2=config.beta2,
        tau=config.tau,
    )
    return GlobalState(
        ItemParams.from_stacked(stacked, params.global_mean), optimizer, state.round + 1
    )


def _private_item_step(
    params: ItemParams,
    counts: np.ndarray,
    grams: np.ndarray,
    rhs: np.ndarray,
    dp: UserLevelDP,
    config: MFConfig,
) -> ItemParams:
    """Item factors from the summed noisy factor channel; biases and mean stay as released."""
    total_std = dp.noise_multiplier * dp.factor_sensitivity  # of every summed value
    extra = dp.ridge_scale * total_std * math.sqrt(config.n_factors)
    stats = ItemStatistics(np.arange(params.n_items, dtype=np.int64), counts, grams, rhs)
    factors = solve_private_factors(
        params.factors, stats, reg=config.reg, extra_ridge=extra,
        floor=dp.count_floor * total_std, psd=dp.psd,
    )  # fmt: skip
    return ItemParams(factors, params.bias, params.global_mean)


def evaluate_client(
    client: ClientData,
    params: ItemParams,
    config: MFConfig,
    split: str = "test",
    *,
    ranking: bool = True,
) -> Evaluation:
    """Metric sums over the client's held-out rows of ``split``, users folded in from training rows.

    Returns the sums and how often each item was recommended (for catalogue coverage); with
    ``ranking=False`` only the rating errors are computed and the second value is ``None``.
    """
    return evaluate_client_splits(client, params, config, (split,), ranking=ranking)[split]


def evaluate_client_splits(
    client: ClientData,
    params: ItemParams,
    config: MFConfig,
    splits: Sequence[str],
    *,
    ranking: bool = True,
) -> dict[str, Evaluation]:
    """:func:`evaluate_client` for several splits, folding the users in once; ``"train"`` gives
    the training error (rating errors only)."""
    user_params = solve_users(client.rows("train"), params, reg=config.reg)
    return {s: _evaluate_split(client, params, user_params, config, s, ranking) for s in splits}


def _evaluate_split(
    client: ClientData,
    params: ItemParams,
    user_params: UserParams,
    config: MFConfig,
    split: str,
    ranking: bool,
) -> Evaluation:
    held_out = client.rows(split)
    predicted = predict_ratings(user_params, params, held_out.users, held_out.items)
    if config.clip_to is not None:
        predicted = np.clip(predicted, *config.clip_to)
    sums = rating_error_sums(predicted, held_out.ratings)
    if not ranking or split == "train":  # training error only: nothing is held out to rank
        return sums, None
    users = np.unique(held_out.users)
    scores = (
        user_params.factors[users] @ params.factors.T
        + params.bias[None, :]
        + user_params.bias[users, None]
    )
    exclude = client.matrix("train")
    if split == "test":
        exclude = exclude + client.matrix("valid")
    relevant = client.matrix(split, config.relevance_threshold)
    rank, recommended = ranking_sums(scores, exclude[users], relevant[users], config.top_k)
    return sums | rank, recommended


def run_federated(
    clients: Sequence[ClientData],
    n_items: int,
    config: MFConfig,
    *,
    rounds: int,
    seed: int = 0,
    client_fraction: float = 1.0,
    eval_splits: Sequence[str] = ("valid",),
    eval_ranking: bool = True,
    start_from: Callable[[ItemParams], ItemParams] | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
    secure_sum: Callable[[dict[int, np.ndarray]], np.ndarray] | None = None,
) -> tuple[GlobalState, list[RoundResult]]:
    """Federated MF for ``rounds`` rounds through the reference loop, in this process.

    ``RoundResult.seconds`` covers the clients' updates and the server step, not the evaluation.
    ``start_from`` maps the fresh item parameters (e.g. a warm start). With ``secure_sum`` (e.g.
    one round of :func:`models.privacy.secagg_plus_driver.run_round` per call), the server only
    sees the sum of the clients' dense update vectors.
    """
    from models.mf.family import ExplicitMF

    family = ExplicitMF(config, ranking=eval_ranking)

    def report(step: dict[str, float]) -> None:
        if on_round is not None:
            on_round(_round_result(step))

    state, history = run_family(
        family, clients, n_items, rounds=rounds, seed=seed, client_fraction=client_fraction,
        eval_splits=eval_splits, secure_sum=secure_sum, on_step=report,
        start_from=None if start_from is None else (
            lambda s: replace(s, params=start_from(s.params))),
    )  # fmt: skip
    return state, [_round_result(step) for step in history]


_ROUND_KEYS = (
    "step", "system/clients", "system/bytes_uploaded", "system/round_seconds", "train/rmse",
)  # fmt: skip


def _round_result(step: dict[str, float]) -> RoundResult:
    return RoundResult(
        round=int(step["step"]),
        n_clients=int(step["system/clients"]),
        upload_bytes=int(step["system/bytes_uploaded"]),
        train_rmse=step.get("train/rmse", float("nan")),
        seconds=step["system/round_seconds"],
        metrics={k: v for k, v in step.items() if k not in _ROUND_KEYS},
    )
