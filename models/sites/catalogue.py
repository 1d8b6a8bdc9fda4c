"""The item catalogue of a federation of sites, and a site's rows against it.

The catalogue is either published by the coordinator (``catalogue:`` in ``sites.yaml``, a file
of item ids: a shop's product list) before enrolment, so that sites send no item ids at all, or
the sorted union of the item-id sets the sites send when they enrol (no users, no rows: the
coordinator then learns which items exist at which site, though not which user touched what).
A site then numbers its items by their position in the catalogue, leaves out rows of items the
catalogue lacks, and splits its own rows into train / validation / test with the shared core
functions, from the run's seed and its client id, exactly as the simulation splits one client's
rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from models.client import ClientData
from models.data.errors import DataValidationError
from models.data.partitions import build_clients
from models.data.readers import read_item_list
from models.data.schema import ITEM, Interactions, with_catalogue
from models.data.sharding import SplitMethod, split_rows


def item_set(data: Interactions, column: str = "item_id") -> np.ndarray:
    """The site's item ids as sorted unique int64 (what it sends to enrol).

    Raises
    ------
    DataValidationError
        If the ids (read from ``column``) are not integers: the catalogue is exchanged as an
        integer array, so text ids such as product codes are refused, naming the first one.
    """
    ids = np.asarray(data.item_ids)
    if ids.dtype.kind not in "iu":
        text = pd.Series(ids.astype(str))
        first = text[~text.str.fullmatch(r"-?[0-9]+")].iloc[0] if len(text) else ""
        raise DataValidationError(
            "is not an integer item id",
            file=data.source or None,
            column=column,
            value=first,
            allowed="integer item ids: a site federation exchanges its catalogue as integers "
            "(number the items the same way at every site, e.g. by a shared product table)",
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


def read_catalogue(path: str | Path) -> np.ndarray:
    """A published catalogue (:func:`~models.data.readers.read_item_list`) as sorted unique
    int64: the ids sites exchange.

    Raises
    ------
    DataValidationError
        Naming the file, and the row and value when an id is not an integer.
    """
    ids = pd.Series(read_item_list(path))
    numbers = pd.to_numeric(ids, errors="coerce")
    bad = numbers.isna() | (numbers != numbers.round()) | (numbers.abs() >= 2**63)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataValidationError(
            "is not an integer", file=str(path), row=row + 1, column="item_id",
            value=ids.iloc[row], allowed="an integer item id (sites exchange integer ids)",
        )  # fmt: skip
    return np.unique(ids.astype(np.int64).to_numpy())


def outside(data: Interactions, catalogue: np.ndarray) -> tuple[int, int]:
    """How many of the site's items, and of its rows, ``catalogue`` lacks."""
    item_set(data)  # checks integer ids
    lacking = ~np.isin(np.asarray(data.item_ids, dtype=np.int64), catalogue)
    return int(lacking.sum()), int(lacking[data.frame[ITEM].to_numpy()].sum())


def left_out_note(site: str, info: dict) -> str | None:
    """The coordinator's line about a site's rows that the published catalogue leaves out,
    from its enrolment ``info``; None when it left out none, or did not say (a site that
    answers only private runs tells its own log, not the coordinator)."""
    rows, items = info.get("outside_rows"), info.get("outside_items")
    if not isinstance(rows, int) or not isinstance(items, int) or rows <= 0:
        return None
    return (
        f"{site}: {rows} of its rows, of {items} items the published catalogue lacks, are left "
        "out of this run"
    )


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
    ``catalogue`` (rows of items it lacks left out: :func:`outside` counts them), rows split by
    :func:`~models.data.sharding.split_rows` (each row by its own key: the split the simulated
    run gives the same rows).
    """
    item_set(data)  # checks integer ids
    listed = pd.DataFrame(index=pd.Index(np.asarray(catalogue, dtype=np.int64)))
    local, _ = with_catalogue(data, listed, "the coordinator's catalogue")
    holder = np.zeros(data.n_users, dtype=np.int32)
    split = split_rows(
        local, method=method, valid_fraction=valid_fraction, test_fraction=test_fraction
    )
    (client,) = build_clients(local, holder, split)
    return replace(client, client_id=client_id)
