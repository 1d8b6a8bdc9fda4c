"""Client partitions: one Parquet file per client in a run workspace, plus a manifest.

Only the client's own code reads ``clients/client-XXXX.parquet``; the server reads the manifest
(sizes, item catalogue, dataset fingerprint), never a partition.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.client import SPLIT, TEST, TRAIN, VALID, ClientData
from models.data.schema import ITEM, RATING, TIMESTAMP, USER, Interactions
from models.files import make_private_folder

USER_ID = "user_id"
MANIFEST = "manifest.json"
FINISHED = "FINISHED"  # in a workspace kept after its run succeeded: nothing to resume


def mark_finished(workspace: str | Path) -> None:
    """Record in a kept workspace that its run succeeded (``fedrec workspaces`` then offers no
    ``--resume`` for it)."""
    (Path(workspace) / FINISHED).write_text("the run succeeded; kept by --keep-workspace\n")


def is_finished(workspace: str | Path) -> bool:
    return (Path(workspace) / FINISHED).is_file()


ITEMS = "items.parquet"


@dataclass(frozen=True)
class ClientEntry:
    client_id: int
    path: str  # relative to the workspace
    n_users: int
    n_train: int | None  # None: a site that answers only private runs does not say
    n_valid: int | None
    n_test: int | None


@dataclass(frozen=True)
class Manifest:
    """What the server may know about the partitions."""

    fingerprint: str
    source: str
    n_items: int
    n_users: int
    rating_scale: tuple[float, float] | None
    clients: list[ClientEntry]

    @property
    def n_clients(self) -> int:
        return len(self.clients)

    def profile(self) -> pd.DataFrame:
        """Users and rows per client and split: what the server may show about the data."""
        return pd.DataFrame(
            [(e.client_id, e.n_users, e.n_train, e.n_valid, e.n_test) for e in self.clients],
            columns=["client", "users", "train_rows", "valid_rows", "test_rows"],
        )


def build_clients(
    data: Interactions, client_of_user: np.ndarray, split: np.ndarray
) -> list[ClientData]:
    """In-memory client datasets: each client's users renumbered locally from 0."""
    frame = data.frame
    client_of_row = client_of_user[frame[USER].to_numpy()]
    n_clients = int(client_of_user.max()) + 1 if client_of_user.size else 0
    order = np.argsort(client_of_row, kind="stable")
    bounds = np.searchsorted(client_of_row[order], np.arange(n_clients + 1))
    clients = []
    for c in range(n_clients):
        rows = order[bounds[c] : bounds[c + 1]]
        part = frame.iloc[rows]
        members = np.flatnonzero(
            client_of_user == c
        )  # includes users whose rows are all elsewhere: none
        local = np.searchsorted(members, part[USER].to_numpy())
        client_frame = pd.DataFrame(
            {
                USER: local.astype(np.int32),
                ITEM: part[ITEM].to_numpy(np.int32),
                RATING: part[RATING].to_numpy(np.float64),
                SPLIT: split[rows].astype(np.int8),
            }
        )
        if TIMESTAMP in part:
            client_frame[TIMESTAMP] = part[TIMESTAMP].to_numpy(np.int64)
        features = None
        if data.user_features is not None:
            features = data.user_features.iloc[members].reset_index(drop=True)
        clients.append(ClientData(c, data.user_ids[members], data.n_items, client_frame, features))
    return clients


