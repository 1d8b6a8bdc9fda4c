"""Real-data checks on ML-100K: federated ALS equals centralized ALS and reaches a known RMSE.

Skipped, with the path looked at, when the MovieLens files are not under FEDREC_DATASETS.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import KFold

from models.client import TEST, TRAIN
from models.data.movielens import read_movielens_100k
from models.data.partitions import build_clients
from models.data.readers import datasets_dir
from models.data.sharding import assign_clients
from models.mf.als import CentralizedALS, RatingRows
from models.mf.federated import MFConfig, run_federated

pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def ml100k():
    folder = datasets_dir() / "ml-100k"
    if not (folder / "u.data").is_file():
        pytest.skip(f"MovieLens ml-100k not found at {folder} (set $FEDREC_DATASETS to its parent)")
    return read_movielens_100k(folder)


def test_federated_als_on_ml100k_matches_centralized_and_surprise_protocol_rmse(ml100k):
    frame = ml100k.frame
    _, test_rows = next(
        KFold(n_splits=5, shuffle=True, random_state=0).split(np.arange(len(frame)))
    )
    split = np.full(len(frame), TRAIN, dtype=np.int8)
    split[test_rows] = TEST
    clients = build_clients(
        ml100k,
        assign_clients(ml100k, n_clients=10, strategy="dirichlet", rng=np.random.default_rng(0)),
        split,
    )
    config = MFConfig(n_factors=32, reg=0.12, clip_to=(1.0, 5.0))

    state, history = run_federated(
        clients,
        ml100k.n_items,
        config,
        rounds=12,
        seed=0,
        eval_splits=("test",),
        eval_ranking=False,
    )
    train = split == TRAIN
    central = CentralizedALS(n_factors=32, reg=0.12, n_iter=12, seed=0).fit(
        RatingRows(
            frame["user"][train],
            frame["item"][train],
            frame["rating"][train],
            n_users=ml100k.n_users,
            n_items=ml100k.n_items,
        )
    )
    predicted = np.clip(
        central.predict(frame["user"].to_numpy()[~train], frame["item"].to_numpy()[~train]), 1, 5
    )
    central_rmse = float(np.sqrt(np.mean((predicted - frame["rating"].to_numpy()[~train]) ** 2)))

    np.testing.assert_allclose(
        state.params.factors, central.item_params_.factors, atol=1e-8, rtol=0
    )
    assert history[-1].metrics["test/rmse"] == pytest.approx(central_rmse, abs=1e-9)
    assert central_rmse < 0.92  # Surprise's SVD scores 0.934 on this protocol
