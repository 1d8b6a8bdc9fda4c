"""Loading a registered model never runs code from the artifact store.

An attacker who can write artifacts (or move the champion alias to a version they wrote) replaces
the models-from-code entry file stored with the model. ``fedrec recommend``/``predict`` and the
flow's champion load read the state files with the installed fedrec code, so the planted code
never runs; ``mlflow models serve`` still has MLflow's own pyfunc to load.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fedrec.cli import main
from models.mf.params import ItemParams
from models.mf.recommender import MFRecommender
from tests.flows.helpers import tracking_store

NAME = "victim"


def _recommender() -> MFRecommender:
    rng = np.random.default_rng(0)
    params = ItemParams(rng.normal(size=(6, 2)), rng.normal(size=6), 3.5)
    items = np.array(["i0", "i1", "i2", "i3", "i4", "i5"])
    return MFRecommender(params, items, np.array([5.0, 50, 1, 7, 9, 3]), 0.1, (1.0, 5.0))


@pytest.fixture
def store(tmp_path):
    from tasks.tracking import _client, register_model

    with tracking_store(tmp_path) as store:
        client = _client(store["uri"])
        experiment = client.create_experiment("fedrec", (tmp_path / "mlartifacts").as_uri())
        run = client.create_run(experiment).info.run_id
        version = register_model.fn(store["uri"], run, _recommender(), NAME, {})
        client.set_registered_model_alias(NAME, "champion", version)
        client.set_terminated(run, "FINISHED")
        store["version"] = version
        yield store


def _plant_code(store, marker: Path) -> list[Path]:
    """Overwrite the Python entry file(s) stored beside the model's MLmodel with code that
    leaves ``marker`` behind when executed. Returns the files replaced."""
    location = store["client"].get_model_version_download_uri(NAME, store["version"])
    root = Path(unquote(urlparse(location).path))
    planted = sorted(root.glob("*.py"))
    assert planted, f"no models-from-code file under {root}"
    for path in planted:
        path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    return planted


def test_recommend_and_the_champion_load_never_execute_stored_code(store, tmp_path):
    from tasks.tracking import load_champion

    marker = tmp_path / "pwned"
    _plant_code(store, marker)
    history = tmp_path / "history.csv"
    pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["i0", "i3"], "rating": [5, 2]}).to_csv(
        history, index=False
    )

    result = CliRunner().invoke(
        main,
        ["recommend", "--model", f"models:/{NAME}@champion", "--history", str(history),
         "--k", "3", "--tracking-uri", store["uri"]],
    )  # fmt: skip
    champion = load_champion.fn(store["uri"], NAME)

    assert not marker.exists(), "code stored with the model was executed"
    assert result.exit_code == 0, result.output
    served = pd.read_csv(pd.io.common.StringIO(result.output))
    expected = _recommender().recommend(
        pd.DataFrame({"user_id": ["u1"], "history_items": [["i0", "i3"]],
                      "history_ratings": [[5.0, 2.0]]}),
        k=3,
    )  # fmt: skip
    assert list(served["item_id"]) == list(expected["item_id"])
    assert champion is not None and champion.version == store["version"]
    np.testing.assert_array_equal(
        champion.recommender.params.factors, _recommender().params.factors
    )


def test_predict_never_executes_stored_code(store, tmp_path):
    marker = tmp_path / "pwned"
    _plant_code(store, marker)
    history, pairs = tmp_path / "history.csv", tmp_path / "pairs.csv"
    pd.DataFrame({"user_id": ["u1"], "item_id": ["i0"], "rating": [5]}).to_csv(history, index=False)
    pd.DataFrame({"user_id": ["u1"], "item_id": ["i2"]}).to_csv(pairs, index=False)

    result = CliRunner().invoke(
        main,
        ["predict", "--model", f"models:/{NAME}/{store['version']}", "--history", str(history),
         "--pairs", str(pairs), "--tracking-uri", store["uri"]],
    )  # fmt: skip

    assert not marker.exists(), "code stored with the model was executed"
    assert result.exit_code == 0, result.output
    assert "u1,i2," in result.output


def test_the_registered_pyfunc_still_serves_the_same_recommendations(store):
    import mlflow

    from tasks.tracking import load_recommender

    requests = pd.DataFrame({"user_id": ["u1"], "history_items": [["i1"]],
                             "history_ratings": [[4.0]]})  # fmt: skip
    mlflow.set_tracking_uri(store["uri"])

    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(requests, params={"k": 4})
    loaded = load_recommender(store["uri"], f"models:/{NAME}@champion").recommend(requests, k=4)

    assert served["score"].dtype == object  # None where there is no score: JSON has no NaN
    served = served.astype({"score": float})
    pd.testing.assert_frame_equal(served.reset_index(drop=True), loaded.reset_index(drop=True))
