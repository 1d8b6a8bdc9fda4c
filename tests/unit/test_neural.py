"""The neural model (Mult-DAE / Mult-VAE): gradients against finite differences, the loss against
a dense re-computation, the checkerboard with withheld items, FedAvg against centralized epochs
and np.average, and safe persistence."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from models.neural.federated import (
    FederatedConfig,
    NeuralUpdate,
    aggregate_updates,
    client_rng,
    client_update,
    init_server_state,
    run_federated,
    server_update,
)
from models.neural.network import (
    Architecture,
    corrupt,
    init_params,
    load_network,
    loss_and_gradients,
    normalize_rows,
    save_network,
)
from models.neural.recommender import NeuralRecommender
from models.neural.training import TrainConfig, train_epochs
from models.recommenders import RequestError
from tests.unit.helpers import without_met

ARCHITECTURES = {
    "vae": Architecture(n_items=7, kind="vae", hidden=(5,), latent=3),
    "dae": Architecture(n_items=7, kind="dae", hidden=(), latent=4),
    "deep-dae": Architecture(n_items=7, kind="dae", hidden=(6, 5), latent=3),
}


def _random_history(n_users: int, n_items: int, density: float, seed: int) -> sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, n_items)) < density).astype(float)
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0  # nobody is empty
    return sparse.csr_matrix(dense)


def _dense_loss(params, arch, inputs, targets, noise, beta, l2) -> float:
    """The objective written out on dense arrays, independently of the module's forward pass."""
    h = inputs.toarray()
    n_enc = len(arch.encoder_dims) - 1
    for i in range(n_enc):
        h = h @ params[f"enc{i}_w"] + params[f"enc{i}_b"]
        if i < n_enc - 1 or arch.kind == "dae":
            h = np.tanh(h)
    kl = 0.0
    if arch.kind == "vae":
        mu, logvar = h[:, : arch.latent], h[:, arch.latent :]
        h = mu + noise * np.exp(logvar / 2)
        kl = 0.5 * np.sum(-logvar + np.exp(logvar) + mu**2 - 1) / h.shape[0]
    n_dec = len(arch.decoder_dims) - 1
    for i in range(n_dec):
        h = h @ params[f"dec{i}_w"] + params[f"dec{i}_b"]
        if i < n_dec - 1:
            h = np.tanh(h)
    probs = np.exp(h) / np.exp(h).sum(axis=1, keepdims=True)
    nll = -np.sum(targets.toarray() * np.log(probs)) / h.shape[0]
    penalty = l2 * sum(np.sum(v**2) for k, v in params.items() if k.endswith("_w"))
    return nll + beta * kl + penalty


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_gradients_match_finite_differences(name):
    # Prepare: a float64 network, a fixed corrupted input and a fixed noise draw.
    arch = ARCHITECTURES[name]
    rng = np.random.default_rng(1)
    params = init_params(arch, rng, dtype=np.float64)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}  # biases too
    targets = _random_history(4, arch.n_items, 0.4, seed=2)
    inputs = corrupt(targets, 0.3, rng, dtype=np.float64)
    noise = rng.standard_normal((4, arch.latent)) if arch.kind == "vae" else None
    beta, l2 = 0.3, 0.01

    # Execute
    loss, grads = loss_and_gradients(params, arch, inputs, targets, noise=noise, beta=beta, l2=l2)

    # Assert: the loss equals the dense oracle, and every gradient entry its central difference.
    assert loss.total == pytest.approx(
        _dense_loss(params, arch, inputs, targets, noise, beta, l2), rel=1e-12
    )
    step = 1e-6
    for key, value in params.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            original = value[idx]
            value[idx] = original + step
            up = loss_and_gradients(params, arch, inputs, targets, noise=noise, beta=beta, l2=l2)
            value[idx] = original - step
            down = loss_and_gradients(params, arch, inputs, targets, noise=noise, beta=beta, l2=l2)
            value[idx] = original
            numeric[idx] = (up[0].total - down[0].total) / (2 * step)
        assert grads[key].shape == value.shape
        np.testing.assert_allclose(grads[key], numeric, rtol=1e-5, atol=1e-8, err_msg=key)


def test_normalize_rows_gives_unit_rows_and_keeps_empty_rows_zero():
    history = sparse.csr_matrix(np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 4.0]]))
    x = normalize_rows(history).toarray()
    np.testing.assert_allclose(x, [[0.5**0.5, 0.5**0.5, 0], [0, 0, 0], [0, 0.6, 0.8]], rtol=1e-6)


def test_dropout_keeps_the_expected_share_and_rescales():
    history = sparse.csr_matrix(np.ones((200, 50)))
    x = corrupt(history, 0.5, np.random.default_rng(0))
    kept = x.nnz / (200 * 50)
    assert 0.47 < kept < 0.53
    np.testing.assert_allclose(x.data, 2 / np.sqrt(50), rtol=1e-6)  # 1/sqrt(50) scaled by 1/keep


