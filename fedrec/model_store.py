"""Load a registered recommender's state files without the training stack.

``fedrec recommend`` and ``fedrec predict`` (and the training flow's champion lookup) read a model
here. Neither Prefect nor the model families' training code is imported, and MLflow only when it
is needed: a local SQLite store whose artifacts are local files (fedrec's default) is read with the
standard library's ``sqlite3``, read-only, which takes milliseconds where MLflow's import and its
store's start-up take seconds. Any other store (a tracking server, remote artifacts, ``runs:/``
URIs) goes through MLflow's client.

Only the model's ``recommender`` artifact folder (npz, Parquet, JSON, LightGBM text) is read, by the
installed classes (:func:`models.recommenders.read_recommender`); the Python file stored with the
model for ``mlflow models serve`` is never downloaded nor executed.
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from fedrec.home import fedrec_home
from models.privacy.redaction import redact_uri

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

    from models.federation.family import Recommender

STATE = "recommender"  # the model's artifact folder holding the recommender's state files
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
#: on a resumed run: seconds it spent ended before its resumes, which its duration leaves out
PAUSED_TAG = "fedrec.paused_seconds"
#: on a resumed run: the flow runs that carried it before the one its ``prefect.flow_run_id``
#: names, space-separated
EARLIER_FLOW_RUNS_TAG = "fedrec.earlier_flow_runs"
ALLOWED = "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"
_DELETED = "Deleted_Internal"  # MLflow's stage for a deleted model version
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class ModelNotFoundError(LookupError):
    """The model URI names no model in the store, or is not a model URI at all."""


def resolve_tracking_uri(uri: str | None = None, *, create: bool = True) -> str:
    """The tracking URI in force: the argument, else ``MLFLOW_TRACKING_URI``, else fedrec's SQLite
    (its folder made when ``create``; a command that only reads leaves a missing one alone)."""
    if uri:
        return uri
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env
    home = fedrec_home()
    if create:
        home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


# a run's workspace records the tracking store the run reports to, for its --resume command
WORKSPACE_STORE = "tracking_uri.txt"


def resume_command(run_id: str, uri: str | None) -> str:
    """``fedrec train --resume RUN_ID``, with ``--tracking-uri`` when the run's store ``uri``
    (None: unknown) is not the one the command finds by default (``MLFLOW_TRACKING_URI`` as the
    process started with it, else fedrec's SQLite), so that the command given finds the run. A
    relative SQLite path is given absolute; a password in the URI is masked (``***``), to be
    given by MLflow's variables instead."""
    import fedrec

    command = f"fedrec train --resume {run_id}"
    if not uri:
        return command
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        uri = f"sqlite:///{path.resolve()}"
    # the default as the user's environment gives it: MLflow's set_tracking_uri has written the
    # run's store into this process's MLFLOW_TRACKING_URI by now
    default = fedrec.USER_TRACKING_URI or f"sqlite:///{fedrec_home() / 'mlflow.db'}"
    if uri != default:
        command += f" --tracking-uri {shlex.quote(redact_uri(uri))}"
    return command


def record_store(workspace: str | Path, uri: str) -> None:
    """Write into a run's workspace the tracking store its run reports to (password masked),
    for ``fedrec workspaces`` to give the run's --resume command."""
    (Path(workspace) / WORKSPACE_STORE).write_text(redact_uri(uri) + "\n")


def recorded_store(workspace: str | Path) -> str | None:
    """The tracking store written by :func:`record_store`; None: none recorded."""
    try:
        return (Path(workspace) / WORKSPACE_STORE).read_text().strip() or None
    except OSError:
        return None


def run_in_store(uri: str, run_id: str) -> bool | None:
    """Whether a local SQLite store ``uri`` still holds the run ``run_id`` (False: never, or
    deleted, or removed by ``mlflow gc``); None for any other store, or one this code cannot read
    (read-only, with the standard library: no MLflow import)."""
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        return None
    try:
        db = _read_only(path)
        try:
            row = db.execute(
                "SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)
            ).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return row is not None and row[0] != "deleted"


class TrackingStoreError(OSError):
    """A tracking URI that names no usable store (a one-line message naming it)."""


class TrackingServerDown(TrackingStoreError):
    """A tracking server that does not answer (now: it may later)."""


def check_tracking_uri(uri: str, timeout: float = 5.0, name: str = "tracking URI") -> None:
    """Refuse, in seconds rather than after MLflow's minutes of retries, a tracking server that
    does not answer, a SQLite store in a folder that does not exist (a mistyped path would
    otherwise become a new, empty store), and a URI without a scheme or a ``file:`` one, which
    MLflow reads as its file store and refuses with a page of text. ``name`` is where the URI
    came from (:func:`tracking_uri_source`), for the message.

    Raises
    ------
    TrackingStoreError
    """
    refused = _not_a_store(uri)
    if refused:
        raise TrackingStoreError(f"{name} {uri}: {refused}")
    path = sqlite_path(uri)
    if path is not None and not path.parent.is_dir():
        raise TrackingStoreError(
            f"tracking URI {uri}: folder {path.parent} does not exist; allowed: a SQLite file in "
            "an existing folder (create it first), or another store"
        )
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answers (a proxy or an older server without /health)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingServerDown(
            f"tracking URI {redact_uri(uri)}: the MLflow server does not answer ({reason}); "
            "start it, or fix --tracking-uri / MLFLOW_TRACKING_URI"
        ) from err


# the stores a tracking URI may name without "://": Databricks' only; with it, any scheme MLflow
# or one of its plugins reads (postgresql+psycopg2://..., databricks://...)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
ALLOWED_STORES = (
    "sqlite:///PATH, http(s)://HOST[:PORT], postgresql://USER@HOST/DB, mysql://USER@HOST/DB"
)


def _not_a_store(uri: str) -> str | None:
    """Why ``uri`` names no tracking store fedrec can use, or None."""
    file_store = uri.startswith("file:")
    if not file_store and (_SCHEME.match(uri) or uri.split(":", 1)[0] == "databricks"):
        return None  # "databricks" and "databricks:PROFILE" are MLflow's own forms
    if file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
        return None  # MLflow's file store, which MLflow reads only when told to
    what = "MLflow's file store is not supported" if file_store else "not a tracking URI"
    local = uri.removeprefix("file://").removeprefix("file:")
    hint = ""
    if local.endswith(".db"):
        hint = f" (a SQLite file: sqlite:///{Path(local).expanduser().resolve()})"
    elif file_store or "/" in local:
        hint = " (a local store: sqlite:///ABSOLUTE/PATH/mlflow.db)"
    return f"{what}; allowed: {ALLOWED_STORES}{hint}"


def tracking_uri_source(uri: str | None) -> str:
    """Where the tracking URI in force comes from: the ``--tracking-uri`` flag (``uri``), else
    the ``MLFLOW_TRACKING_URI`` variable, else fedrec's default store."""
    if uri:
        return "--tracking-uri"
    if os.environ.get(TRACKING_URI_ENV):
        return TRACKING_URI_ENV
    return "tracking URI"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def _local_folder(location: str | None) -> Path | None:
    """A ``file://`` or plain-path artifact location as a local folder, else None."""
    if not location:
        return None
    if location.startswith("file://"):
        return Path(unquote(urlparse(location).path))
    if location.startswith("/"):
        return Path(location)
    return None


def _read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the SQLite file ``path``: reading never writes to a store."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def _registered(db: sqlite3.Connection) -> list[str]:
    return [name for (name,) in db.execute("SELECT name FROM registered_models ORDER BY name")]


def _not_found(
    model_uri: str, store: str, names: list[str], what: str, have: str = ""
) -> ModelNotFoundError:
    """``what`` the store lacks, then in one parenthesis what the model ``have`` (if anything),
    the registered models and the URI forms."""
    shown = ", ".join(names) if names else "none"
    return ModelNotFoundError(
        f"model {model_uri}: {what} in {store} ({have + '; ' if have else ''}registered models: "
        f"{shown}; a model URI is {ALLOWED})"
    )


def _state_from_sqlite(path: Path, model_uri: str) -> Path | None:
    """The state folder of a registered model read straight from a local SQLite store.

    None when this store or model cannot be read this way (a schema this code does not know, a
    remote artifact location): the caller then asks MLflow.
    """
    match = _MODEL_URI.match(model_uri)
    if match is None:
        return None
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        db = _read_only(path)
    except sqlite3.Error:
        return None
    try:
        names = _registered(db)
        if name not in names:
            raise _not_found(model_uri, str(path), names, f"no registered model {name!r}")
        if alias is not None:
            row = db.execute(
                "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                (name, alias),
            ).fetchone()
            if row is None:
                versions = [v for (v,) in db.execute(
                    "SELECT version FROM model_versions WHERE name = ? AND current_stage != ? "
                    "ORDER BY version", (name, _DELETED))]  # fmt: skip
                shown = (
                    "versions" if len(versions) <= 5 else f"newest 5 of {len(versions)} versions"
                )
                have = (
                    f"its {shown}: {', '.join(map(str, versions[-5:]))}; the latest is "
                    f"models:/{name}/{versions[-1]}; `fedrec models --model-name {name}` says "
                    "why each was promoted or not"
                    if versions
                    else ""
                )
                raise _not_found(
                    model_uri, str(path), names, f"{name!r} has no alias {alias!r}", have
                )
            version = row[0]
        row = db.execute(
            "SELECT storage_location, source FROM model_versions "
            "WHERE name = ? AND version = ? AND current_stage != ?",
            (name, int(version), _DELETED),
        ).fetchone()
        if row is None:
            raise _not_found(model_uri, str(path), names, f"{name!r} has no version {version}")
    except sqlite3.Error:  # not an MLflow store of a schema this code reads
        return None
    finally:
        db.close()
    for location in row:  # the model's root; its pyfunc artifacts sit in its artifacts/ folder
        folder = _local_folder(location)
        if folder is not None and (folder / "artifacts" / STATE).is_dir():
            return folder / "artifacts" / STATE
    return None


def _state_from_mlflow(uri: str, model_uri: str, tmp: str) -> Path:
    """Download the state folder through MLflow's client (any store, any artifact location)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    # ``models:/`` URIs are resolved against the global registry URI: point it at ``uri`` for
    # this download only, so a caller's own MLflow settings are left as they were
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        folder = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri.rstrip('/')}/artifacts/{STATE}",
            dst_path=tmp,
            tracking_uri=uri,
        )
    except MlflowException as err:
        if _is_missing(err):
            raise ModelNotFoundError(
                f"model {model_uri}: {err.message.splitlines()[0]} (a model URI is {ALLOWED})"
            ) from err
        raise
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return Path(folder)


def _is_missing(err: object) -> bool:
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    message = getattr(err, "message", "")
    # no such model, or (SQLite store) a model without that alias: INVALID_PARAMETER_VALUE there
    return getattr(err, "error_code", None) == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or (
        "alias" in message and "not found" in message
    )


def load_recommender(uri: str, model_uri: str) -> Recommender:
    """Load a registered or logged recommender (``models:/NAME@champion``, ``runs:/...``).

    Only the model's state files (``artifacts/recommender``) are read, with the installed code;
    nothing stored with the model is executed or unpickled, so whoever can write artifacts or move
    an alias cannot run code here.

    Raises
    ------
    ModelNotFoundError
        If the store has no such model, alias or version; the message names the model URI, the
        models the store has and the URI forms allowed.
    """
    from models.recommenders import read_recommender

    if not model_uri.startswith(("models:/", "runs:/")):
        raise ModelNotFoundError(f"model {model_uri}: not a model URI (a model URI is {ALLOWED})")
    if model_uri.startswith("models:/") and not _MODEL_URI.match(model_uri):
        name = re.split(r"[/@]", model_uri.removeprefix("models:/"), maxsplit=1)[0] or "NAME"
        raise ModelNotFoundError(
            f"model {model_uri}: names no alias or version (a model URI is {ALLOWED}, with a "
            f"version a whole number, e.g. models:/{name}@champion or models:/{name}/1)"
        )
    path = sqlite_path(uri)
    folder = _state_from_sqlite(path, model_uri) if path is not None and path.is_file() else None
    if folder is not None:
        return read_recommender(folder)
    with tempfile.TemporaryDirectory() as tmp:
        return read_recommender(_state_from_mlflow(uri, model_uri, tmp))


def resume_possible(run: Run, version: ModelVersion | None) -> bool:
    """Whether ``--resume`` could continue ``run``: it is not a run of real sites (those are
    trained again), it did not finish, it registered no version (``version``, from
    :func:`registered_version`), and its workspace still holds its clients' partitions."""
    from models.data.partitions import MANIFEST

    workspace = run.data.tags.get("fedrec.workspace")
    return (
        not run.data.tags.get("fedrec.sites")  # real sites' runs are trained again, not resumed
        and run.info.status != "FINISHED"
        and version is None
        and bool(workspace)
        and (Path(workspace) / MANIFEST).is_file()
    )
