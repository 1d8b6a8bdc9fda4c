"""Minibatch Adam on a users x items matrix: the local epochs every client runs, and centralized
training (the same epochs over all users at once).

KL annealing (Mult-VAE) counts data epochs, not optimizer steps: ``beta`` grows linearly from 0 to
``beta_cap`` over the first ``anneal_epochs`` epochs of the whole training. A client that trains
its local epochs of round ``r`` passes the epoch at which they start, so centralized and federated
runs anneal alike whatever the clients' sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from models.neural.network import Architecture, Params, corrupt, loss_and_gradients


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of the neural model (defaults: the paper's Mult-VAE on ML-20M,
    except the annealing, which here counts epochs).

    Attributes
    ----------
    learning_rate : float
        Adam's step size.
    batch_size : int
        Users per minibatch.
    dropout : float
        Probability of dropping each input entry, in [0, 1).
    beta_cap : float
        Largest weight of the KL term (VAE).
    anneal_epochs : float
        Epochs over which ``beta`` rises from 0 to ``beta_cap``; 0 means ``beta_cap`` from the start.
    l2 : float
        Weight of the squared norm of the weight matrices.
    adam_beta1, adam_beta2, adam_eps : float
    """

    learning_rate: float = 1e-3
    batch_size: int = 500
    dropout: float = 0.5
    beta_cap: float = 0.2
    anneal_epochs: float = 20.0
    l2: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.beta_cap < 0 or self.anneal_epochs < 0 or self.l2 < 0:
            raise ValueError(
                f"beta_cap={self.beta_cap}, anneal_epochs={self.anneal_epochs} and l2={self.l2} "
                "must be >= 0"
            )

    def beta(self, epoch: float) -> float:
        """KL weight after ``epoch`` (fractional) epochs of training."""
        if self.anneal_epochs == 0:
            return self.beta_cap
        return self.beta_cap * min(1.0, epoch / self.anneal_epochs)


@dataclass
class AdamState:
    """Adam's moment estimates per parameter and its step count."""

    step: int = 0
    first: Params = field(default_factory=dict)
    second: Params = field(default_factory=dict)

    @classmethod
    def zeros_like(cls, params: Params) -> AdamState:
        return cls(
            0,
            {k: np.zeros_like(v) for k, v in params.items()},
            {k: np.zeros_like(v) for k, v in params.items()},
        )


def adam_step(params: Params, grads: Params, state: AdamState, config: TrainConfig) -> None:
    """One Adam step (Kingma and Ba), in place on ``params`` and ``state``."""
    state.step += 1
    b1, b2 = config.adam_beta1, config.adam_beta2
    step_size = config.learning_rate / (1 - b1**state.step)
    root_correction = np.sqrt(1 - b2**state.step)
    for name, value in params.items():
        g = grads[name]
        m, v = state.first[name], state.second[name]
        # m <- b1 m + (1 - b1) g and v <- b2 v + (1 - b2) g^2, with few temporaries (the
        # update is memory-bound: millions of float32 per step).
        change = g - m
        change *= 1 - b1
        m += change
        np.multiply(g, g, out=change)
        change -= v
        change *= 1 - b2
        v += change
        np.sqrt(v, out=change)
        change /= root_correction
        change += config.adam_eps
        np.divide(m, change, out=change)
        change *= step_size
        value -= change


@dataclass(frozen=True)
class EpochStats:
    """One epoch: its number (1-based, counted from the start of training), mean loss terms per
    user, the KL weight at its end, and the users it trained on."""

    epoch: int
    loss: float
    nll: float
    kl: float
    beta: float
    users: int


def active_users(matrix: sparse.csr_matrix) -> np.ndarray:
    """Users with at least one interaction: the only ones a step can learn from."""
    return np.flatnonzero(np.diff(matrix.indptr) > 0)


def train_epochs(
    params: Params,
    arch: Architecture,
    matrix: sparse.spmatrix,
    config: TrainConfig,
    *,
    epochs: int,
    rng: np.random.Generator,
    start_epoch: int = 0,
    optimizer: AdamState | None = None,
    on_epoch: Callable[[EpochStats, Params], None] | None = None,
) -> tuple[Params, AdamState, list[EpochStats]]:
    """``epochs`` passes of minibatch Adam over the users (rows) of ``matrix``.

    Parameters
    ----------
    params : dict of str -> ndarray
        Starting point; not modified (training works on a copy).
    arch : Architecture
    matrix : sparse matrix (n_users, n_items)
        Each user's history (nonzero = interacted); users with no interaction are skipped.
    config : TrainConfig
    epochs : int
    rng : numpy.random.Generator
        Draws the user order of every epoch, the dropout masks and the VAE noise, in that order.
    start_epoch : int
        Epochs already trained (sets the KL weight's schedule).
    optimizer : AdamState or None
        Adam's state to continue from; None starts fresh (what a client does every round).
    on_epoch : callable or None
        Called with each epoch's statistics and the current parameters (do not modify them).

    Returns
    -------
    params, optimizer, stats
    """
    matrix = sparse.csr_matrix(matrix)
    if matrix.shape[1] != arch.n_items:
        raise ValueError(f"history has {matrix.shape[1]} items, the network {arch.n_items}")
    if epochs < 0:
        raise ValueError(f"epochs={epochs} must be >= 0")
    params = {k: v.copy() for k, v in params.items()}
    optimizer = optimizer if optimizer is not None else AdamState.zeros_like(params)
    dtype = params["enc0_w"].dtype.type
    users = active_users(matrix)
    n_batches = max(1, -(-users.size // config.batch_size))
    stats: list[EpochStats] = []
    for e in range(epochs):
        order = rng.permutation(users)
        totals = np.zeros(3)
        for b in range(n_batches):
            batch = matrix[order[b * config.batch_size : (b + 1) * config.batch_size]]
            if batch.shape[0] == 0:
                continue
            beta = config.beta(start_epoch + e + b / n_batches)
            inputs = corrupt(batch, config.dropout, rng, dtype)
            noise = None
            if arch.kind == "vae":
                noise = rng.standard_normal((batch.shape[0], arch.latent), dtype=np.float32)
                noise = noise.astype(dtype, copy=False)
            loss, grads = loss_and_gradients(
                params, arch, inputs, batch, noise=noise, beta=beta, l2=config.l2
            )
            adam_step(params, grads, optimizer, config)
            totals += batch.shape[0] * np.array([loss.total, loss.nll, loss.kl])
        n = max(1, users.size)
        epoch_stats = EpochStats(
            start_epoch + e + 1,
            float(totals[0] / n),
            float(totals[1] / n),
            float(totals[2] / n),
            config.beta(start_epoch + e + 1),
            int(users.size),
        )
        stats.append(epoch_stats)
        if on_epoch is not None:
            on_epoch(epoch_stats, params)
    return params, optimizer, stats
