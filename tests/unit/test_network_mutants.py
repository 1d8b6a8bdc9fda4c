"""The network's widths, its initialisation (Glorot-uniform weights, N(0, 0.001^2) biases), its
input without dropout (the normalised history), and its softmax at large logits: ``log_softmax``
against SciPy's, and the loss and its gradients unchanged when every logit is shifted by the same
large constant (a softmax does not see a common shift, so a numerically careful one gives the
same figures)."""

import numpy as np
import pytest
from scipy import sparse, special

from models.neural.network import (
    Architecture,
    check_params,
    corrupt,
    init_params,
    log_softmax,
    loss_and_gradients,
    normalize_rows,
)


@pytest.mark.parametrize("offset", [0.0, 800.0, -800.0])
def test_log_softmax_equals_scipys_even_where_exp_overflows(offset):
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 3.0, (5, 9)) + offset

    out = log_softmax(values)

    np.testing.assert_allclose(out, special.log_softmax(values, axis=1), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("kind", ["dae", "vae"])
def test_loss_and_gradients_do_not_see_a_large_common_shift_of_the_logits(kind):
    arch = Architecture(n_items=9, kind=kind, hidden=(5,), latent=3)
    params = init_params(arch, np.random.default_rng(1), dtype=np.float64)
    rng = np.random.default_rng(2)
    dense = (rng.random((6, 9)) < 0.4).astype(float)
    dense[np.arange(6), rng.integers(0, 9, 6)] = 1.0  # nobody is empty
    history = sparse.csr_matrix(dense)
    inputs = normalize_rows(history, np.float64)
    noise = rng.standard_normal((6, 3)) if kind == "vae" else None
    shifted = dict(params, dec1_b=params["dec1_b"] + 900.0)  # every logit + 900

    loss, grads = loss_and_gradients(params, arch, inputs, history, noise=noise, beta=0.2, l2=0.01)
    loss_s, grads_s = loss_and_gradients(shifted, arch, inputs, history, noise=noise, beta=0.2,
                                         l2=0.01)  # fmt: skip

    assert np.isfinite(loss_s.total)
    assert loss_s.nll == pytest.approx(loss.nll, rel=1e-9)
    assert loss_s.total == pytest.approx(loss.total, rel=1e-9)
    for name, grad in grads.items():
        np.testing.assert_allclose(grads_s[name], grad, rtol=1e-7, atol=1e-9, err_msg=name)


def test_no_dropout_is_allowed_and_gives_the_normalised_history():
    """``dropout`` is in [0, 1): at 0 the training input is the L2-normalised history."""
    history = sparse.csr_matrix(np.array([[1.0, 0.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0]]))

    out = corrupt(history, 0.0, np.random.default_rng(0), np.float64)

    np.testing.assert_allclose(
        out.toarray(), [[3**-0.5, 0.0, 3**-0.5, 3**-0.5], [0.0, 1.0, 0.0, 0.0]], rtol=1e-12
    )
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            corrupt(history, bad, np.random.default_rng(0))


def test_widths_of_one_are_allowed_and_widths_below_one_or_fractional_are_refused():
    arch = Architecture(n_items=1, kind="vae", hidden=(1,), latent=1)
    check_params(init_params(arch, np.random.default_rng(0)), arch)
    for bad in (dict(n_items=0), dict(latent=0), dict(hidden=(0,)), dict(latent=2.5),
                dict(hidden=(3, -1))):  # fmt: skip
        with pytest.raises(ValueError, match="must be integers >= 1"):
            Architecture(**(dict(n_items=5, kind="dae", hidden=(), latent=2) | bad))


def test_weights_are_glorot_uniform_and_biases_have_standard_deviation_0_001():
    """Weights uniform on +-sqrt(6 / (fan_in + fan_out)), so they fill the interval; biases
    N(0, 0.001^2)."""
    arch = Architecture(n_items=3000, kind="dae", hidden=(), latent=40)
    params = init_params(arch, np.random.default_rng(0), dtype=np.float64)

    for name in ("enc0_w", "dec0_w"):
        limit = np.sqrt(6.0 / 3040)
        w = params[name]
        assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
        assert np.std(w) == pytest.approx(limit / np.sqrt(3.0), rel=0.02)
    assert np.std(params["dec0_b"]) == pytest.approx(0.001, rel=0.05)
    assert abs(np.mean(params["dec0_b"])) < 1e-4
