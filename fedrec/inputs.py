"""The data a training run reads, and the checks on it that can run before anything starts.

The flow reads and validates its data inside Prefect, after a server is up. ``check_inputs`` runs
the same readers of the core first, in the command line, so that a mistyped path or a bad header
costs a second, not a server start: files up to ``WHOLE_FILE_BYTES`` are read whole, larger CSV
files up to their first ``HEAD_BYTES`` (every header problem and the first rows); large Parquet
files and MovieLens folders are left to the flow. Only pandas is loaded, not the models.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WHOLE_FILE_BYTES = 4 * 2**20
HEAD_BYTES = 2**20
# read_interactions' keyword arguments, which are TrainingConfig fields of the same name
FILE_OPTIONS = ("user_col", "item_col", "rating_col", "timestamp_col", "rating_scale", "repeats")


def file_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """``read_interactions``' arguments from configuration values: the column names, the
    rating scale, under a by-key partition its key as a column of the file that describes the
    user (a shop's region), and for a model with the re-ranker the users' side features."""
    options = {name: values[name] for name in FILE_OPTIONS if name in values}
    if "rating_scale" in options:
        options["rating_scale"] = parse_rating_scale(options["rating_scale"])
    if values.get("partition") == "by-key" and values.get("partition_key"):
        options["user_columns"] = (values["partition_key"],)
    if reads_user_features(values):
        from models.data.validate import USER_SIDE_FEATURES

        options["side_columns"] = USER_SIDE_FEATURES
    return options


def reads_user_features(values: Mapping[str, Any]) -> bool:
    """Whether a run's model reads users' age, gender and occupation (a file's columns of those
    names): the two-stage model with its re-ranker."""
    return (
        values.get("feedback") == "implicit"
        and values.get("implicit_model", "two-stage") == "two-stage"
        and values.get("ranker") == "lightgbm"
    )


class InputError(ValueError):
    """Data sources that cannot make a run (a one-line message naming them)."""


class ConfigError(ValueError):
    """A run's parameters that do not make a configuration, on one line (the flow's answer to a
    deployment run triggered with a bad parameter)."""

    one_line = True


class MissingSourceError(InputError):
    """A data source that does not exist (one line naming the config key, the spec and the path)."""


def parse_rating_scale(value: Any) -> Any:
    """``rating_scale`` as a flag or YAML value gives it: ``"LOW,HIGH"`` (``"0.5,5"``) becomes the
    pair (0.5, 5.0) and ``"data"`` becomes None (the scale is taken from the data); a pair or None
    is returned as it is, for the reader's range check.

    Raises
    ------
    InputError
        A string that is neither ``data`` nor two numbers separated by a comma.
    """
    if not isinstance(value, str):
        return value
    if value.strip().lower() == "data":
        return None
    parts = value.split(",")
    try:
        if len(parts) == 2:
            return (float(parts[0]), float(parts[1]))
    except ValueError:
        pass
    raise InputError(
        f"rating_scale={value!r}: expected LOW,HIGH (two numbers, e.g. 0.5,5) or 'data' "
        "(take the scale from the data)"
    )


def check_split_files(*, train: str | None, valid: str | None, test: str | None) -> None:
    """Raise ``InputError`` unless explicit split files come as ``train`` + ``test`` (+ ``valid``)."""
    if (train is None) != (test is None):
        raise InputError("--train and --test go together: give both, or neither")
    if valid is not None and train is None:
        raise InputError("--valid needs --train and --test")


def data_sources(
    *, data: str | None, train: str | None, valid: str | None, test: str | None
) -> dict[str, str]:
    """The files or folders a run reads, by config key: ``train``/``valid``/``test`` when given,
    else ``data`` (``"synthetic"`` reads nothing)."""
    sources = {"train": train, "valid": valid, "test": test}
    if train is None:
        sources["data"] = data
    return {name: spec for name, spec in sources.items() if spec not in (None, "synthetic")}


def source_path(spec: str) -> Path:
    """Where a data spec points: a named dataset (``ml-1m``) under ``$FEDREC_DATASETS`` unless
    such a path exists here, else the path itself."""
    from models.data.movielens import NAMED_DATASETS
    from models.data.readers import datasets_dir

    return (
        datasets_dir() / spec if spec in NAMED_DATASETS and not Path(spec).exists() else Path(spec)
    )


# config keys that name files or folders (besides the data sources)
PATH_KEYS = ("catalogue", "sites", "workspace", "dp_ledger_secret")
# of those, the ones whose symbolic link is checked when the file is opened, so not resolved here
NOT_FOLLOWED = frozenset({"dp_ledger_secret"})


def file_relative_paths(values: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """``values`` with every file or folder it names made absolute against ``folder``: the
    current one for flags, a configuration file's own for its keys (as ``sites.yaml`` does), so
    that the run's recorded configuration, its provenance tags and ``--resume`` mean the same
    files from any folder, a scheduler's included. A named dataset (``ml-1m``) stays a name
    unless such a path exists in ``folder``; ``synthetic`` is never a path."""
    from models.data.movielens import NAMED_DATASETS

    resolved = dict(values)
    for key in ("data", "train", "valid", "test", *PATH_KEYS):
        spec = values.get(key)
        if not isinstance(spec, str) or not spec or spec == "synthetic":
            continue
        path = Path(spec).expanduser()
        if key not in PATH_KEYS and spec in NAMED_DATASETS and not (folder / path).exists():
            continue
        # a file whose link must stay visible (the ledger secret's check refuses one) is made
        # absolute without following it
        absolute = os.path.abspath if key in NOT_FOLLOWED else os.path.realpath
        resolved[key] = absolute(folder / path)
    return resolved


def absolute_paths(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (the flags) with their files and folders made absolute against the current
    folder (:func:`file_relative_paths`)."""
    return file_relative_paths(values, Path.cwd())


