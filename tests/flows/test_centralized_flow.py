"""Federated equals centralized, through the flow: the explicit ALS model the flow registers is
the centralized ALS solve (`CentralizedALS`) on the union of the clients' training rows, with the
same initialisation, regularisation and number of sweeps."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from fedrec.config import TrainingConfig
from models.mf.als import CentralizedALS, RatingRows
from models.mf.federated import MFConfig
from tests.flows.helpers import tracking_store


def test_the_flows_als_model_is_the_centralized_solve_on_the_same_training_rows(
    tmp_path, prefect_server
):
    from flows.training import federated_training

    with tracking_store(tmp_path / "home") as store:
        config = TrainingConfig(
            synthetic_users=300, synthetic_items=150, synthetic_interactions=9_000, clients=4,
            partition="dirichlet", rounds=4, factors=5, reg=0.08, seed=3,
            tracking_uri=store["uri"], model_name="federated-als", keep_workspace=True,
        )  # fmt: skip
        federated_training(**config.model_dump())
        mlflow.set_tracking_uri(store["uri"])
        served = mlflow.pyfunc.load_model("models:/federated-als/latest")
        recommender = served.unwrap_python_model().recommender

    # the training rows, read back from the partitions the clients trained on (user ids are
    # global; item indices are the catalogue's, the order of the served model's item_ids)
    clients = sorted((tmp_path / "home").glob("workspaces/*/clients/client-????.parquet"))
    assert len(clients) == 4 and len({p.parents[1] for p in clients}) == 1, clients
    rows = pd.concat([pd.read_parquet(p) for p in clients])
    train = rows[rows["split"] == 0]
    users = pd.factorize(train["user_id"])[0]
    n_items = len(recommender.item_ids)
    central = CentralizedALS(
        n_factors=5, reg=0.08, n_iter=4, init_std=MFConfig().init_std, seed=3
    ).fit(RatingRows(users, train["item"].to_numpy(), train["rating"].to_numpy(),
                     n_users=int(users.max()) + 1, n_items=n_items))  # fmt: skip

    # one federated round is one centralized sweep: equal up to floating-point summation order
    want, got = central.item_params_, recommender.params
    assert abs(got.global_mean - want.global_mean) < 1e-12
    np.testing.assert_allclose(got.factors, want.factors, rtol=0, atol=1e-8)
    np.testing.assert_allclose(got.bias, want.bias, rtol=0, atol=1e-8)
    assert np.abs(got.factors).max() > 0.05  # the solve moved the factors off their init
