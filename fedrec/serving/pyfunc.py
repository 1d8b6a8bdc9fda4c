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

import hashlib
import sys
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


def _code_digest(package: Path) -> str | None:
    """SHA-256 over the relative paths and bytes of a package's ``.py`` files; None when the
    folder is gone (a model loaded from a temporary download that was removed)."""
    if not package.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def use_bundled_models(bundled: Path) -> bool:
    """Make ``import models`` give the ``bundled`` package (this model's own code, which MLflow
    put first on ``sys.path``) when the process already imported another ``models``: the code of
    a model loaded before, or a checkout at another commit. Python keeps the first package of a
    name, so a second model would run the first one's code (or fail, when that one's temporary
    folder was removed). Returns whether the modules were dropped to be imported again.

    A package whose files are byte for byte the bundle's is kept, so a process that imported
    fedrec's own code keeps its classes. A model loaded earlier keeps the modules it holds; a
    module it imports only when called then comes from the later bundle."""
    loaded = sys.modules.get("models")
    if loaded is None or not bundled.is_dir():
        return False
    wanted = _code_digest(bundled)
    if any(_code_digest(Path(p)) == wanted for p in getattr(loaded, "__path__", [])):
        return False
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]
    return True


# A model's code is its folder's code/models (MLflow's code_paths); a checkout has none there.
use_bundled_models(Path(__file__).resolve().parent / "code" / "models")

from models.federation.family import Recommender  # noqa: E402
from models.recommenders import RequestError, read_recommender  # noqa: E402


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
