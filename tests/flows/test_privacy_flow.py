"""The privacy contract on real flows: every payload a client task hands the server is checked
against the protocol's vocabulary and against the client's own rows; secure aggregation gives the
plain model and survives a dropout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from fedrec.config import TrainingConfig
from models.client import ClientData
from models.data.partitions import read_item_ids
from models.privacy.dp import UserLevelDP
from models.protocol import (
    EVALUATION_SUMS,
    GLOBAL_ARRAYS,
    ITEM_ARRAYS,
    UPDATE_METRICS,
    ClientUpdate,
)
from tests.flows.helpers import (
    censored_noise_ratio,
    final_checkpoint,
    summed_answers,
    tracking_store,
    unpacked,
    workspace_clients,
)

SMALL = {"synthetic_users": 300, "synthetic_items": 120, "synthetic_interactions": 9_000,
         "clients": 3, "factors": 3, "rounds": 2, "skip_if_unchanged": False}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    with tracking_store(tmp_path_factory.mktemp("fedrec-privacy")) as store:
        yield store


# The only arrays that may hold integers, and what their values must be: item indices of
# co-occurring pairs. Any other integer array (user ids would be one) fails the contract.
_ITEM_INDEX_ARRAYS = frozenset({"pair_rows", "pair_cols"})


def _own_rating_vectors(client: ClientData) -> list[np.ndarray]:
    """The client's ratings, sorted: all its rows, and each split's rows on their own."""
    frame = client.frame
    splits = [frame.loc[frame["split"].to_numpy() == code, "rating"] for code in (0, 1, 2)]
    return [np.sort(part.to_numpy()) for part in (frame["rating"], *splits) if len(part)]


def _check_trees(array: np.ndarray, client: ClientData, timestamps: np.ndarray | None) -> None:
    """A re-ranker payload is a LightGBM model over the protocol's features and nothing else:
    no other column, no category values beyond the side features', none of the client's times."""
    import re

    import lightgbm as lgb

    from models.ranking.features import FEATURES

    assert array.dtype == np.uint8 and array.ndim == 1
    text = array.tobytes().decode("utf-8")
    booster = lgb.Booster(model_str=text)
    assert set(booster.feature_name()) <= set(FEATURES), booster.feature_name()
    assert booster.num_trees() > 0
    # pandas categories travel in the text: only the side features' values may be there
    categories = re.search(r"^pandas_categorical:(.*)$", text, re.MULTILINE)
    assert categories is not None
    features = client.user_features
    allowed: set[str] = set()
    if features is not None:
        for column in features.columns:
            allowed |= {str(v) for v in features[column].dropna().unique()}
    listed = set(re.findall(r'"([^"]*)"', categories.group(1)))
    assert listed <= allowed, listed - allowed
    if timestamps is not None:
        tokens = set(re.split(r"[^0-9.eE+-]+", text))
        assert not {str(t) for t in timestamps} & tokens  # no raw timestamps in the text


def _check_update(update: ClientUpdate, client: ClientData, n_items: int) -> None:
    assert set(update.arrays) <= ITEM_ARRAYS | GLOBAL_ARRAYS, set(update.arrays)
    assert set(update.metrics) <= UPDATE_METRICS, set(update.metrics)
    m = update.items.size
    assert np.all(np.diff(update.items) > 0) and update.counts.shape == (m,)
    assert np.all((update.items >= 0) & (update.items < n_items))
    if update.counts.dtype.kind in "iu":  # exact counts; under DP they are noisy floats
        assert np.all(update.counts > 0)
    else:
        assert update.counts.dtype.kind == "f", update.counts.dtype
    frame = client.frame
    timestamps = frame["timestamp"].to_numpy() if "timestamp" in frame else None
    own_ratings = _own_rating_vectors(client)
    for name, array in update.arrays.items():
        if name == "trees":
            _check_trees(array, client, timestamps)
            continue
        if name in _ITEM_INDEX_ARRAYS:
            assert array.dtype.kind in "iu", (name, array.dtype)
            assert array.size == 0 or (array.min() >= 0 and array.max() < n_items), name
        elif name == "pair_counts":  # how many of the client's users saw both items
            assert np.all(array == np.rint(array)) and np.all(
                (array >= 1) & (array <= client.n_users)
            )
        else:  # statistics are floats: an integer array here could be anything, ids included
            assert array.dtype.kind == "f", (name, array.dtype)
        if name in ITEM_ARRAYS:
            assert array.shape[0] == m, name
        # no per-user vectors: nothing is shaped by the client's users
        assert array.shape[0] != client.n_users or array.shape[0] == m, (name, array.shape)
        flat = np.sort(array.ravel())
        for ratings in own_ratings:  # not the client's ratings, nor one split's
            assert not (flat.size == ratings.size and np.allclose(flat, ratings)), name
        if timestamps is not None:  # no raw timestamps, whatever the array's type
            assert not np.isin(timestamps, array).any(), name


def _check_evaluations(evaluations: dict, n_items: int) -> None:
    for sums, recommended in evaluations.values():
        assert set(sums) <= EVALUATION_SUMS, set(sums)
        assert recommended is None or recommended.shape == (n_items,)


def _capture(monkeypatch, seen: list) -> None:
    """Wrap every client task's function so its return value is kept for inspection, under the
    kind of answer it is: the global mean's sums, co-occurrence counts, a training update, an
    evaluation, or a masked vector."""
    import tasks.clients as clients
    import tasks.secure as secure

    kinds = {"mean": "rating_sums", "knn": "knn_client"}

    def wrap(task_obj: Any, kind: str | None) -> None:
        original: Callable = task_obj.fn

        def spy(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            seen.append((kind or kinds.get(kwargs["phase"], "train_client"), kwargs, result))
            return result

        monkeypatch.setattr(task_obj, "fn", spy)

    wrap(clients.train_client, None)
    wrap(clients.evaluate_client, "evaluate")
    for stage in SECAGG_MESSAGES:  # every client phase of secure aggregation
        wrap(getattr(secure, f"secagg_{stage}"), f"secagg-{stage}")


def _secagg_messages() -> dict[str, type]:
    from models.privacy import secagg_plus as p

    return {"advertise": p.KeyAdvertisement, "share": p.EncryptedShares, "mask": p.MaskedInput,
            "sign": p.SurvivorSignature, "unmask": p.UnmaskShares}  # fmt: skip


SECAGG_MESSAGES = _secagg_messages()


def _check_secagg_message(stage: str, payload: bytes, client_id: int) -> None:
    """A secure-aggregation answer is exactly its protocol message, from this client, with
    nothing of the client's data but the masked vector: fixed-size keys, signatures and
    ciphertexts of shares (whose sizes do not depend on the data)."""
    from models.privacy.shamir import SHARE_BYTES

    assert isinstance(payload, bytes)
    message = SECAGG_MESSAGES[stage].from_bytes(payload)  # refuses any other or extra field
    sender = message.sender if stage == "share" else message.client_id
    assert sender == client_id
    if stage == "advertise":
        assert len(message.c_public) == len(message.s_public) == 32
        assert len(message.signature) == 64
    elif stage == "share":  # nonce + two shares + AEAD tag, for each neighbour
        assert client_id not in message.ciphertexts
        assert {len(c) for c in message.ciphertexts.values()} == {12 + 2 * SHARE_BYTES + 16}
    elif stage == "mask":
        assert message.vector.dtype == np.uint64
    elif stage == "sign":
        assert len(message.signature) == 64
    else:
        shares = [*message.b_shares.values(), *message.s_shares.values()]
        assert {len(s) for s in shares} == {SHARE_BYTES}


def _run(store, **fields) -> dict:
    from flows.training import federated_training

    config = TrainingConfig(  # the tests read the clients' partitions after the run
        tracking_uri=store["uri"], keep_workspace=True, **(SMALL | fields)
    )
    return federated_training(**config.model_dump())


IMPLICIT = {"feedback": "implicit", "factors": 4}
SECURE = {"secure_aggregation": True, "min_clients": 2}


@pytest.mark.parametrize(
    "fields",
    [{}, {"algorithm": "fedavg"}, SECURE,
     IMPLICIT | {"ranker": "lightgbm", "ranker_rounds": 2}, IMPLICIT | {"dp_epsilon": 8.0},
     IMPLICIT | SECURE],
    ids=["als", "fedavg", "secure-als", "two-stage", "dp-implicit", "secure-implicit"],
)  # fmt: skip
def test_every_client_payload_keeps_the_contract(store, monkeypatch, request, fields):
    from tasks.clients import open_client

    seen: list = []
    _capture(monkeypatch, seen)
    _run(store, model_name=f"contract-{request.node.callspec.id}", **fields)

    kinds = {kind for kind, _, _ in seen}
    assert kinds >= {"train_client", "evaluate"}
    secagg = {f"secagg-{stage}" for stage in SECAGG_MESSAGES}
    assert (kinds & secagg == secagg) == bool(fields.get("secure_aggregation"))
    assert ("rating_sums" in kinds) == (fields.get("feedback") != "implicit")
    # kNN has no DP mechanism: a private run never asks for co-occurrence counts
    assert ("knn_client" in kinds) == (
        fields.get("feedback") == "implicit" and "dp_epsilon" not in fields
    )
    for kind, args, result in seen:
        if kind == "rating_sums":
            update, evaluations = result
            if fields.get("secure_aggregation"):  # held on the client: a receipt of two numbers
                from models.privacy.wire import unpack

                assert unpack(update)[0]["vector_size"] == 2 and not evaluations
                continue
            assert set(update.metrics) == {"rating_sum", "n"} and not evaluations
            assert update.items.size == 0 and not update.arrays
            continue
        if kind.startswith("secagg-"):
            _check_secagg_message(kind.removeprefix("secagg-"), result, args["entry"].client_id)
            continue
        n_items = args["n_items"]
        client = open_client(args["workspace"], args["entry"], n_items)
        if kind == "knn_client":
            _check_update(result[0], client, n_items)
        elif kind == "train_client":
            payload, evaluations = result
            if fields.get("secure_aggregation"):
                # the update stays on the client; the flow learns only the vector's length
                from models.privacy.wire import unpack

                receipt, arrays = unpack(payload)
                assert set(receipt) == {"kind", "vector_size"} and not arrays
            else:
                _check_update(payload, client, n_items)
            _check_evaluations(evaluations, n_items)
        else:
            _check_evaluations(result, n_items)


def test_secure_aggregation_gives_the_plain_model_and_survives_a_dropout(store):
    plain = _run(store, model_name="plain")
    secure = _run(store, model_name="secure", **SECURE)
    dropout = _run(store, model_name="dropout", fault_dropout_clients=(1,), **SECURE)

    mlflow.set_tracking_uri(store["uri"])

    def served(name: str):
        return mlflow.pyfunc.load_model(f"models:/{name}/latest").unwrap_python_model().recommender

    np.testing.assert_allclose(
        served("secure").params.factors, served("plain").params.factors, atol=1e-5
    )
    # the cold-start list comes from the decoded sum of counts: the same popularity
    np.testing.assert_allclose(served("secure").popularity, served("plain").popularity)
    assert secure["metrics"]["test/rmse"] == pytest.approx(plain["metrics"]["test/rmse"], abs=1e-5)
    answered = [
        m.value for m in store["client"].get_metric_history(dropout["run_id"], "system/clients")
    ]
    assert answered == [2.0, 2.0]  # client 1 vanished after sharing keys; t = 2 survivors


@pytest.fixture
def own_store(tmp_path, prefect_server):
    """A store of its own: private runs on the module's users would share one ledger and cap."""
    with tracking_store(tmp_path) as store:
        yield store


