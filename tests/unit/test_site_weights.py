"""A site's weight in sites.yaml: its update counts as that many copies of itself, for every
family that trains at sites (the oracle: the server's update with the copies listed)."""

from __future__ import annotations

import numpy as np
import pytest

from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.federation.sampling import client_rng
from models.mf.family import ExplicitMF
from models.mf.federated import MFConfig
from models.neural.family import Neural, NeuralConfig
from models.neural.training import TrainConfig
from models.protocol import ClientUpdate, weighted

FAMILIES = {
    "als": lambda: ExplicitMF(MFConfig(n_factors=4)),
    "fedavg": lambda: ExplicitMF(MFConfig(algorithm="fedavg", n_factors=4)),
    "neural": lambda: Neural(
        NeuralConfig(kind="dae", hidden=(), latent=8, train=TrainConfig(batch_size=64))
    ),
}


@pytest.fixture(scope="module")
def clients():
    data = generate_synthetic(n_users=150, n_items=60, n_interactions=4000, seed=5)
    rng = np.random.default_rng(2)
    owner = assign_clients(data, n_clients=2, strategy="iid", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.1)
    return build_clients(data, owner, split)


def _flat(family, state) -> np.ndarray:
    return np.concatenate([a.ravel().astype(float) for a in family.state_arrays(state).values()])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_weight_of_three_is_the_update_sent_three_times(clients, name):
    family = FAMILIES[name]()
    state = family.initial_state(clients[0].n_items, seed=0)
    phase = family.phases(2)[-1].name
    updates = [
        family.client_round(c, state, phase, client_rng(0, 1, c.client_id), ())[0] for c in clients
    ]

    heavy = family.server_update(state, [weighted(updates[0], 3), updates[1]], phase)
    copies = family.server_update(state, [updates[0]] * 3 + [updates[1]], phase)
    plain = family.server_update(state, updates, phase)

    np.testing.assert_allclose(_flat(family, heavy), _flat(family, copies), rtol=1e-10, atol=1e-12)
    assert not np.allclose(_flat(family, heavy), _flat(family, plain))  # the weight did something


def test_weights_are_positive_integers_and_unweightable_arrays_are_refused():
    update = ClientUpdate(0, np.arange(2), np.ones(2, np.int64), {"pair_counts": np.ones(2)})

    assert weighted(update, 1) is update
    with pytest.raises(ValueError, match=r"\['pair_counts'\] cannot be weighted"):
        weighted(update, 2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="must be a positive integer"):
            weighted(update, bad)
