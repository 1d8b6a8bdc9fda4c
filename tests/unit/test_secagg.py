"""Secure aggregation as the families use it: the protocol's sum (models/privacy/secagg_plus*)
composed with exact ALS and FedAvg, the two-stage family's implicit-ALS encoding, and the weak
pairwise-only masking of models/privacy/secagg.py kept out of everything that trains.

The protocol itself (Shamir, identities, dropouts, attacks) is tested in test_secagg_plus.py.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from models.privacy.identity import generate_identity
from models.privacy.secagg_plus import RoundConfig, default_threshold
from models.privacy.secagg_plus_driver import run_round

ROOT = Path(__file__).resolve().parents[2]


def _protocol_sum(
    n_clients: int, drop: dict[str, set[int]] | None = None
) -> Callable[[dict[int, np.ndarray]], np.ndarray]:
    """A ``secure_sum`` for the in-process loops: one full protocol round per call (identity keys
    made once, like a workspace's), every message through bytes."""
    identities = {u: generate_identity() for u in range(n_clients)}
    registry = {u: key.public_key() for u, key in identities.items()}
    rounds = itertools.count(1)

    def secure_sum(updates: dict[int, np.ndarray]) -> np.ndarray:
        size = next(iter(updates.values())).size
        n = len(updates)
        config = RoundConfig("unit", next(rounds), n, size, default_threshold(n))
        return run_round(
            updates, config, identities, registry, drop, state_through_bytes=True
        ).total

    return secure_sum


@pytest.mark.parametrize("algorithm", ["als", "fedavg"])
def test_the_protocols_sum_composes_with_exact_als_and_fedavg(algorithm):
    from models.data.partitions import build_clients
    from models.data.sharding import assign_clients
    from models.mf.federated import MFConfig, run_federated
    from tests.unit.helpers import low_rank_interactions

    data = low_rank_interactions(n_users=80, n_items=30, density=0.3, seed=2)
    owner = assign_clients(data, n_clients=4, strategy="iid", rng=np.random.default_rng(0))
    clients = build_clients(data, owner, np.zeros(len(data), dtype=np.int8))
    config = MFConfig(algorithm=algorithm, n_factors=3)

    protocol, sizes = _protocol_sum(4), []

    def secure_sum(updates: dict[int, np.ndarray]) -> np.ndarray:
        sizes.append(next(iter(updates.values())).size)
        return protocol(updates)

    plain, _ = run_federated(clients, data.n_items, config, rounds=3, eval_splits=())
    secure, history = run_federated(
        clients, data.n_items, config, rounds=3, eval_splits=(), secure_sum=secure_sum
    )

    np.testing.assert_allclose(secure.params.factors, plain.params.factors, atol=1e-6)
    np.testing.assert_allclose(secure.params.bias, plain.params.bias, atol=1e-6)
    assert secure.params.global_mean == pytest.approx(plain.params.global_mean, abs=1e-9)
    assert np.isfinite(history[-1].train_rmse)
    # the global mean's (sum, count) went through the protocol too, then the 3 training rounds
    assert sizes[0] == 2 and len(sizes) == 4


def _implicit_updates(dp: bool):
    from models.data.partitions import build_clients
    from models.data.sharding import assign_clients
    from models.privacy.dp import UserLevelDP
    from models.ranking.family import TwoStage
    from models.ranking.federated import RankingConfig
    from tests.unit.helpers import low_rank_interactions

    data = low_rank_interactions(n_users=60, n_items=25, density=0.3, seed=4)
    owner = assign_clients(data, n_clients=4, strategy="iid", rng=np.random.default_rng(1))
    clients = build_clients(data, owner, np.zeros(len(data), dtype=np.int8))
    config = RankingConfig(n_factors=3, ranker=None)
    if dp:
        config = RankingConfig(
            n_factors=3, ranker=None, dp=UserLevelDP.for_implicit(2.0, 20, len(clients))
        )
    family = TwoStage(config)
    state = family.initial_state(data.n_items, seed=0)
    updates = [
        family.client_round(c, state, "als", np.random.default_rng(10 + c.client_id), ())[0]
        for c in clients
    ]
    return family, state, updates, data.n_items


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_the_two_stage_als_sums_through_the_protocol_give_the_plain_item_step(dp):
    family, state, updates, n_items = _implicit_updates(dp)

    dense = {u.client_id: family.to_dense(u, n_items) for u in updates}
    combined = family.from_dense_sum(_protocol_sum(len(dense))(dense), n_items)
    secure = family.server_update(state, [combined], "als")
    plain = family.server_update(state, updates, "als")  # the oracle: the plain sums

    np.testing.assert_allclose(secure.factors, plain.factors, atol=1e-6)
    np.testing.assert_allclose(secure.popularity, plain.popularity, atol=1e-5)
    if not dp:  # exact integer counts and the rows behind them
        assert combined.counts.dtype == np.int64
        assert combined.metrics["train_n"] == sum(u.metrics["train_n"] for u in updates)


def test_the_two_stage_knn_update_has_no_dense_encoding():
    from models.protocol import ClientUpdate

    family, _, _, n_items = _implicit_updates(False)
    knn = ClientUpdate(0, np.array([1]), np.array([2]), {"pair_rows": np.array([1])})
    with pytest.raises(ValueError, match="only implicit-ALS updates have a dense encoding"):
        family.to_dense(knn, n_items)


def test_a_dropped_clients_masks_leave_the_sum_of_the_survivors_through_the_family():
    family, state, updates, n_items = _implicit_updates(False)
    dense = {u.client_id: family.to_dense(u, n_items) for u in updates}

    total = _protocol_sum(4, drop={"mask": {2}})(dense)

    survivors = [u for u in updates if u.client_id != 2]
    expected = family.server_update(state, survivors, "als")
    secure = family.server_update(state, [family.from_dense_sum(total, n_items)], "als")
    np.testing.assert_allclose(secure.factors, expected.factors, atol=1e-6)


def test_nothing_that_trains_imports_the_weak_pairwise_only_masking():
    """models/privacy/secagg.py re-masks survivors after a dropout (the leak the protocol
    removes); only the attack tests and the cost benchmark may import it, as the baseline."""
    users = []
    for folder in ("models", "tasks", "flows", "fedrec", "deployments"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                if "models.privacy.secagg" in names:
                    users.append(str(path.relative_to(ROOT)))
    assert users == []