def test_dp_run_logs_epsilon_and_the_ledger_refuses_past_the_budget(own_store):
    from mlflow.entities import ViewType

    store = own_store
    summary = _run(store, model_name="private", dp_epsilon=8.0, dp_budget=10.0)

    client = store["client"]
    spent = [
        (m.step, m.value) for m in client.get_metric_history(summary["run_id"], "privacy/epsilon")
    ]
    assert [s for s, _ in spent] == [1, 2] and spent[0][1] < spent[1][1] <= 8.0 + 1e-9
    assert spent[1][1] > 7.5  # the noise is calibrated to use the budget asked for
    version = client.get_model_version("private", summary["model_version"])
    assert version.tags["fedrec.epsilon"] == "8.0"
    ledger = client.get_experiment_by_name("fedrec-privacy-ledger").experiment_id
    entries = client.search_runs([ledger], run_view_type=ViewType.ALL)
    spends = [e.data.params for e in entries if e.data.params["kind"] == "spend"]
    assert [float(e["epsilon"]) for e in spends] == [8.0] and spends[0]["model_name"] == "private"

    with pytest.raises(
        ValueError, match=r"privacy budget: these users have spent epsilon 8 of 10 .* epsilon 8"
    ):
        _run(store, model_name="private", dp_epsilon=8.0, dp_budget=10.0, rounds=3)
    assert len(client.search_model_versions("name='private'")) == 1