@pytest.mark.parametrize("kind", ["dae", "vae"])
def test_training_lowers_the_loss(kind):
    arch = Architecture(n_items=30, kind=kind, hidden=(16,), latent=8)
    history = _random_history(80, 30, 0.2, seed=3)
    params = init_params(arch, np.random.default_rng(0))
    config = TrainConfig(learning_rate=1e-2, batch_size=20, dropout=0.2, anneal_epochs=0)

    _, _, stats = train_epochs(
        params, arch, history, config, epochs=30, rng=np.random.default_rng(1)
    )

    assert stats[-1].nll < 0.9 * stats[0].nll
    assert [s.epoch for s in stats] == list(range(1, 31))


def _checkerboard() -> tuple[sparse.csr_matrix, np.ndarray]:
    """Two groups of 30 users and two groups of 10 items; a user liked every item of its group
    but one (withheld, a different one per user), and nothing of the other group."""
    n_users, n_items = 60, 20
    dense = np.zeros((n_users, n_items))
    withheld = np.empty(n_users, dtype=np.int64)
    for u in range(n_users):
        group = u % 2
        items = np.arange(10) + 10 * group
        withheld[u] = items[(u // 2) % 10]
        dense[u, items] = 1.0
        dense[u, withheld[u]] = 0.0
    return sparse.csr_matrix(dense), withheld


@pytest.mark.parametrize("kind", ["dae", "vae"])
def test_checkerboard_recommends_the_withheld_item(kind):
    history, withheld = _checkerboard()
    arch = Architecture(n_items=20, kind=kind, hidden=(16,), latent=4)
    config = TrainConfig(learning_rate=1e-2, batch_size=16, dropout=0.5, anneal_epochs=10)
    params, _, _ = train_epochs(
        init_params(arch, np.random.default_rng(0)),
        arch,
        history,
        config,
        epochs=60,
        rng=np.random.default_rng(1),
    )
    model = NeuralRecommender(params, arch, np.array([f"i{i}" for i in range(20)]), np.ones(20))
    requests = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(60)],
            "history_items": [[f"i{i}" for i in history[u].indices] for u in range(60)],
        }
    )

    top = model.recommend(requests, k=1)

    assert top["item_id"].tolist() == [f"i{i}" for i in withheld]


def test_fedavg_one_client_one_epoch_equals_one_centralized_epoch():
    arch = ARCHITECTURES["vae"]
    history = _random_history(50, arch.n_items, 0.4, seed=5)
    config = TrainConfig(learning_rate=1e-2, batch_size=8)
    start = init_params(arch, np.random.default_rng(0))

    federated = run_federated(
        start, arch, [history], config, FederatedConfig(rounds=1, local_epochs=1), seed=7
    )
    central, _, _ = train_epochs(start, arch, history, config, epochs=1, rng=client_rng(7, 1, 0))

    for key in start:
        np.testing.assert_array_equal(federated[key], central[key], err_msg=key)
        assert federated[key].dtype == np.float32
    assert not np.array_equal(central["dec0_w"], start["dec0_w"])  # it did train


def test_fedavg_aggregation_is_the_user_weighted_mean_of_client_models():
    arch = ARCHITECTURES["dae"]
    histories = [_random_history(n, arch.n_items, 0.4, seed=n) for n in (5, 12, 30)]
    config = TrainConfig(learning_rate=1e-2, batch_size=4)
    start = init_params(arch, np.random.default_rng(0))
    federated_config = FederatedConfig(rounds=1, local_epochs=2)

    updates = [
        client_update(
            start, arch, h, config, local_epochs=2, start_epoch=0, rng=client_rng(3, 1, c)
        )
        for c, h in enumerate(histories)
    ]
    new, state = server_update(start, aggregate_updates(updates), None, federated_config)

    local_models = [
        train_epochs(start, arch, h, config, epochs=2, rng=client_rng(3, 1, c))[0]
        for c, h in enumerate(histories)
    ]
    assert [u.users for u in updates] == [5, 12, 30]
    assert state is None
    for key in start:
        oracle = np.average(
            [m[key].astype(np.float64) for m in local_models], axis=0, weights=[5, 12, 30]
        )
        np.testing.assert_allclose(new[key], oracle, rtol=1e-6, atol=1e-7, err_msg=key)


def test_aggregation_refuses_empty_rounds():
    with pytest.raises(ValueError, match="zero"):
        aggregate_updates([])
    empty = NeuralUpdate({"enc0_w": np.zeros((2, 2))}, 0, float("nan"))
    with pytest.raises(ValueError, match="sum to 0"):
        aggregate_updates([empty])


