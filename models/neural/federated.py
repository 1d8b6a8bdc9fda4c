"""Federated training of the neural model: FedAvg / FedAdam with local epochs (reference loop).

Every round each client starts from the global parameters, runs ``local_epochs`` epochs of
minibatch Adam (fresh optimizer state) on its own users, and sends the change of every parameter
with its number of users as weight. The server averages the changes (FedAvg: the clients' mean
model when the server step is 1) or feeds the average to a server optimizer (FedAdam, Reddi et
al. 2021, :mod:`models.server_optimizers`). A client's update is the whole network's change: it
contains no user id, no history and no per-user vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse

from models.aggregation import aggregate_weighted_average
from models.neural.network import Architecture, Params
from models.neural.training import TrainConfig, active_users, train_epochs
from models.server_optimizers import ServerOptimizerState, apply_server_update

ServerRule = Literal["fedavg", "fedadam"]
SERVER_RULES: tuple[ServerRule, ...] = ("fedavg", "fedadam")


@dataclass(frozen=True)
class FederatedConfig:
    """Rounds, local epochs and the server step.

    Attributes
    ----------
    rounds : int
    local_epochs : int
        Epochs each client trains per round (the data-epoch budget is ``rounds * local_epochs``).
    server_rule : {"fedavg", "fedadam"}
    server_lr : float
        FedAvg's server step (1 = the clients' weighted mean model) or FedAdam's step size.
    server_beta1, server_beta2, server_tau : float
        FedAdam's moment decays and adaptivity (Reddi et al.).
    """

    rounds: int = 50
    local_epochs: int = 1
    server_rule: ServerRule = "fedavg"
    server_lr: float = 1.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.local_epochs < 1:
            raise ValueError(
                f"rounds={self.rounds} must be >= 0 and local_epochs={self.local_epochs} >= 1"
            )
        if self.server_rule not in SERVER_RULES:
            raise ValueError(
                f"server_rule={self.server_rule!r} is unknown; allowed: {', '.join(SERVER_RULES)}"
            )
        if not self.server_lr > 0:
            raise ValueError(f"server_lr={self.server_lr} must be > 0")


@dataclass(frozen=True)
class NeuralUpdate:
    """What one client sends: the change of every parameter (float64, so that the server can
    add it to the float32 global parameters without rounding) and its weight.

    Attributes
    ----------
    deltas : dict of str -> ndarray
        Local parameters minus the global ones it started from.
    users : int
        Users it trained on (the FedAvg weight); 0 for a client with no interactions.
    loss : float
        Mean training loss per user over its last local epoch (NaN without users).
    """

    deltas: Params
    users: int
    loss: float

    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self.deltas.values())


def client_update(
    global_params: Params,
    arch: Architecture,
    history: sparse.spmatrix,
    config: TrainConfig,
    *,
    local_epochs: int,
    start_epoch: int,
    rng: np.random.Generator,
) -> NeuralUpdate:
    """One client's round: ``local_epochs`` of Adam from the global parameters on its users.

    Parameters
    ----------
    global_params : dict of str -> ndarray
    arch : Architecture
    history : sparse matrix (client users, n_items)
        The client's own training interactions.
    config : TrainConfig
    local_epochs : int
    start_epoch : int
        Data epochs trained before this round (``(round - 1) * local_epochs``): the KL schedule.
    rng : numpy.random.Generator
        This client's generator for this round.

    Returns
    -------
    NeuralUpdate
    """
    history = sparse.csr_matrix(history)
    users = int(active_users(history).size)
    if users == 0:
        zeros = {k: np.zeros(v.shape) for k, v in global_params.items()}
        return NeuralUpdate(zeros, 0, float("nan"))
    local, _, stats = train_epochs(
        global_params,
        arch,
        history,
        config,
        epochs=local_epochs,
        rng=rng,
        start_epoch=start_epoch,
    )
    deltas = {
        k: local[k].astype(np.float64) - global_params[k].astype(np.float64) for k in global_params
    }
    return NeuralUpdate(deltas, users, stats[-1].loss)


def aggregate_updates(updates: Sequence[NeuralUpdate]) -> Params:
    """FedAvg's average of the clients' changes, weighted by their users (float64).

    Raises
    ------
    ValueError
        If there is no update, or no client trained any user.
    """
    if not updates:
        raise ValueError("cannot aggregate zero neural client updates")
    names = updates[0].deltas.keys()
    return {
        name: aggregate_weighted_average([(u.deltas[name], float(u.users)) for u in updates])
        for name in names
    }


ServerState = dict[str, ServerOptimizerState]


def init_server_state(params: Params, config: FederatedConfig) -> ServerState | None:
    """FedAdam's moments (None for FedAvg, which keeps no server state)."""
    if config.server_rule == "fedavg":
        return None
    return {
        k: ServerOptimizerState.zeros_like(v.astype(np.float64), config.server_tau)
        for k, v in params.items()
    }