def check_sources_exist(sources: Mapping[str, str]) -> None:
    """Raise ``MissingSourceError`` naming the first source that does not exist; a bare name
    (no folder, no suffix) is also compared with the named datasets."""
    from models.data.movielens import NAMED_DATASETS, RATING_FILE_SUFFIXES
    from models.data.readers import TABLE_SUFFIXES, datasets_dir

    for name, spec in sources.items():
        path = source_path(spec)
        if path.exists():
            continue
        message = f"{name}={spec!r}: no such file or folder ({path.resolve()})"
        if spec in NAMED_DATASETS:
            message += f"; set FEDREC_DATASETS to the folder that holds {spec}/"
        elif Path(spec).name == spec and not Path(spec).suffix:
            named = ("synthetic", *NAMED_DATASETS)
            close = difflib.get_close_matches(spec, named, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message += (
                f"; {hint}named datasets: {', '.join(named)} (MovieLens under {datasets_dir()})"
            )
        else:
            message += (
                "; allowed: an existing file ("
                + ", ".join(TABLE_SUFFIXES)
                + "), a MovieLens ratings file ("
                + ", ".join(RATING_FILE_SUFFIXES)
                + "), a MovieLens folder, or a named dataset"
            )
        raise MissingSourceError(message)


def _size(path: Path) -> int:
    """Bytes of a file, or of the files directly inside a folder."""
    if path.is_dir():
        return sum(child.stat().st_size for child in path.iterdir() if child.is_file())
    return path.stat().st_size


def _read_head(path: Path, options: dict[str, Any], *, explicit: bool) -> None:
    """Validate the file's first HEAD_BYTES (cut after a whole row) with the core's reader (and
    its ratings, for an ``explicit`` run); its errors name the real file."""
    from models.data.errors import DataValidationError
    from models.data.readers import DEFAULT_RATING_COL, has_suffix, read_head, read_interactions
    from models.data.schema import require_ratings

    head = read_head(path, HEAD_BYTES)  # decompressed: the copy below is plain text
    head = head[: head.rfind(b"\n") + 1] or head
    with tempfile.TemporaryDirectory(prefix="fedrec-check-") as folder:
        plain = path.name[: -len(".gz")] if has_suffix(path, (".gz",)) else path.name
        copy = Path(folder) / plain
        copy.write_bytes(head)
        try:
            data = read_interactions(copy, **options)
            if explicit:
                require_ratings(data, options.get("rating_col", DEFAULT_RATING_COL))
        except DataValidationError as err:
            raise DataValidationError(
                err.problem, file=str(path), row=err.row, column=err.column, setting=err.setting,
                value=err.value, allowed=err.allowed, line=err.line,
            ) from err  # fmt: skip


def check_inputs(values: Mapping[str, Any]) -> list[str]:
    """Check a run's data sources with the core's readers before any server or flow starts.

    Parameters
    ----------
    values : mapping
        TrainingConfig field values (the defaults, then the YAML file's keys, then the flags).

    Returns
    -------
    list of str
        The sources checked (paths), for a progress line.

    Raises
    ------
    InputError
        Split files that do not go together, or a source that does not exist
        (``MissingSourceError``).
    DataValidationError
        The first problem the core's reader finds (file, row, column, value, what is allowed).
    """
    from models.data.readers import (
        CSV_SUFFIXES,
        DEFAULT_RATING_COL,
        TABLE_SUFFIXES,
        has_suffix,
        load_dataset,
    )
    from models.data.schema import keep_positives, require_ratings
    from models.data.sharding import check_client_count, check_columns, combine_splits

    files = {name: values.get(name) for name in ("train", "valid", "test")}
    check_split_files(**files)
    sources = data_sources(data=values.get("data"), **files)
    check_sources_exist(sources)
    options = file_options(values)
    explicit = values.get("feedback", "explicit") == "explicit"
    checked, read = [], {}
    for name, spec in sources.items():
        path = source_path(spec).expanduser()
        is_table = path.is_file() and has_suffix(path, TABLE_SUFFIXES)
        if _size(path) <= WHOLE_FILE_BYTES:
            data = load_dataset(str(path), **(options if is_table else {}))  # as the flow will
            if explicit:
                require_ratings(data, options.get("rating_col", DEFAULT_RATING_COL))
            read[name] = keep_positives(data, values.get("positive_threshold"))
            clients = values.get("clients")
            if name == "data":
                check_columns(data, split=values.get("split", "random"),
                              partition=values.get("partition", "iid"),
                              partition_key=values.get("partition_key"),
                              key_prefix=values.get("key_prefix"),
                              n_clients=clients if isinstance(clients, int) else None,
                              private=values.get("dp_epsilon") is not None)  # fmt: skip
            if (
                name == "data"
                and values.get("partition") in ("iid", "dirichlet")
                and isinstance(clients, int)
            ):
                check_client_count(clients, data.n_users, data.source or None)
        elif has_suffix(path, CSV_SUFFIXES):
            _read_head(path, options, explicit=explicit)
        else:
            continue
        checked.append(str(path))
    if "train" in read and "test" in read and ("valid" in read or files["valid"] is None):
        combine_splits(read["train"], read["test"], read.get("valid"))  # held-out rows in training
    return checked


# generate_synthetic's argument -> the TrainingConfig field that sets it
SYNTHETIC_FIELDS = {"n_users": "synthetic_users", "n_items": "synthetic_items",
                    "n_interactions": "synthetic_interactions", "taste": "synthetic_taste",
                    "seed": "synthetic_seed"}  # fmt: skip


def synthetic_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The built-in synthetic data's arguments from configuration values (a config's fields)."""
    return {arg: values[field] for arg, field in SYNTHETIC_FIELDS.items() if field in values}


def check_synthetic_data(values: Mapping[str, Any]) -> None:
    """Refuse what generating or sharding the built-in synthetic data would refuse, before
    anything starts: its own arguments out of range, more clients than it has users, and for a
    by-key partition a key it lacks or more clients than the key's values. A value of the wrong
    type is left to the configuration's own checks.

    Raises
    ------
    DataValidationError
    """
    from models.data.readers import load_dataset
    from models.data.sharding import check_client_count, check_columns

    try:
        data = load_dataset("synthetic", **synthetic_options(values))
    except TypeError:
        return
    clients = values.get("clients")
    n_clients = clients if isinstance(clients, int) and not isinstance(clients, bool) else None
    partition = values.get("partition")
    if partition == "by-key" and values.get("partition_key"):  # (no key: the config says so)
        check_columns(data, split=values.get("split", "random"), partition="by-key",
                      partition_key=values.get("partition_key"), key_prefix=values.get("key_prefix"),
                      n_clients=n_clients, private=values.get("dp_epsilon") is not None)  # fmt: skip
    elif partition in ("iid", "dirichlet") and n_clients is not None and n_clients >= 1:
        check_client_count(n_clients, data.n_users, source=data.source)
