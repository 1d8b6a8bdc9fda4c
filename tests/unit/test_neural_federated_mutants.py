"""Federated training of the network where a changed operator or constant would still train: the
bounds of its settings, a client of a single user, and the KL schedule over rounds of several
local epochs, each against the centralised training steps it is made of."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from models.neural.federated import FederatedConfig, client_rng, client_update, run_federated
from models.neural.network import Architecture, init_params
from models.neural.training import TrainConfig, train_epochs

VAE = Architecture(n_items=7, kind="vae", hidden=(5,), latent=3)


def _history(n_users: int, seed: int) -> sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, VAE.n_items)) < 0.4).astype(float)
    dense[np.arange(n_users), rng.integers(0, VAE.n_items, n_users)] = 1.0  # nobody is empty
    return sparse.csr_matrix(dense)


def test_zero_rounds_and_one_local_epoch_are_allowed_and_less_is_refused():
    FederatedConfig(rounds=0, local_epochs=1, server_lr=1e-9)
    for bad in ({"rounds": -1}, {"local_epochs": 0}):
        with pytest.raises(ValueError, match="must be >= 0"):
            FederatedConfig(**bad)
    with pytest.raises(ValueError, match=r"server_lr=0\.0 must be > 0"):
        FederatedConfig(server_lr=0.0)


def test_a_client_of_one_user_sends_its_change_with_weight_1():
    start = init_params(VAE, np.random.default_rng(0))
    history = _history(1, seed=4)
    config = TrainConfig(learning_rate=1e-2, batch_size=4)
    update = client_update(start, VAE, history, config, local_epochs=1, start_epoch=0,
                           rng=client_rng(1, 1, 0))  # fmt: skip
    local, _, _ = train_epochs(start, VAE, history, config, epochs=1, rng=client_rng(1, 1, 0))
    assert update.users == 1
    for key in start:
        expected = local[key].astype(np.float64) - start[key].astype(np.float64)
        np.testing.assert_array_equal(update.deltas[key], expected, err_msg=key)
    assert any(v.any() for v in update.deltas.values())


def test_each_round_anneals_from_the_data_epochs_trained_before_it():
    # one client, FedAvg with step 1: the global model is the client's model after each round
    history = _history(30, seed=6)
    config = TrainConfig(learning_rate=1e-2, batch_size=8, anneal_epochs=10.0)
    start = init_params(VAE, np.random.default_rng(0))
    rounds, local_epochs = 3, 2
    federated = run_federated(start, VAE, [history], config,
                              FederatedConfig(rounds=rounds, local_epochs=local_epochs), seed=9)  # fmt: skip
    params = start
    for r in range(1, rounds + 1):
        params, _, _ = train_epochs(params, VAE, history, config, epochs=local_epochs,
                                    rng=client_rng(9, r, 0), start_epoch=(r - 1) * local_epochs)  # fmt: skip
    for key in start:
        np.testing.assert_allclose(federated[key], params[key], rtol=1e-5, atol=1e-6, err_msg=key)
