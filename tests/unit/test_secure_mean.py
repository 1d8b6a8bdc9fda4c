"""The explicit family's global-mean phase under secure aggregation: each client's answer is its
two numbers as a dense vector, and the sum of the vectors (masked, then unmasked by the protocol)
gives the server exactly the mean the clear answers give, with nothing per client in it."""

from __future__ import annotations

import numpy as np
import pytest

from models.data.partitions import build_clients
from models.data.sharding import assign_clients, split_rows
from models.data.synthetic import generate_synthetic
from models.federation.sampling import client_rng
from models.mf.family import ExplicitMF
from models.mf.federated import MFConfig
from models.privacy.fixed_point import decode, encode

N_CLIENTS = 4


@pytest.fixture(scope="module")
def clients():
    data = generate_synthetic(n_users=120, n_items=60, n_interactions=2500, seed=4)
    rng = np.random.default_rng(0)
    owner = assign_clients(data, n_clients=N_CLIENTS, strategy="dirichlet", rng=rng)
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.1)
    return data, build_clients(data, owner, split)


def test_the_mean_phase_is_two_numbers_and_its_sum_gives_the_plain_mean(clients):
    data, parts = clients
    family = ExplicitMF(MFConfig(n_factors=3))
    state = family.initial_state(data.n_items, seed=0)
    answers = [
        family.client_round(c, state, "mean", client_rng(0, 0, c.client_id), ())[0] for c in parts
    ]

    dense = [family.to_dense(u, data.n_items) for u in answers]
    for client, vector in zip(parts, dense, strict=True):
        train = client.rows("train")
        np.testing.assert_array_equal(vector, [train.ratings.sum(), len(train)])
    total = family.from_dense_sum(
        decode(np.sum([encode(v, n_clients=N_CLIENTS) for v in dense], axis=0)), data.n_items
    )

    assert total.items.size == 0 and not total.arrays
    # an independent oracle: every client's training ratings pooled
    pooled = np.concatenate([c.rows("train").ratings for c in parts])
    assert total.metrics == {"rating_sum": pytest.approx(pooled.sum(), abs=1e-9), "n": len(pooled)}
    secure = family.server_update(state, [total], "mean")
    plain = family.server_update(state, answers, "mean")
    assert secure.params.global_mean == pytest.approx(pooled.mean(), abs=1e-12)
    assert secure.params.global_mean == pytest.approx(plain.params.global_mean, abs=1e-12)


def test_a_training_update_keeps_its_own_encoding(clients):
    data, parts = clients
    family = ExplicitMF(MFConfig(n_factors=3))
    state = family.initial_state(data.n_items, seed=0)
    update, _ = family.client_round(parts[0], state, "train", client_rng(0, 1, 0), ())

    vector = family.to_dense(update, data.n_items)

    assert vector.size > 2
    back = family.from_dense_sum(vector, data.n_items)
    assert back.items.tolist() == sorted(update.items.tolist())
