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


def test_a_rounds_loss_is_the_user_weighted_mean_of_the_clients_that_trained():
    # clients of 0, 1 and 9 users: the empty one has no loss, the one-user one counts once
    histories = [sparse.csr_matrix((2, VAE.n_items)), _history(1, seed=2), _history(9, seed=3)]
    config = TrainConfig(learning_rate=1e-2, batch_size=4)
    start = init_params(VAE, np.random.default_rng(0))
    seen = []
    run_federated(start, VAE, histories, config, FederatedConfig(rounds=2, local_epochs=2),
                  seed=5, on_round=lambda stats, _: seen.append(stats))  # fmt: skip
    updates = [client_update(start, VAE, h, config, local_epochs=2, start_epoch=0,
                             rng=client_rng(5, 1, c)) for c, h in enumerate(histories)]  # fmt: skip
    assert [u.users for u in updates] == [0, 1, 9]
    expected = (updates[1].loss * 1 + updates[2].loss * 9) / 10
    assert seen[0].loss == pytest.approx(expected, rel=1e-9)
    assert [s.round for s in seen] == [1, 2] and [s.epochs for s in seen] == [2, 4]
