"""MLflow models-from-code entry of the two-stage ranking recommender.

MLflow executes this file when the model is loaded; the state comes from the ``recommender``
artifact folder (npz, Parquet, JSON with LightGBM model strings), so nothing is unpickled.
``predict`` takes one row per user:

- ``user_id`` (string) and ``history_items`` (list of item ids the user interacted with);
- optionally ``age``, ``gender`` and ``occupation``, which the re-ranker uses when given;
- the ``k`` param (default 10) sets the list length.

It runs fold-in, retrieval (implicit ALS + item-kNN), re-ranking and top-K, and returns
``user_id, rank, item_id, score, reason`` rows; a user with no known history gets the most popular
items with that reason (``score`` is then the item's training count).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from models.ranking.recommender import RankingRecommender


class FederatedRankingModel(PythonModel):
    """Thin adapter from MLflow's pyfunc interface to :class:`RankingRecommender`."""

    recommender: RankingRecommender

    def load_context(self, context: Any) -> None:
        self.recommender = RankingRecommender.load(context.artifacts["recommender"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        return self.recommender.recommend(model_input, k=k)


mlflow.models.set_model(FederatedRankingModel())
