"""The explicit family's server step and settings at their edges.

Oracles: FedAvg's definition (the new item parameters are the clients' local models averaged with
their row counts as weights, ``np.average``), and the bounds each setting states.
"""

import numpy as np
import pytest

from models.mf.federated import MFConfig, init_global_state, server_update
from models.protocol import ClientUpdate


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_by_default_take_the_count_weighted_average_of_the_local_models(
    algorithm,
):
    config = MFConfig(algorithm=algorithm, n_factors=2)
    state = init_global_state(4, config, [{"rating_sum": 9.0, "n": 3.0}], seed=1)
    start = state.params.stacked()  # (4, 3): two factors and the bias
    rng = np.random.default_rng(2)
    # the clients' local models of the items they trained, and their rows per item
    local = {0: (np.array([0, 1]), np.array([2, 5])), 1: (np.array([1, 2]), np.array([1, 3]))}
    models = {c: start[items] + rng.normal(size=(items.size, 3)) for c, (items, _) in local.items()}
    updates = [
        ClientUpdate(c, items, counts, {"delta": models[c] - start[items]})
        for c, (items, counts) in local.items()
    ]

    after = server_update(state, updates, config).params.stacked()

    np.testing.assert_allclose(after[0], models[0][0], rtol=1e-12)
    np.testing.assert_allclose(
        after[1], np.average([models[0][1], models[1][0]], axis=0, weights=[5, 1]), rtol=1e-12
    )
    np.testing.assert_allclose(after[2], models[1][1], rtol=1e-12)
    np.testing.assert_array_equal(after[3], start[3])  # nobody trained it
    assert config.effective_server_lr == 1.0


def test_the_smallest_settings_are_accepted_and_the_bounds_refused():
    MFConfig(n_factors=1, local_epochs=1, batch_size=1, top_k=1)
    MFConfig(algorithm="fedavg", server_lr=0.5)
    for name in ("n_factors", "local_epochs", "batch_size", "top_k"):
        with pytest.raises(ValueError, match=f"{name}=0 must be >= 1"):
            MFConfig(**{name: 0})
    for name in ("reg", "local_lr", "init_std"):
        with pytest.raises(ValueError, match=rf"{name}=0\.0 must be > 0"):
            MFConfig(**{name: 0.0})
    with pytest.raises(ValueError, match=r"server_lr=0\.0 must be > 0"):
        MFConfig(algorithm="fedavg", server_lr=0.0)


def test_the_starting_mean_is_the_clients_mean_or_under_dp_the_scales_middle():
    from models.privacy.dp import UserLevelDP

    sums = [{"rating_sum": 7.0, "n": 2.0}, {"rating_sum": 5.0, "n": 2.0}]
    assert init_global_state(3, MFConfig(), sums, seed=0).params.global_mean == 3.0
    assert (
        init_global_state(3, MFConfig(), [{"rating_sum": 0.0, "n": 0.0}], 0).params.global_mean == 0
    )
    dp = UserLevelDP(noise_multiplier=1.0, max_items=5)
    private = MFConfig(dp=dp, clip_to=(1.0, 5.0))
    assert init_global_state(3, private, sums, seed=0).params.global_mean == 3.0  # (1 + 5) / 2
    skewed = [{"rating_sum": 9.0, "n": 2.0}]  # a data mean of 4.5 must not leak into the start
    assert init_global_state(3, private, skewed, seed=0).params.global_mean == 3.0
    assert init_global_state(3, MFConfig(dp=dp), skewed, seed=0).params.global_mean == 0.0
