import numpy as np
import pytest

from models.server_optimizers import ServerOptimizerState, apply_server_update


def test_sgd_with_unit_lr_is_plain_fedavg_and_skips_untouched_rows():
    params = np.arange(6.0).reshape(3, 2)
    delta = np.ones((3, 2))
    touched = np.array([True, False, True])

    new, state = apply_server_update(params, delta, touched, None, rule="sgd", lr=1.0)

    np.testing.assert_array_equal(new, [[1, 2], [2, 3], [5, 6]])
    assert state is None
    np.testing.assert_array_equal(params, np.arange(6.0).reshape(3, 2))  # input untouched


@pytest.mark.parametrize("rule", ["adam", "yogi"])
def test_adaptive_rules_follow_reddi_et_al_by_hand(rule):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    # the third change is smaller than the second moment, so Yogi's v moves down after two up
    x0, deltas = 0.5, (0.2, -0.4, 0.01)
    state = ServerOptimizerState.zeros_like(np.full((1, 1), x0), tau)
    x = np.full((1, 1), x0)
    # independent scalar oracle
    m, v, ref = 0.0, tau * tau, x0
    for d in deltas:
        x, state = apply_server_update(
            x,
            np.full((1, 1), d),
            np.array([True]),
            state,
            rule=rule,
            lr=lr,
            beta1=b1,
            beta2=b2,
            tau=tau,
        )
        m = b1 * m + (1 - b1) * d
        v = (
            b2 * v + (1 - b2) * d * d
            if rule == "adam"
            else v - (1 - b2) * d * d * np.sign(v - d * d)
        )
        ref = ref + lr * m / (np.sqrt(v) + tau)
        assert x[0, 0] == pytest.approx(ref, rel=1e-12)
        assert state.second[0, 0] == pytest.approx(v, rel=1e-12)


def test_adaptive_rule_leaves_untouched_rows_and_their_moments():
    state = ServerOptimizerState.zeros_like(np.zeros((2, 1)), 1e-3)
    new, after = apply_server_update(
        np.zeros((2, 1)), np.ones((2, 1)), np.array([True, False]), state, rule="adam", lr=0.1
    )
    assert (
        new[1, 0] == 0.0 and after.first[1, 0] == 0.0 and after.second[1, 0] == state.second[1, 0]
    )
    assert new[0, 0] > 0


def test_unknown_rule_and_missing_state_are_errors():
    with pytest.raises(ValueError, match="allowed: sgd, adam, yogi"):
        apply_server_update(
            np.zeros((1, 1)), np.zeros((1, 1)), np.array([True]), None, rule="momentum", lr=1.0
        )
    with pytest.raises(ValueError, match="needs moment state"):
        apply_server_update(
            np.zeros((1, 1)), np.zeros((1, 1)), np.array([True]), None, rule="adam", lr=1.0
        )
