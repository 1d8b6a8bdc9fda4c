"""The FedAvg family's client step (minibatch SGD with FedProx's proximal term) against the
update rules written out in numpy."""

import numpy as np
import pytest

from models.mf.als import RatingRows, UserParams
from models.mf.sgd import train_local_sgd


def _dense_sgd(users, items, ratings, q, b_item, p, b_user, mean, *, epochs, lr, reg, mu):
    """Full-batch gradient steps on the regularised squared error, every parameter moved at
    once from the same residuals, with the pull ``-mu (q_i - q_i^global)`` on item factors."""
    q0, b0 = q.copy(), b_item.copy()
    q, b_item, p, b_user = q.copy(), b_item.copy(), p.copy(), b_user.copy()
    for _ in range(epochs):
        err = ratings - (mean + b_user[users] + b_item[items] + np.sum(p[users] * q[items], 1))
        grad_q, grad_p = np.zeros_like(q), np.zeros_like(p)
        grad_bi, grad_bu = np.zeros_like(b_item), np.zeros_like(b_user)
        for e, u, i in zip(err, users, items, strict=True):
            grad_q[i] += e * p[u] - reg * q[i] - mu * (q[i] - q0[i])
            grad_p[u] += e * q[i] - reg * p[u]
            grad_bi[i] += e - reg * b_item[i]
            grad_bu[u] += e - reg * b_user[u]
        q, p = q + lr * grad_q, p + lr * grad_p
        b_item, b_user = b_item + lr * grad_bi, b_user + lr * grad_bu
    return np.column_stack([q - q0, b_item - b0])


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_full_batch_sgd_with_the_proximal_term_equals_the_dense_update(mu):
    rng = np.random.default_rng(1)
    n_users, m, k, n = 5, 4, 2, 14
    users, items = rng.integers(0, n_users, n), rng.integers(0, m, n)
    items[:m] = np.arange(m)  # every item has a row
    ratings = rng.uniform(1, 5, n)
    stack = rng.normal(size=(m, k + 1))
    p, b_user = rng.normal(size=(n_users, k)), rng.normal(size=n_users)
    settings = {"epochs": 3, "lr": 0.05, "reg": 0.1}

    got = train_local_sgd(
        RatingRows(users, items, ratings, n_users=n_users, n_items=m),
        stack,
        3.0,
        UserParams(p.copy(), b_user.copy()),
        np.arange(m),
        batch_size=n,  # one batch: the shuffle does not change the step
        prox_mu=mu,
        rng=np.random.default_rng(0),
        **settings,
    )

    expected = _dense_sgd(users, items, ratings, stack[:, :k], stack[:, k], p, b_user, 3.0,
                          mu=mu, **settings)  # fmt: skip
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