def server_update(
    params: Params, delta: Params, state: ServerState | None, config: FederatedConfig
) -> tuple[Params, ServerState | None]:
    """Apply the averaged change: ``x + lr * delta`` (FedAvg) or one server Adam step (FedAdam).

    Returns new parameters in the dtype of ``params`` and the new server state.
    """
    rule = "sgd" if config.server_rule == "fedavg" else "adam"
    if rule == "adam" and state is None:
        raise ValueError("FedAdam needs server state: start it with init_server_state")
    new_params: Params = {}
    new_state: ServerState = {}
    for name, value in params.items():
        every_row = np.ones(value.shape[0], dtype=bool)
        moved, moments = apply_server_update(
            value,
            delta[name],
            every_row,
            None if state is None else state[name],
            rule=rule,
            lr=config.server_lr,
            beta1=config.server_beta1,
            beta2=config.server_beta2,
            tau=config.server_tau,
        )
        new_params[name] = moved
        if moments is not None:
            new_state[name] = moments
    return new_params, (new_state if state is not None else None)


def client_rng(seed: int, round_: int, client: int) -> np.random.Generator:
    """The generator of one client in one round, derived from the run's seed."""
    return np.random.default_rng(np.random.SeedSequence([seed, round_, client]))


@dataclass(frozen=True)
class RoundStats:
    round: int
    epochs: int  # data epochs trained so far
    loss: float  # user-weighted mean of the clients' last-epoch losses
    upload_bytes: int


def run_federated(
    params: Params,
    arch: Architecture,
    histories: Sequence[sparse.spmatrix],
    config: TrainConfig,
    federated: FederatedConfig,
    *,
    seed: int,
    on_round: Callable[[RoundStats, Params], None] | None = None,
) -> Params:
    """``federated.rounds`` rounds over every client, in this process.

    Parameters
    ----------
    params : dict of str -> ndarray
        The initial global parameters (not modified).
    arch : Architecture
    histories : sequence of sparse matrices
        Client ``c``'s training interactions (its users x n_items).
    config : TrainConfig
        The clients' local optimisation.
    federated : FederatedConfig
    seed : int
        Client ``c`` in round ``r`` draws from ``client_rng(seed, r, c)``.
    on_round : callable or None
        Called after each round with its statistics and the new global parameters.

    Returns
    -------
    dict of str -> ndarray
        The global parameters after the last round.
    """
    state = init_server_state(params, federated)
    for r in range(1, federated.rounds + 1):
        start = (r - 1) * federated.local_epochs
        updates = [
            client_update(
                params,
                arch,
                history,
                config,
                local_epochs=federated.local_epochs,
                start_epoch=start,
                rng=client_rng(seed, r, c),
            )
            for c, history in enumerate(histories)
        ]
        delta = aggregate_updates(updates)
        params, state = server_update(params, delta, state, federated)
        if on_round is not None:
            trained = [u for u in updates if u.users > 0]
            loss = float(np.average([u.loss for u in trained], weights=[u.users for u in trained]))
            upload = sum(u.nbytes() for u in updates)
            on_round(RoundStats(r, r * federated.local_epochs, loss, upload), params)
    return params