def test_a_client_without_interactions_sends_a_zero_weight_update():
    arch = ARCHITECTURES["dae"]
    start = init_params(arch, np.random.default_rng(0))
    update = client_update(
        start,
        arch,
        sparse.csr_matrix((3, arch.n_items)),
        TrainConfig(),
        local_epochs=1,
        start_epoch=0,
        rng=np.random.default_rng(0),
    )
    assert update.users == 0
    assert all(not v.any() for v in update.deltas.values())


def test_fedadam_training_lowers_the_loss():
    arch = Architecture(n_items=30, kind="vae", hidden=(16,), latent=8)
    histories = [_random_history(40, 30, 0.2, seed=s) for s in (1, 2, 3)]
    config = TrainConfig(learning_rate=1e-2, batch_size=10, anneal_epochs=0)
    federated = FederatedConfig(rounds=15, local_epochs=1, server_rule="fedadam", server_lr=0.01)
    start = init_params(arch, np.random.default_rng(0))
    losses = []

    final = run_federated(
        start,
        arch,
        histories,
        config,
        federated,
        seed=0,
        on_round=lambda stats, _: losses.append(stats.loss),
    )

    assert losses[-1] < losses[0]
    assert not np.array_equal(final["dec0_w"], start["dec0_w"])


def test_fedadam_server_steps_are_adam_by_hand_and_carry_the_moments_between_rounds():
    """Two server steps on every parameter against a scalar oracle of Reddi et al.'s Adam:
    m = b1 m + (1 - b1) d, v = b2 v + (1 - b2) d^2 from v = tau^2, x += lr m / (sqrt(v) + tau)."""
    lr, b1, b2, tau = 0.1, 0.8, 0.95, 1e-2  # none the default: each setting must reach the step
    config = FederatedConfig(server_rule="fedadam", server_lr=lr, server_beta1=b1,
                             server_beta2=b2, server_tau=tau)  # fmt: skip
    params = {"enc0_w": np.full((2, 3), 0.5, dtype=np.float32), "enc0_b": np.zeros(3, np.float32)}
    state = init_server_state(params, config)
    assert init_server_state(params, replace(config, server_rule="fedavg")) is None

    m, v, x = 0.0, tau * tau, {"enc0_w": 0.5, "enc0_b": 0.0}
    for d in (0.2, -0.4):
        params, state = server_update(
            params, {k: np.full(a.shape, d) for k, a in params.items()}, state, config
        )
        m, v = b1 * m + (1 - b1) * d, b2 * v + (1 - b2) * d * d
        for name in x:
            x[name] += lr * m / (np.sqrt(v) + tau)
            assert params[name].dtype == np.float32, name
            np.testing.assert_allclose(params[name], x[name], rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(state[name].first, m, rtol=1e-12, err_msg=name)
            np.testing.assert_allclose(state[name].second, v, rtol=1e-12, err_msg=name)
    with pytest.raises(ValueError, match="FedAdam needs server state"):
        server_update(params, params, None, config)


def test_network_file_round_trips_exactly_without_pickle(tmp_path):
    arch = ARCHITECTURES["vae"]
    params = init_params(arch, np.random.default_rng(0))
    save_network(tmp_path / "net.npz", params, arch)

    loaded, loaded_arch = load_network(tmp_path / "net.npz")

    assert loaded_arch == arch
    for key in params:
        np.testing.assert_array_equal(loaded[key], params[key])
        assert loaded[key].dtype == params[key].dtype
    with np.load(tmp_path / "net.npz", allow_pickle=False) as data:
        assert all(data[k].dtype.kind != "O" for k in data.files)


def test_recommender_round_trips_and_answers_the_same(tmp_path):
    history, _ = _checkerboard()
    arch = Architecture(n_items=20, kind="vae", hidden=(8,), latent=4)
    params, _, _ = train_epochs(
        init_params(arch, np.random.default_rng(0)),
        arch,
        history,
        TrainConfig(learning_rate=1e-2, batch_size=16),
        epochs=3,
        rng=np.random.default_rng(0),
    )
    titles = np.array([f"Movie {i}" for i in range(20)], dtype=object)
    model = NeuralRecommender(
        params, arch, np.array([str(i) for i in range(20)]), np.arange(20.0), titles
    )
    requests = pd.DataFrame({"user_id": ["a", "b"], "history_items": [["1", "3", "5"], ["12"]]})

    model.save(tmp_path / "rec")
    loaded = NeuralRecommender.load(tmp_path / "rec")

    pd.testing.assert_frame_equal(loaded.recommend(requests, k=5), model.recommend(requests, k=5))
    np.testing.assert_array_equal(loaded.score(history), model.score(history))
    assert json.loads((tmp_path / "rec" / "recommender.json").read_text())["kind"] == "neural"
    # trained on rows rated >= 3, it reads a rated history the same way (kept when saved)
    replace(model, positive_threshold=3.0).save(tmp_path / "strict")
    strict = NeuralRecommender.load(tmp_path / "strict")
    rated = requests.assign(history_ratings=[[5.0, 1.0, 4.0], [2.0]])
    kept = pd.DataFrame({"user_id": ["a", "b"], "history_items": [["1", "5"], []]})
    # ... and recommends none of its items, the ones rated below the threshold included
    met = {"a": {"1", "3", "5"}, "b": {"12"}}
    expected = without_met(model.recommend(kept, k=9), met, k=5)
    pd.testing.assert_frame_equal(strict.recommend(rated, k=5), expected)
    assert {"3", "12"} & set(model.recommend(kept, k=5).item_id)  # which it used to recommend
    asked = strict.recommend(rated.assign(items=[["3", "2"], ["4"]]))  # 3: rated 1 by "a"
    mine = asked[asked.user_id == "a"].set_index("item_id")
    assert mine.loc["3", "reason"] == "in the history: not scored" and np.isnan(
        mine.loc["3", "score"]
    )
    assert mine.index.tolist() == ["2", "3"] and np.isfinite(mine.loc["2", "score"])
    assert strict.positive_threshold == 3.0
    # ratings that do not pair with the history, and k below 1, are refused
    unpaired = requests.assign(history_ratings=[[5.0, 1.0, 4.0], [2.0, 5.0]])
    with pytest.raises(RequestError, match=r"^request row 1 \(user 'b'\): history_ratings 2 rat"):
        strict.recommend(unpaired)
    with pytest.raises(RequestError, match=r"^k 0 is not a positive integer"):
        model.recommend(requests, k=0)


def test_recommend_masks_history_and_explains_cold_start_and_unknown_items():
    arch = Architecture(n_items=6, kind="dae", hidden=(), latent=3)
    params = init_params(arch, np.random.default_rng(0))
    popularity = np.array([5.0, 1.0, 9.0, 0.0, 3.0, 2.0])
    model = NeuralRecommender(params, arch, np.array(list("abcdef")), popularity)
    requests = pd.DataFrame(
        {
            "user_id": ["seen", "cold", "odd"],
            "history_items": [["a", "b"], [], ["zz", "c"]],
        }
    )

    out = model.recommend(requests, k=3)

    seen = out[out["user_id"] == "seen"]
    assert set(seen["item_id"]).isdisjoint({"a", "b"})
    assert seen["rank"].tolist() == [1, 2, 3]
    assert seen["score"].is_monotonic_decreasing
    assert all(r.startswith("because you liked ") for r in seen["reason"])
    cold = out[out["user_id"] == "cold"]
    assert cold["item_id"].tolist() == ["c", "a", "e"]  # by popularity
    assert all("most popular" in r for r in cold["reason"])
    odd = out[out["user_id"] == "odd"]
    assert "c" not in set(odd["item_id"])
    assert all("ignored 1 unknown item(s): zz" in r for r in odd["reason"])
    assert all(r.startswith("because you liked c") for r in odd["reason"])  # its only history


def test_recommend_scores_requested_items_best_first():
    arch = Architecture(n_items=4, kind="vae", hidden=(3,), latent=2)
    model = NeuralRecommender(
        init_params(arch, np.random.default_rng(0)), arch, np.array(list("wxyz")), np.ones(4)
    )
    requests = pd.DataFrame(
        {"user_id": ["u"], "history_items": [["w"]], "items": [["z", "nope", "x"]]}
    )

    out = model.recommend(requests)

    full = model.score(sparse.csr_matrix(([1.0], ([0], [0])), shape=(1, 4)))[0]
    best = sorted([("z", full[3]), ("x", full[1])], key=lambda pair: -pair[1])
    assert out["item_id"].tolist() == [item for item, _ in best] + ["nope"]
    np.testing.assert_allclose(out["score"], [score for _, score in best] + [np.nan])
    assert out["reason"].iloc[-1] == "unknown item: not scored"


def test_bad_settings_give_one_clear_error():
    with pytest.raises(ValueError, match="kind='mlp' is unknown"):
        Architecture(n_items=5, kind="mlp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dropout=1\.0"):
        TrainConfig(dropout=1.0)
    with pytest.raises(ValueError, match="server_rule='fedyogi'"):
        FederatedConfig(server_rule="fedyogi")  # type: ignore[arg-type]
    arch = ARCHITECTURES["dae"]
    with pytest.raises(ValueError, match="history has 3 items, the network 7"):
        train_epochs(
            init_params(arch, np.random.default_rng(0)),
            arch,
            sparse.csr_matrix((2, 3)),
            TrainConfig(),
            epochs=1,
            rng=np.random.default_rng(0),
        )