def write_partitions(
    data: Interactions,
    clients: list[ClientData],
    workspace: str | Path,
    fingerprint: str | None = None,
) -> Manifest:
    """Write every client's partition and the manifest, atomically (a temp folder, then rename).

    The manifest records ``fingerprint``, by default the rows' own
    (:meth:`~models.data.schema.Interactions.fingerprint`). An existing workspace is replaced
    only after the new one is complete.
    """
    check_workspace(workspace)
    workspace = Path(workspace)
    make_private_folder(workspace.parent)  # 0700 whatever the umask: the clients' rows go here
    staging = Path(tempfile.mkdtemp(prefix=".partitions-", dir=workspace.parent))
    try:
        (staging / "clients").mkdir()
        entries = []
        for client in clients:
            relative = f"clients/client-{client.client_id:04d}.parquet"
            table = client.frame.copy()
            table[USER_ID] = client.user_ids[table[USER].to_numpy()]
            table.to_parquet(staging / relative, index=False)
            if client.user_features is not None:
                client.user_features.to_parquet(staging / _users_path(relative), index=False)
            counts = np.bincount(client.frame[SPLIT].to_numpy(), minlength=3)
            entries.append(
                ClientEntry(
                    client.client_id,
                    relative,
                    client.n_users,
                    int(counts[TRAIN]),
                    int(counts[VALID]),
                    int(counts[TEST]),
                )
            )
        items = pd.DataFrame({"item_id": data.item_ids})
        if data.item_features is not None:  # the public catalogue: titles, years, genres
            items = pd.concat([items, data.item_features.reset_index(drop=True)], axis=1)
        items.to_parquet(staging / ITEMS, index=False)
        manifest = Manifest(
            fingerprint=data.fingerprint() if fingerprint is None else fingerprint,
            source=data.source,
            n_items=data.n_items,
            n_users=data.n_users,
            rating_scale=data.rating_scale,
            clients=entries,
        )
        (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, default=str))
        if workspace.exists():
            old = workspace.with_name(workspace.name + ".old")
            os.replace(workspace, old)
            os.replace(staging, workspace)
            shutil.rmtree(old)
        else:
            os.replace(staging, workspace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def check_workspace(workspace: str | Path) -> None:
    """Raise ``ValueError`` unless ``workspace`` is new, empty, or a fedrec workspace.

    A run replaces its workspace's contents and removes the folder when it succeeds, so a folder
    holding anything else (a ``--workspace`` pointed at a data folder) is refused, not emptied.
    """
    path = Path(workspace).expanduser()
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"workspace={str(workspace)!r}: is a file; allowed: a new or empty folder")
    if (path / MANIFEST).is_file() or next(path.iterdir(), None) is None:
        return
    raise ValueError(
        f"workspace={str(workspace)!r}: the folder holds files and is not a fedrec workspace (no "
        f"{MANIFEST}); a run replaces its workspace's contents and removes it when it succeeds, "
        "so allowed: a new or empty folder"
    )


def remove_workspace(workspace: str | Path) -> bool:
    """Delete a finished run's workspace (its client partitions and checkpoints); False when it
    is not a fedrec workspace (then nothing is deleted)."""
    path = Path(workspace)
    if not (path / MANIFEST).is_file():
        return False
    shutil.rmtree(path)
    return True


def read_manifest(workspace: str | Path) -> Manifest:
    raw = json.loads((Path(workspace) / MANIFEST).read_text())
    scale = raw["rating_scale"]
    return Manifest(
        fingerprint=raw["fingerprint"],
        source=raw["source"],
        n_items=raw["n_items"],
        n_users=raw["n_users"],
        rating_scale=None if scale is None else (float(scale[0]), float(scale[1])),
        clients=[ClientEntry(**entry) for entry in raw["clients"]],
    )


def read_partition(workspace: str | Path, entry: ClientEntry, n_items: int) -> ClientData:
    """Load one client's partition (called by that client's task only)."""
    table = pd.read_parquet(Path(workspace) / entry.path)
    users = table[[USER, USER_ID]].drop_duplicates(USER).sort_values(USER)
    user_ids = np.empty(entry.n_users, dtype=users[USER_ID].to_numpy().dtype)
    user_ids[users[USER].to_numpy()] = users[USER_ID].to_numpy()
    features_path = Path(workspace) / _users_path(entry.path)
    features = pd.read_parquet(features_path) if features_path.exists() else None
    return ClientData(entry.client_id, user_ids, n_items, table.drop(columns=[USER_ID]), features)


def _users_path(relative: str) -> str:
    return relative.removesuffix(".parquet") + ".users.parquet"


def read_item_ids(workspace: str | Path) -> np.ndarray:
    return pd.read_parquet(Path(workspace) / ITEMS, columns=["item_id"])["item_id"].to_numpy()


def read_item_features(workspace: str | Path) -> pd.DataFrame | None:
    """The catalogue's side features by item index (``title``, ``year``, ``genre_*``), if any."""
    items = pd.read_parquet(Path(workspace) / ITEMS)
    features = items.drop(columns=["item_id"])
    return features if features.shape[1] else None
