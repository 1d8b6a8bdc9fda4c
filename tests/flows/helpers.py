"""Shared set-up of the flow tests: a FEDREC_HOME with its own MLflow SQLite store."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient


@contextlib.contextmanager
def tracking_store(home: Path) -> Iterator[dict[str, Any]]:
    """FEDREC_HOME set to ``home``, MLFLOW_TRACKING_URI unset, and the store's URI and client."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = f"sqlite:///{home / 'mlflow.db'}"
        yield {"uri": uri, "client": MlflowClient(tracking_uri=uri, registry_uri=uri), "home": home}


@contextlib.contextmanager
def flow_log(level: int) -> Iterator[list[logging.LogRecord]]:
    """The flow runs' log records at ``level`` and above while the block runs (the flow's run
    logger, whatever its console handler does)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append  # type: ignore[method-assign]
    flow_logger = logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(handler)
    try:
        yield records
    finally:
        flow_logger.removeHandler(handler)


def _is_pickle(data: bytes) -> bool:
    """True if ``data`` parses, from first byte to last, as a pickle opcode stream."""
    import pickletools

    try:
        ops = list(pickletools.genops(data))
    except Exception:
        return False
    last_op, _, position = ops[-1]
    return last_op.name == "STOP" and position == len(data) - 1


def model_file_kinds(uri: str, model_name: str, version: str, folder: Path) -> dict[str, str]:
    """Download a registered model version's files and name the kind of each: ``npz`` (a zip of
    ``.npy`` arrays that load without pickle), ``parquet`` or ``text`` (UTF-8). Any other file,
    and any file or zip member that is a pickle, fails the calling test."""
    import zipfile

    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    root = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{version}", dst_path=str(folder)
        )
    )
    kinds = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name, data = str(path.relative_to(root)), path.read_bytes()
        assert path.suffix.lower() not in {".pkl", ".pickle", ".joblib"}, name
        assert not data.startswith(b"\x80") and not _is_pickle(data), f"{name} is a pickle"
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    inner = archive.read(member)
                    assert member.endswith(".npy") and inner.startswith(b"\x93NUMPY"), (
                        name,
                        member,
                    )
            with np.load(path, allow_pickle=False) as arrays:  # object arrays would need pickle
                for key in arrays.files:
                    assert not arrays[key].dtype.hasobject, (name, key)
            kinds[name] = "npz"
        elif data.startswith(b"PAR1") and data.endswith(b"PAR1"):
            kinds[name] = "parquet"
        else:
            data.decode("utf-8")  # raises on anything binary that is neither of the above
            kinds[name] = "text"
    return kinds


def secagg_entry(c: int):
    """Client ``c``'s entry in a workspace of hand-made secure-aggregation clients."""
    from models.data.partitions import ClientEntry

    return ClientEntry(c, f"clients/client-{c:04d}.parquet", 1, 1, 0, 0)


def secagg_update(c: int):
    """Client ``c``'s explicit-MF update over items 1 and 3 (seeded by ``c``)."""
    import numpy as np

    from models.protocol import ClientUpdate

    rng = np.random.default_rng(c)
    return ClientUpdate(
        c,
        np.array([1, 3]),
        np.array([2, 1 + c]),
        {"gram": rng.normal(size=(2, 6)), "rhs": rng.normal(size=(2, 3))},
        {"train_sse": 1.5 + c, "train_n": 3.0},
    )
