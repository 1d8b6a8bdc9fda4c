"""The network's optimizer and training loop against written-out oracles: Adam as Kingma and Ba
state it (bias-corrected moments), the KL weight's linear warm-up, the settings' bounds, and an
epoch's reported loss against the batch objective at the starting parameters."""

import numpy as np
import pytest
from scipy import sparse

from models.neural.network import Architecture, corrupt, init_params, loss_and_gradients
from models.neural.training import AdamState, TrainConfig, adam_step, train_epochs


def test_adam_steps_equal_the_textbook_bias_corrected_update():
    rng = np.random.default_rng(0)
    config = TrainConfig(learning_rate=0.01, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-3)
    params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    expected = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    state = AdamState.zeros_like(params)
    for t in range(1, 5):
        grads = {k: rng.normal(size=v.shape) * t for k, v in params.items()}
        adam_step(params, grads, state, config)
        for k in params:
            m[k] = 0.8 * m[k] + 0.2 * grads[k]
            v2[k] = 0.95 * v2[k] + 0.05 * grads[k] ** 2
            m_hat, v_hat = m[k] / (1 - 0.8**t), v2[k] / (1 - 0.95**t)
            expected[k] = expected[k] - 0.01 * m_hat / (np.sqrt(v_hat) + 1e-3)
            np.testing.assert_allclose(params[k], expected[k], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(state.first[k], m[k], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(state.second[k], v2[k], rtol=1e-12, atol=1e-15)
        assert state.step == t


def test_the_kl_weight_rises_linearly_to_its_cap_and_stays():
    config = TrainConfig(beta_cap=0.4, anneal_epochs=10.0)
    assert config.beta(0.0) == 0.0
    assert config.beta(2.5) == pytest.approx(0.1)
    assert config.beta(10.0) == pytest.approx(0.4) and config.beta(25.0) == pytest.approx(0.4)
    assert TrainConfig(beta_cap=0.4, anneal_epochs=0).beta(0.0) == 0.4


def test_the_settings_bounds():
    TrainConfig(batch_size=1, dropout=0.0, beta_cap=0.0, anneal_epochs=0.0, l2=0.0)
    bad = [
        ({"learning_rate": 0.0}, "learning_rate=0.0 must be > 0"),
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0.1 must be in \[0, 1\)"),
        ({"beta_cap": -0.1}, "must be >= 0"),
        ({"anneal_epochs": -1.0}, "must be >= 0"),
        ({"l2": -1e-3}, "must be >= 0"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs)


def test_an_epochs_reported_loss_is_the_batch_objective_at_its_start():
    """One batch holding every user, no dropout, a DAE: the epoch's loss terms are the batch
    objective of the starting parameters; the user without history is not counted."""
    rng = np.random.default_rng(3)
    dense = (rng.random((12, 15)) < 0.3).astype(float)
    dense[5] = 0.0  # no interactions: skipped
    history = sparse.csr_matrix(dense)
    arch = Architecture(n_items=15, kind="dae", hidden=(), latent=4)
    params = init_params(arch, np.random.default_rng(1), dtype=np.float64)
    config = TrainConfig(learning_rate=1e-2, batch_size=50, dropout=0.0, l2=1e-3, anneal_epochs=4)

    _, _, stats = train_epochs(
        params, arch, history, config, epochs=1, rng=np.random.default_rng(2), start_epoch=2
    )

    order = np.random.default_rng(2).permutation(np.flatnonzero(dense.sum(axis=1) > 0))
    batch = history[order]
    loss, _ = loss_and_gradients(
        params, arch, corrupt(batch, 0.0, None, np.float64), batch, noise=None, beta=0.25, l2=1e-3
    )
    (epoch,) = stats
    assert epoch.epoch == 3 and epoch.users == 11
    assert epoch.beta == pytest.approx(config.beta(3))
    assert epoch.loss == pytest.approx(loss.total, rel=1e-9)
    assert epoch.nll == pytest.approx(loss.nll, rel=1e-9)
    assert epoch.kl == pytest.approx(loss.kl, abs=1e-12)


def test_every_batch_steps_once_a_batch_of_one_included_and_zero_epochs_train_nothing():
    rng = np.random.default_rng(4)
    dense = (rng.random((11, 9)) < 0.4).astype(float)
    dense[np.arange(11), rng.integers(0, 9, 11)] = 1.0  # every user active: batches 5, 5, 1
    history = sparse.csr_matrix(dense)
    arch = Architecture(n_items=9, kind="vae", hidden=(), latent=3)
    params = init_params(arch, np.random.default_rng(1), dtype=np.float64)
    config = TrainConfig(learning_rate=1e-2, batch_size=5, dropout=0.0, anneal_epochs=10.0)

    _, state, stats = train_epochs(
        params, arch, history, config, epochs=2, rng=np.random.default_rng(2), start_epoch=4
    )

    assert state.step == 6  # three batches in each of two epochs
    assert [s.epoch for s in stats] == [5, 6] and [s.users for s in stats] == [11, 11]
    assert [s.beta for s in stats] == [pytest.approx(config.beta(5)), pytest.approx(config.beta(6))]
    assert all(s.kl > 0 for s in stats)  # a VAE reports its KL term per user
    flat = TrainConfig(learning_rate=1e-2, batch_size=5, dropout=0.0, anneal_epochs=0.0)
    _, _, constant = train_epochs(
        params, arch, history, flat, epochs=2, rng=np.random.default_rng(2)
    )
    for s in constant:  # one KL weight all epoch long: the mean loss is the mean terms combined
        assert s.loss == pytest.approx(s.nll + flat.beta_cap * s.kl, rel=1e-9)
    same, untouched, none = train_epochs(
        params, arch, history, config, epochs=0, rng=np.random.default_rng(2)
    )
    assert none == [] and untouched.step == 0
    for name, value in params.items():
        np.testing.assert_array_equal(same[name], value)
    with pytest.raises(ValueError, match="epochs=-1 must be >= 0"):
        train_epochs(params, arch, history, config, epochs=-1, rng=np.random.default_rng(2))


def test_a_vae_epoch_samples_its_latent_noise_from_the_stream_after_the_user_order():
    """One batch, no dropout: the epoch's loss is the VAE objective at the starting parameters
    with the standard normal draw that follows the permutation in the same stream."""
    rng = np.random.default_rng(5)
    dense = (rng.random((10, 12)) < 0.4).astype(float)
    dense[np.arange(10), rng.integers(0, 12, 10)] = 1.0
    history = sparse.csr_matrix(dense)
    arch = Architecture(n_items=12, kind="vae", hidden=(), latent=3)
    params = init_params(arch, np.random.default_rng(1), dtype=np.float64)
    config = TrainConfig(learning_rate=1e-2, batch_size=50, dropout=0.0, anneal_epochs=0.0)

    _, _, (epoch,) = train_epochs(
        params, arch, history, config, epochs=1, rng=np.random.default_rng(2)
    )

    stream = np.random.default_rng(2)
    batch = history[stream.permutation(np.arange(10))]
    noise = stream.standard_normal((10, 3), dtype=np.float32).astype(np.float64)
    inputs = corrupt(batch, 0.0, None, np.float64)
    drawn, _ = loss_and_gradients(params, arch, inputs, batch, noise=noise, beta=0.2, l2=0.0)
    mean, _ = loss_and_gradients(params, arch, inputs, batch, noise=None, beta=0.2, l2=0.0)
    assert abs(drawn.nll - mean.nll) > 1e-6  # the draw matters on this data
    assert epoch.loss == pytest.approx(drawn.total, rel=1e-9)
    assert epoch.kl == pytest.approx(drawn.kl, rel=1e-9)
