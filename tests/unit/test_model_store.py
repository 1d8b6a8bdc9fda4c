"""Reading registered recommenders: the direct SQLite read against MLflow's own client.

A real MLflow SQLite store and registry, written by fedrec's own registration (a pyfunc model
with its state files). MLflow's client is the oracle for which version a URI names and which
files it holds; the direct read must agree with it, and refuse what it refuses, in one line.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedrec.local_server import free_port
from fedrec.model_store import (
    ModelNotFoundError,
    TrackingServerDown,
    TrackingStoreError,
    _local_folder,
    _state_from_mlflow,
    _state_from_sqlite,
    check_tracking_uri,
    load_recommender,
    record_store,
    recorded_store,
    resolve_tracking_uri,
    resume_possible,
    sqlite_path,
)


def _mf(items: list[str], seed: int):
    from models.mf.params import ItemParams
    from models.mf.recommender import MFRecommender

    rng = np.random.default_rng(seed)
    params = ItemParams(rng.normal(size=(len(items), 2)), rng.normal(size=len(items)), 3.5)
    popularity = np.arange(len(items), 0, -1, dtype=float)
    return MFRecommender(params, np.array(items), popularity, 0.1, (1.0, 5.0))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``m``: versions 1 (items a-c) and 2 (items w-z) logged by fedrec's registration, 3, 5, 6
    and 7 registered again from version 1, 4 deleted; aliases champion -> 2 and old -> 1.
    ``other``: one version, no alias. ``empty``: no version."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.tracking import register_model

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        # artifacts beside the store, as fedrec's runs keep them (MLflow's default: ./mlruns);
        # no set_experiment: it would stay the process's active experiment for later tests
        experiment = mlflow.create_experiment("s", (root / "mlartifacts").as_uri())
        models = {"1": _mf(["a", "b", "c"], 1), "2": _mf(["w", "x", "y", "z"], 2)}
        runs = {}
        for version, model in models.items():
            with mlflow.start_run(experiment_id=experiment) as run:
                pass
            runs[version] = run.info.run_id
            assert register_model.fn(uri, run.info.run_id, model, "m", {}) == version
        client = MlflowClient(uri, registry_uri=uri)
        for _ in range(5):
            mlflow.register_model("models:/m/1", "m")
        client.delete_model_version("m", "4")
        client.set_registered_model_alias("m", "champion", "2")
        client.set_registered_model_alias("m", "old", "1")
        with mlflow.start_run(experiment_id=experiment) as run:
            pass
        register_model.fn(uri, run.info.run_id, _mf(["q"], 3), "other", {})
        client.create_registered_model("empty")
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    return SimpleNamespace(uri=uri, path=root / "mlflow.db", models=models, runs=runs)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _same(a, b) -> bool:
    return a.item_ids.tolist() == b.item_ids.tolist() and np.array_equal(
        a.params.factors, b.params.factors
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("model_uri", "version"),
    [("models:/m@champion", "2"), ("models:/m@old", "1"), ("models:/m/1", "1"),
     ("models:/m/2", "2"), ("models:/m/2/", "2"), ("models:/m/7", "1")],
)  # fmt: skip
def test_the_direct_read_finds_the_version_and_files_mlflow_finds(store, tmp_path, model_uri,
                                                                  version):  # fmt: skip
    from mlflow import MlflowClient

    from models.recommenders import read_recommender

    client = MlflowClient(store.uri, registry_uri=store.uri)
    named = model_uri.removeprefix("models:/m").strip("/")
    if named.startswith("@"):  # MLflow's registry says which version the alias names
        assert str(client.get_model_version_by_alias("m", named[1:]).version) == version
    before = _digest(store.path)

    direct = _state_from_sqlite(store.path, model_uri)
    downloaded = _state_from_mlflow(store.uri, model_uri, str(tmp_path))

    assert direct is not None  # read without MLflow
    assert _files(direct) == _files(downloaded)
    assert _same(read_recommender(direct), store.models[version])
    assert _same(load_recommender(store.uri, model_uri), store.models[version])
    assert _digest(store.path) == before  # read-only: the store is left as it was


def test_a_run_uri_and_a_relative_store_are_read_too(store, monkeypatch):
    monkeypatch.chdir(store.path.parent)
    relative = "sqlite:///mlflow.db"

    assert _same(load_recommender(relative, "models:/m@champion"), store.models["2"])
    # runs:/ goes through MLflow's client (the direct read knows registered models only)
    run_uri = f"runs:/{store.runs['1']}/model"
    assert _state_from_sqlite(store.path, run_uri) is None
    assert _same(load_recommender(store.uri, run_uri), store.models["1"])


@pytest.mark.parametrize(
    ("model_uri", "expected"),
    [
        ("models:/nope@champion", "no registered model 'nope' in {db} (registered models: "
         "empty, m, other; a model URI is models:/NAME@ALIAS, models:/NAME/VERSION or "
         "runs:/RUN_ID/model)"),
        ("models:/m@gone", "'m' has no alias 'gone' in {db} (its newest 5 of 6 versions: 2, 3, "
         "5, 6, 7; the latest is models:/m/7; `fedrec models --model-name m` says why each was "
         "promoted or not; registered models: empty, m, other; a model URI is"),
        ("models:/other@champion", "'other' has no alias 'champion' in {db} (its versions: 1; "
         "the latest is models:/other/1;"),
        ("models:/empty@champion", "'empty' has no alias 'champion' in {db} (registered models:"),
        ("models:/m/4", "'m' has no version 4 in {db} (registered"),
        ("models:/m/99", "'m' has no version 99 in {db} (registered"),
    ],
)  # fmt: skip
def test_a_model_the_store_lacks_is_named_with_what_the_store_has(store, model_uri, expected):
    with pytest.raises(ModelNotFoundError) as direct:
        _state_from_sqlite(store.path, model_uri)
    with pytest.raises(ModelNotFoundError) as loaded:
        load_recommender(store.uri, model_uri)

    message = expected.format(db=store.path)
    assert str(direct.value) == str(loaded.value)
    assert str(direct.value).startswith(f"model {model_uri}: {message}"), direct.value
    assert "\n" not in str(direct.value)


@pytest.mark.parametrize(
    "model_uri", ["models:/nope@champion", "models:/m@gone", "models:/m/4", "models:/m/99"]
)
def test_mlflows_client_refuses_the_same_models_as_model_not_found(store, tmp_path, model_uri):
    """The path every store other than a local SQLite file takes."""
    import mlflow

    mlflow.set_tracking_uri("sqlite:///elsewhere.db")  # a caller's own settings: left as they were
    mlflow.set_registry_uri("sqlite:///elsewhere-registry.db")

    with pytest.raises(ModelNotFoundError) as refused:
        _state_from_mlflow(store.uri, model_uri, str(tmp_path))

    assert str(refused.value).startswith(f"model {model_uri}: ")
    assert str(refused.value).endswith("(a model URI is models:/NAME@ALIAS, models:/NAME/VERSION "
                                       "or runs:/RUN_ID/model)")  # fmt: skip
    assert mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"
    assert mlflow.get_registry_uri() == "sqlite:///elsewhere-registry.db"


@pytest.mark.parametrize(
    ("model_uri", "expected"),
    [
        ("m", "model m: not a model URI (a model URI is models:/NAME@ALIAS"),
        ("runs", "model runs: not a model URI"),
        ("models:/m", "model models:/m: names no alias or version (a model URI is "
         "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model, with a version a whole "
         "number, e.g. models:/m@champion or models:/m/1)"),
        ("models:/m/-1", "e.g. models:/m@champion or models:/m/1)"),
        ("models:/m@champion/1", "e.g. models:/m@champion or models:/m/1)"),
        ("models:/@champion", "e.g. models:/NAME@champion or models:/NAME/1)"),
    ],
)  # fmt: skip
def test_what_is_not_a_model_uri_is_refused_before_any_store_is_read(tmp_path, model_uri,
                                                                     expected):  # fmt: skip
    missing = tmp_path / "none.db"

    with pytest.raises(ModelNotFoundError) as refused:
        load_recommender(f"sqlite:///{missing}", model_uri)

    assert expected in str(refused.value), refused.value
    assert not missing.exists()


def test_a_file_that_is_no_mlflow_store_leaves_the_direct_read_to_mlflow(tmp_path):
    import sqlite3

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE registered_models (title TEXT)")

    for path in (empty, garbage, other, tmp_path / "absent.db"):
        assert _state_from_sqlite(path, "models:/m@champion") is None, path
    assert _state_from_sqlite(empty, "runs:/r/model") is None


def test_a_version_whose_files_are_not_local_leaves_the_read_to_mlflow(store, tmp_path):
    """A copy of the store whose artifact locations name a remote store: no local folder."""
    import shutil
    import sqlite3

    copy = tmp_path / "copy.db"
    shutil.copy(store.path, copy)
    with sqlite3.connect(copy) as db:
        db.execute("UPDATE model_versions SET storage_location = 's3://bucket/x', source = "
                   "'s3://bucket/x' WHERE name = 'm' AND version = 1")  # fmt: skip
        db.execute("UPDATE model_versions SET storage_location = NULL, source = 'relative/x' "
                   "WHERE name = 'm' AND version = 2")  # fmt: skip

    assert _state_from_sqlite(copy, "models:/m/1") is None
    assert _state_from_sqlite(copy, "models:/m@champion") is None
    assert _state_from_sqlite(copy, "models:/m/3") is not None


def test_local_folders_of_artifact_locations():
    assert _local_folder("file:///srv/a%20b/model") == Path("/srv/a b/model")
    assert _local_folder("/srv/model") == Path("/srv/model")
    for location in (None, "", "s3://b/model", "mlflow-artifacts:/1/model", "relative/model"):
        assert _local_folder(location) is None, location


def test_sqlite_paths_of_tracking_uris():
    assert sqlite_path("sqlite:///a/b.db") == Path("a/b.db")
    assert sqlite_path("sqlite:////srv/b.db?timeout=5") == Path("/srv/b.db")
    for uri in ("http://h/sqlite:///a.db", "postgresql://u@h/db", "sqlite://a.db", "a.db"):
        assert sqlite_path(uri) is None, uri


def test_the_tracking_uri_in_force(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FEDREC_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("sqlite:///flag.db") == "sqlite:///flag.db"
    assert resolve_tracking_uri(None) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    assert resolve_tracking_uri(None, create=False) == f"sqlite:///{home / 'mlflow.db'}"
    assert not home.exists()  # a command that only reads makes no folder
    assert resolve_tracking_uri("") == f"sqlite:///{home / 'mlflow.db'}"
    assert home.is_dir()


def test_the_store_a_workspace_records_masks_its_password(tmp_path):
    assert recorded_store(tmp_path / "absent") is None
    record_store(tmp_path, "http://u:secret@mlflow:5000/?token=t2")
    assert recorded_store(tmp_path) == "http://u:***@mlflow:5000/?token=***"
    assert "secret" not in (tmp_path / "tracking_uri.txt").read_text()
    (tmp_path / "tracking_uri.txt").write_text("\n")
    assert recorded_store(tmp_path) is None


def test_a_sqlite_store_in_a_missing_folder_is_refused_and_the_hints_name_the_form(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path / 'new.db'}")  # a new store in an existing folder
    missing = tmp_path / "typo" / "mlflow.db"
    with pytest.raises(TrackingStoreError) as refused:
        check_tracking_uri(f"sqlite:///{missing}")
    assert str(refused.value) == (
        f"tracking URI sqlite:///{missing}: folder {missing.parent} does not exist; allowed: a "
        "SQLite file in an existing folder (create it first), or another store"
    )

    hints = {
        "mlflow.db": f"(a SQLite file: sqlite:///{Path('mlflow.db').resolve()})",
        "file:///srv/mlflow.db": "(a SQLite file: sqlite:////srv/mlflow.db)",
        "file:///srv/mlruns": "(a local store: sqlite:///ABSOLUTE/PATH/mlflow.db)",
        "./mlruns": "(a local store: sqlite:///ABSOLUTE/PATH/mlflow.db)",
    }
    for uri, hint in hints.items():
        with pytest.raises(TrackingStoreError) as refused:
            check_tracking_uri(uri)
        assert str(refused.value).endswith(hint), refused.value
    with pytest.raises(TrackingStoreError) as refused:
        check_tracking_uri("mlruns")
    assert str(refused.value).endswith("mysql://USER@HOST/DB"), refused.value


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [200, 404])
def test_a_tracking_server_that_answers_is_accepted(status):
    """An answer of any kind (a proxy, or a server older than /health) is a server."""
    handler = type("Answer", (_Answer,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_tracking_uri(f"http://127.0.0.1:{server.server_address[1]}/", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_tracking_server_that_does_not_answer_is_refused_in_seconds_with_its_password_masked():
    uri = f"http://u:secret@127.0.0.1:{free_port()}"
    started = time.monotonic()

    with pytest.raises(TrackingServerDown) as refused:
        check_tracking_uri(uri, timeout=5)

    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert message.startswith(f"tracking URI http://u:***@127.0.0.1:{uri.rsplit(':', 1)[1]}: "
                              "the MLflow server does not answer (")  # fmt: skip
    assert message.endswith("); start it, or fix --tracking-uri / MLFLOW_TRACKING_URI")
    assert "secret" not in message


def test_resume_is_offered_only_for_an_unfinished_simulated_run_with_its_partitions(tmp_path):
    from models.data.partitions import MANIFEST

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / MANIFEST).write_text("{}")

    def run(status="FAILED", **tags):
        tags = {"fedrec.workspace": str(workspace)} | tags
        return SimpleNamespace(info=SimpleNamespace(status=status),
                               data=SimpleNamespace(tags={k: v for k, v in tags.items() if v}))  # fmt: skip

    assert resume_possible(run(), None)
    assert resume_possible(run("RUNNING"), None)
    assert not resume_possible(run("FINISHED"), None)
    assert not resume_possible(run(), SimpleNamespace(version="1"))
    assert not resume_possible(run(**{"fedrec.sites": "a,b"}), None)
    assert not resume_possible(run(**{"fedrec.workspace": ""}), None)
    assert not resume_possible(run(**{"fedrec.workspace": str(tmp_path / "gone")}), None)
    (workspace / MANIFEST).unlink()
    assert not resume_possible(run(), None)
