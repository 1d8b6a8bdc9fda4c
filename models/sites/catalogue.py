"""The item catalogue of a federation of sites, and a site's rows against it.

Each site enrols by sending the set of item ids it holds (no users, no rows); the catalogue is
the sorted union, so the coordinator learns which items exist at which site but not which user
touched what. A site then numbers its items by their position in the catalogue and splits its
own rows into train / validation / test with the shared core functions, from the run's seed and
its client id, exactly as the simulation splits one client's rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np

from models.client import ClientData
from models.data.partitions import build_clients
from models.data.schema import ITEM, Interactions
from models.data.sharding import SplitMethod, split_rows


def item_set(data: Interactions) -> np.ndarray:
    """The site's item ids as sorted unique int64 (what it sends to enrol).

    Raises
    ------
    ValueError
        If the ids are not integers (the catalogue is exchanged as an integer array).
    """
    ids = np.asarray(data.item_ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(
            f"{data.source}: item ids are {ids.dtype} values; a site federation needs integer ids"
        )
    return np.unique(ids.astype(np.int64))


def union_catalogue(item_sets: Iterable[np.ndarray]) -> np.ndarray:
    """The catalogue: the sorted union of the sites' item-id sets.

    Raises
    ------
    ValueError
        If there is no set, or the union is empty.
    """
    sets = [np.asarray(s, dtype=np.int64).ravel() for s in item_sets]
    if not sets:
        raise ValueError("no site enrolled: the catalogue would be empty")
    catalogue = np.unique(np.concatenate(sets))
    if catalogue.size == 0:
        raise ValueError("the enrolled sites hold no items")
    return catalogue


def site_client(
    data: Interactions,
    catalogue: np.ndarray,
    *,
    client_id: int,
    method: SplitMethod,
    valid_fraction: float,
    test_fraction: float,
) -> ClientData:
    """The site's rows as one client of the run: items numbered by their position in
    ``catalogue``, rows split by :func:`~models.data.sharding.split_rows` (each row by its own
    key: the split the simulated run gives the same rows).

    Raises
    ------
    ValueError
        If an item of the site is missing from the catalogue.
    """
    ids = item_set(data)  # checks integer ids
    position = np.searchsorted(catalogue, ids)
    inside = (position < catalogue.size) & (
        catalogue[np.minimum(position, catalogue.size - 1)] == ids
    )
    if not np.all(inside):
        raise ValueError(f"{int((~inside).sum())} of the site's items are not in the catalogue")
    to_global = np.searchsorted(catalogue, np.asarray(data.item_ids, dtype=np.int64))
    frame = data.frame.copy()
    frame[ITEM] = to_global[frame[ITEM].to_numpy()].astype(np.int32)
    local = replace(data, frame=frame, item_ids=catalogue)
    holder = np.zeros(data.n_users, dtype=np.int32)
    split = split_rows(
        local, method=method, valid_fraction=valid_fraction, test_fraction=test_fraction
    )
    (client,) = build_clients(local, holder, split)
    return replace(client, client_id=client_id)
