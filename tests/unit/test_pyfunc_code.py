"""Two registered models in one Python process each run their own bundled code.

Every fedrec model carries the ``models`` package (MLflow's ``code_paths``), and Python keeps
the first package of a name it imported. These tests load real registered models, copied out of
a real MLflow SQLite registry, in a fresh interpreter that cannot import the checkout's
``models``, as a serving process or MLflow's own ``validate_serving_input`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The model folders of an MF model and a network, as MLflow downloads them."""
    import mlflow

    from models.mf.params import ItemParams
    from models.mf.recommender import MFRecommender
    from models.neural.network import Architecture, init_params
    from models.neural.recommender import NeuralRecommender
    from tasks.tracking import register_model

    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    rng = np.random.default_rng(0)
    ids = np.array(list("abcdef"))
    counts = np.array([5.0, 50, 1, 7, 9, 3])
    arch = Architecture(n_items=6, kind="dae", hidden=(), latent=2)
    models = {
        "mf": MFRecommender(
            ItemParams(rng.normal(size=(6, 2)), rng.normal(size=6), 3.5),
            ids,
            counts,
            0.1,
            (1.0, 5.0),
        ),
        "nn": NeuralRecommender(init_params(arch, rng), arch, ids, counts),
    }
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        # no set_experiment: it would stay the process's active experiment for later tests
        experiment = mlflow.create_experiment("p", (root / "mlartifacts").as_uri())
        out = {}
        for name, model in models.items():
            with mlflow.start_run(experiment_id=experiment) as run:
                pass
            register_model.fn(uri, run.info.run_id, model, name, {})
            out[name] = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{name}/1", dst_path=str(root / "downloads" / name)
                )
            )
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    return out


def _serve(tmp_path: Path, steps: str) -> dict:
    """Run ``steps`` in a fresh interpreter without the checkout on its path; its last line is
    JSON."""
    script = f"""
import json, shutil, sys
sys.path[:] = [p for p in sys.path if p not in ("", {str(REPO)!r})]
import mlflow, pandas as pd
request = pd.DataFrame({{"user_id": ["u"], "history_items": [["a", "b"]],
                        "history_ratings": [[5.0, 4.0]]}})
{steps}
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_model_loads_after_the_first_ones_folder_is_gone(folders, tmp_path):
    """MLflow's serving-input check downloads a model to a temporary folder and removes it;
    the next model's modules were then looked up in the removed folder."""
    first = shutil.copytree(folders["mf"], tmp_path / "first")
    answer = _serve(tmp_path, f"""
mlflow.pyfunc.load_model({str(first)!r}).predict(request)
shutil.rmtree({str(first)!r})
second = mlflow.pyfunc.load_model({str(folders["nn"])!r})
print(json.dumps(list(second.predict(request.drop(columns="history_ratings"))["item_id"])))
""")  # fmt: skip
    assert len(answer) == 4 and not {"a", "b"} & set(answer)


def test_each_model_runs_the_code_it_was_registered_with(folders, tmp_path):
    """A model registered by other code (a newer checkout) than a model loaded before it runs
    its own code, not the first one's; the first keeps answering."""
    newer = shutil.copytree(folders["nn"], tmp_path / "newer")
    (newer / "code" / "models" / "recommenders.py").open("a").write('\nBUNDLE = "newer"\n')
    answer = _serve(tmp_path, f"""
first = mlflow.pyfunc.load_model({str(folders["mf"])!r})
second = mlflow.pyfunc.load_model({str(newer)!r})
import models.recommenders
items = second.predict(request.drop(columns="history_ratings"), params={{"k": 3}})["item_id"]
print(json.dumps({{"bundle": getattr(models.recommenders, "BUNDLE", None),
                  "first": len(first.predict(request)), "second": len(items)}}))
""")  # fmt: skip
    assert answer == {"bundle": "newer", "first": 4, "second": 3}  # the asked k


def test_a_process_that_imported_the_same_code_keeps_its_modules(folders):
    """The checkout's own ``models``, byte for byte the bundle's, is not imported again: a
    process that holds its classes (fedrec's own commands, the tests) keeps them."""
    import models.recommenders
    from fedrec.serving.pyfunc import use_bundled_models

    held = sys.modules["models.recommenders"]
    assert use_bundled_models(folders["mf"] / "code" / "models") is False
    assert sys.modules["models.recommenders"] is held is models.recommenders