def _implicit_scores(
    factors: np.ndarray, items: np.ndarray, reg: float, alpha: float
) -> np.ndarray:
    """Every item's implicit-ALS score for a user whose history is ``items``, by hand: the user's
    factor ``x = (Y^T Y + alpha Y_h^T Y_h + reg I)^-1 (1 + alpha) Y_h^T 1``, scores ``Y x``."""
    history = factors[items]
    gram = factors.T @ factors + alpha * history.T @ history + reg * np.eye(factors.shape[1])
    return factors @ np.linalg.solve(gram, (1.0 + alpha) * history.sum(axis=0))


def test_dp_implicit_run_spends_its_epsilon_and_serves_implicit_als_alone(own_store):
    store = own_store
    fields = {"model_name": "private-ranking", "dp_epsilon": 4.0, "rounds": 3, **IMPLICIT}
    config = TrainingConfig(tracking_uri=store["uri"], **(SMALL | fields))
    summary = _run(store, **fields)

    client = store["client"]
    spent = [m.value for m in client.get_metric_history(summary["run_id"], "privacy/epsilon")]
    assert len(spent) == 3 and spent == sorted(spent) and 3.8 < spent[-1] <= 4.0 + 1e-9
    # the noisy model may or may not beat the (noisy-count) popularity list on 3 rounds of small
    # data; whichever it is, the gate decided it from the released metrics: refused only for a
    # shortfall beyond the noise of both figures
    from tasks.server import PRIVATE_NOISE_SDS

    metrics = summary["metrics"]
    short = metrics["baseline/valid/ndcg_at_10"] - metrics["valid/ndcg_at_10"]
    noise = np.hypot(metrics["valid/dp_sd/ndcg_at_10"], metrics["baseline/valid/dp_sd/ndcg_at_10"])
    assert summary["promoted"] is bool(short <= PRIVATE_NOISE_SDS * noise), (
        metrics, summary["reason"],
    )  # fmt: skip
    mlflow.set_tracking_uri(store["uri"])
    version = client.get_model_version("private-ranking", summary["model_version"])
    assert version.run_id == summary["run_id"]
    assert version.tags["fedrec.epsilon"] == "4.0"
    loaded = mlflow.pyfunc.load_model(f"models:/private-ranking/{summary['model_version']}")
    model = loaded.unwrap_python_model()
    retrieval = model.recommender.retrieval
    assert retrieval.similarity is None and model.recommender.ranker is None

    # what is served is the run's state after its last round, as its checkpoint holds it
    workspace = summary["workspace"]
    state = final_checkpoint(workspace, 3)
    np.testing.assert_array_equal(retrieval.item_factors, state["factors"])
    np.testing.assert_array_equal(retrieval.popularity, state["popularity"])
    item_ids = read_item_ids(workspace).astype(str)
    np.testing.assert_array_equal(model.recommender.item_ids, item_ids)

    # the pyfunc answers three users with the implicit-ALS scores of those factors and their
    # training rows, computed by hand; an unseen item scored as high as an answer may stand in
    # for it (items whose noisy count the run zeroed all score 0)
    clients = workspace_clients(workspace)
    rows = clients[0].rows("train")
    users = np.unique(rows.users)[:3]
    histories = [rows.items[rows.users == u] for u in users]
    requests = pd.DataFrame({
        "user_id": [str(clients[0].user_ids[u]) for u in users],
        "history_items": [list(item_ids[h]) for h in histories],
    })  # fmt: skip
    answers = loaded.predict(requests, params={"k": 5})
    rc, index = config.ranking_config(), {item: i for i, item in enumerate(item_ids)}
    for user, history in zip(requests["user_id"], histories, strict=True):
        got = answers[answers["user_id"] == user].sort_values("rank")
        scores = _implicit_scores(state["factors"], history, rc.reg, rc.alpha)
        scores[history] = -np.inf
        answered = np.array([index[i] for i in got["item_id"]])
        assert not set(answered) & set(history)
        np.testing.assert_allclose(got["score"].astype(float), scores[answered], rtol=1e-9)
        best = np.sort(scores)[::-1][:5]
        np.testing.assert_allclose(got["score"].astype(float), best, rtol=1e-9, atol=1e-12)

    # the popularity of the cold-start list is the last round's noisy counts: each item's
    # count over at most dp_max_items sampled rows per user, plus each client's noise of the
    # logged multiplier times one user's sensitivity, floored at 0
    sigma = client.get_metric_history(summary["run_id"], "privacy/noise_multiplier")[-1].value
    dp = UserLevelDP.for_implicit(sigma, config.dp_max_items, shares=1)
    kept = np.zeros(len(item_ids))  # the expected count: each row kept with p
    spread = np.zeros(len(item_ids))  # its variance: p (1 - p) per row
    for data in clients:
        train = data.rows("train")
        p = np.minimum(1.0, config.dp_max_items / np.bincount(train.users))[train.users]
        kept += np.bincount(train.items, weights=p, minlength=len(item_ids))
        spread += np.bincount(train.items, weights=p * (1 - p), minlength=len(item_ids))
    # and it is the sum of the clients' last answers, from which the served factors are solved
    # by hand: each item's summed noisy Gram plus the summed noisy user Gram, a ridge of reg
    # plus 4 noise deviations x sqrt(k), zero factors below 4 deviations of count
    answers = summed_answers(workspace, "als", 3)
    np.testing.assert_allclose(retrieval.popularity, np.maximum(answers["counts"], 0.0), rtol=1e-12)
    deviation, k = sigma * dp.implicit_sensitivity(rc.alpha), IMPLICIT["factors"]
    ridge = rc.reg + 4.0 * deviation * np.sqrt(k)
    grams = unpacked(answers["gram"], k) + answers["user_gram"] + ridge * np.eye(k)
    solved = np.linalg.solve(grams, answers["rhs"][..., None])[..., 0]
    factors = np.where((answers["counts"] >= 4.0 * deviation)[:, None], solved, 0.0)
    np.testing.assert_allclose(retrieval.item_factors, factors, rtol=1e-9, atol=1e-12)
    assert np.abs(factors).sum(axis=1).astype(bool).any()
    noise = len(clients) * (sigma * dp.implicit_sensitivity(rc.alpha)) ** 2
    ratio = censored_noise_ratio(retrieval.popularity, kept, spread + noise)
    # about 1 (these counts' 0.01% to 99.99% range, simulated: 0.6 to 1.55); exact counts give
    # about 0.01, half the noise 0.3, twice the noise 3.3
    assert 0.5 < ratio < 2.0, ratio
    with pytest.raises(ValueError, match="differential privacy covers implicit ALS only"):
        TrainingConfig(feedback="implicit", ranker="lightgbm", dp_epsilon=4.0)
