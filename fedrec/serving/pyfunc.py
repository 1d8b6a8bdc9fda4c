"""MLflow models-from-code entry of every fedrec recommender.

MLflow executes this file when the model is loaded; the state comes from the ``recommender``
artifact folder (npz, Parquet, JSON, LightGBM model strings), whose ``recommender.json`` names
the kind of model, so nothing is unpickled. ``predict`` takes one row per user:

- ``user_id`` (string) and ``history_items`` (list of item ids the user interacted with);
- the columns the model's kind declares (its ``request_columns``: ``history_ratings`` and
  ``items`` for MF, ``age``, ``gender``, ``occupation`` for the re-ranker, ``items`` for the
  network);
- the ``k`` param (default 10) sets the list length.

It returns ``user_id, rank, item_id, score, reason`` rows; a row without a score (a popularity
fallback, an item that cannot be scored) has ``None`` there, which JSON (``mlflow models
serve``) sends as ``null``: NaN is not JSON. The signature types every request column as Any,
so MLflow passes each cell on as it came. A request the model cannot answer as asked (``k``
below 1, a history that is not a list, ratings that do not match it, an age or gender the
re-ranker cannot read) is refused with MLflow's ``INVALID_PARAMETER_VALUE``: ``mlflow models
serve`` answers HTTP 400 with the one-line reason (request row, user, column, value, what is
allowed) as its message.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from models.federation.family import Recommender
from models.recommenders import RequestError, read_recommender


class FedrecModel(PythonModel):
    """Thin adapter from MLflow's pyfunc interface to any family's recommender."""

    recommender: Recommender

    def load_context(self, context: Any) -> None:
        self.recommender = read_recommender(context.artifacts["recommender"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        k = (params or {}).get("k", 10)
        try:
            out = self.recommender.recommend(model_input, k=k)
        except RequestError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        out["score"] = out["score"].astype(object).where(out["score"].notna(), None)
        return out


mlflow.models.set_model(FedrecModel())
