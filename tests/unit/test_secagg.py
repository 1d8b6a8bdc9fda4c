"""Secure aggregation: the masks cancel in the sum and hide every single update."""

import numpy as np
import pytest
from scipy import stats

from models.privacy.secagg import (
    FRACTION_BITS,
    ClientKeys,
    decode,
    encode,
    mask,
    secure_sum,
    survivors_round,
    unmask_sum,
)

CTX = b"fedrec/test/round-1"


def _fixed_keys(i: int) -> ClientKeys:
    """A key pair from fixed private bytes: the statistical tests below see the same masks on
    every run, so they pass or fail deterministically instead of once in a thousand runs."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private = X25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    return ClientKeys(private, private.public_key().public_bytes(*raw))


def test_unmasked_sum_equals_the_plain_sum_within_the_fixed_point_step():
    rng = np.random.default_rng(0)
    updates = {i: rng.normal(0, 50, size=(40, 7)) for i in range(5)}

    total = secure_sum(updates, CTX)

    step = 2.0**-FRACTION_BITS
    np.testing.assert_allclose(total, np.sum(list(updates.values()), axis=0), atol=5 * step)


def test_a_masked_update_is_uniform_and_independent_of_the_update():
    keys = {i: _fixed_keys(i) for i in range(3)}
    public = {i: k.public for i, k in keys.items()}
    zeros = encode(np.zeros(20_000))
    ones = encode(np.full(20_000, 1234.5))

    masked_zero = mask(0, zeros, keys[0], public, CTX) / 2.0**64
    masked_ones = mask(0, ones, keys[0], public, b"fedrec/test/round-2") / 2.0**64

    for sample in (masked_zero, masked_ones):
        assert stats.kstest(sample, "uniform").pvalue > 1e-3
    # two different updates give indistinguishable masked vectors
    assert stats.ks_2samp(masked_zero, masked_ones).pvalue > 1e-3
    assert abs(np.corrcoef(masked_zero, masked_ones)[0, 1]) < 0.05


def test_a_dropout_breaks_the_sum_and_the_survivors_round_repairs_it():
    rng = np.random.default_rng(1)
    updates = {i: rng.normal(size=30) for i in range(4)}
    keys = {i: ClientKeys.generate() for i in updates}
    public = {i: k.public for i, k in keys.items()}
    masked = {i: mask(i, encode(u), keys[i], public, CTX) for i, u in updates.items()}

    survivors = [0, 1, 3]  # client 2 agreed keys, then vanished
    broken = decode(unmask_sum([masked[i] for i in survivors]))
    repaired = survivors_round(updates, survivors, CTX, attempt=1)

    expected = np.sum([updates[i] for i in survivors], axis=0)
    assert np.abs(broken - expected).max() > 1e3  # client 2's masks do not cancel
    np.testing.assert_allclose(repaired, expected, atol=3 * 2.0**-FRACTION_BITS)


def test_overflowing_values_are_refused():
    with pytest.raises(ValueError, match="overflows the fixed-point range"):
        encode(np.array([2.0**40]))


@pytest.mark.parametrize("algorithm", ["als", "fedavg"])
def test_secure_aggregation_composes_with_exact_als_and_fedavg(algorithm):
    from functools import partial

    from models.data.partitions import build_clients
    from models.data.sharding import assign_clients
    from models.mf.federated import MFConfig, run_federated
    from tests.unit.helpers import low_rank_interactions

    data = low_rank_interactions(n_users=80, n_items=30, density=0.3, seed=2)
    owner = assign_clients(data, n_clients=4, strategy="iid", rng=np.random.default_rng(0))
    clients = build_clients(data, owner, np.zeros(len(data), dtype=np.int8))
    config = MFConfig(algorithm=algorithm, n_factors=3)

    plain, _ = run_federated(clients, data.n_items, config, rounds=3, eval_splits=())
    secure, history = run_federated(clients, data.n_items, config, rounds=3, eval_splits=(),
                                    secure_sum=partial(secure_sum, context=CTX))  # fmt: skip

    np.testing.assert_allclose(secure.params.factors, plain.params.factors, atol=1e-5)
    np.testing.assert_allclose(secure.params.bias, plain.params.bias, atol=1e-5)
    assert np.isfinite(history[-1].train_rmse)
