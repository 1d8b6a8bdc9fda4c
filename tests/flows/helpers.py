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
def flow_log(
    level: int, loggers: tuple[str, ...] = ("prefect.flow_runs",)
) -> Iterator[list[logging.LogRecord]]:
    """The flow runs' log records at ``level`` and above while the block runs (the flow's run
    logger, whatever its console handler does; ``loggers`` adds others, such as
    ``prefect.task_runs``)."""
    # Prefect configures its loggers when prefect.main is first imported, which replaces the
    # handlers already on them: a test whose first flow run comes inside the block would see none
    import prefect.main  # noqa: F401

    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append  # type: ignore[method-assign]
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    try:
        yield records
    finally:
        for name in loggers:
            logging.getLogger(name).removeHandler(handler)


def messages(records: list[logging.LogRecord]) -> list[str]:
    """The messages of ``records``, as formatted for the log."""
    return [record.getMessage() for record in records]


def flow_task_runs(store: dict[str, Any], run_id: str) -> list[Any]:
    """The task runs the Prefect API holds for the flow run of MLflow run ``run_id`` (read after
    the flow has ended)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run = store["client"].get_run(run_id).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        return prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run)]))
        )


def sites_file(folder: Path, weight: int = 1, catalogue: str | None = None) -> str:
    """A ``sites.yaml`` in ``folder`` of one site, shop-a (with ``weight``), the coordinator's
    key beside it, and the published ``catalogue`` file it names, if any."""
    import base64

    from models.privacy.identity import generate_identity, public_bytes, save_identity

    save_identity(generate_identity(), folder, 0)  # the coordinator's key
    shop = base64.b64encode(public_bytes(generate_identity())).decode()
    published = "" if catalogue is None else f"catalogue: {catalogue}\n"
    (folder / "sites.yaml").write_text(
        f"coordinator_key: client-0.key\n{published}sites:\n"
        f"  - {{name: shop-a, public_key: '{shop}', weight: {weight}}}\n"
    )
    return str(folder / "sites.yaml")


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


def final_checkpoint(workspace: str, step: int) -> dict[str, Any]:
    """The arrays of a kept run's checkpoint after its last step, ``step``: the one checkpoint
    a finished run leaves in its workspace (each checkpoint deletes the earlier ones)."""
    import numpy as np

    files = sorted((Path(workspace) / "checkpoints").glob("round-*.npz"))
    assert [f.name for f in files] == [f"round-{step:04d}.npz"], files
    with np.load(files[0], allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    assert int(arrays["progress"][0]) == step
    return arrays


def workspace_clients(workspace: str) -> list[Any]:
    """Every client's partition of a kept workspace (a ``ClientData`` each), read as the
    client tasks read them."""
    from models.data.partitions import read_item_ids, read_manifest
    from tasks.clients import open_client

    n_items = len(read_item_ids(workspace))
    return [open_client(workspace, e, n_items) for e in read_manifest(workspace).clients]


def censored_noise_ratio(released: Any, mean: Any, variance: Any) -> float:
    """``sum (x - E x)^2 / sum Var x`` over the entries of ``released``, for ``x = max(y, 0)``
    with ``y ~ N(mean, variance)`` per entry (a noisy count floored at 0): about 1 when the
    values were drawn so, far below 1 when they carry less noise (exact counts: their spread
    is only what ``variance`` adds beyond the noise), far above when they carry more."""
    import numpy as np
    from scipy.stats import norm

    m, s = np.asarray(mean, dtype=np.float64), np.sqrt(np.asarray(variance, dtype=np.float64))
    a = m / s
    first = m * norm.cdf(a) + s * norm.pdf(a)
    second = (m**2 + s**2) * norm.cdf(a) + m * s * norm.pdf(a)
    return float(np.sum((np.asarray(released) - first) ** 2) / np.sum(second - first**2))


def summed_answers(workspace: str, phase: str, round_: int) -> dict[str, Any]:
    """The sum of every client's answer to one round of a private run, as the clients kept
    them beside their partitions: ``counts`` and each array (a private answer covers every
    item, so the sums are element-wise)."""
    import numpy as np

    from models.data.partitions import read_manifest
    from models.protocol import answer_from_arrays

    files = sorted((Path(workspace) / "clients").glob(f"*.answer-{phase}-{round_:04d}.npz"))
    assert len(files) == read_manifest(workspace).n_clients, files
    total: dict[str, Any] = {}
    for path in files:
        with np.load(path, allow_pickle=False) as data:
            update, _ = answer_from_arrays({name: data[name] for name in data.files})
        assert np.array_equal(update.items, np.arange(update.items.size))
        for name, value in {"counts": update.counts, **update.arrays}.items():
            total[name] = total.get(name, 0.0) + value
    return total


def unpacked(packed: Any, k: int) -> Any:
    """Symmetric (n, k, k) matrices from their upper triangles, row by row ((n, k(k+1)/2))."""
    import numpy as np

    rows, cols = np.triu_indices(k)
    out = np.zeros((packed.shape[0], k, k))
    out[:, rows, cols] = packed
    out[:, cols, rows] = packed
    return out
