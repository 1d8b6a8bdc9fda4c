"""MLflow models-from-code entry of the federated MF recommender.

MLflow executes this file when the model is loaded; the state comes from the ``recommender``
artifact folder (npz, Parquet, JSON), so nothing is unpickled. ``predict`` takes one row per user:

- ``user_id`` (string), ``history_items`` (list of item ids), optionally ``history_ratings``
  (list of numbers, same length; omitted for implicit feedback) and ``items`` (list of item ids
  to score instead of recommending);
- the ``k`` param (default 10) sets the list length.

It returns ``user_id, rank, item_id, score, reason`` rows; ``reason`` says when unknown items were
ignored or the popularity fallback was used (then ``score`` is the item's training count).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from models.mf.recommender import MFRecommender


class FederatedMFModel(PythonModel):
    """Thin adapter from MLflow's pyfunc interface to :class:`MFRecommender`."""

    recommender: MFRecommender

    def load_context(self, context: Any) -> None:
        self.recommender = MFRecommender.load(context.artifacts["recommender"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        return self.recommender.recommend(model_input, k=k)


mlflow.models.set_model(FederatedMFModel())
