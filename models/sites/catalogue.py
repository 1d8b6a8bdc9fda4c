"""The item catalogue of a federation of sites, and a site's rows against it.

The catalogue is either published by the coordinator (``catalogue:`` in ``sites.yaml``, a file
of item ids: a shop's product list) before enrolment, so that sites send no item ids at all, or
the sorted union of the item-id sets the sites send when they enrol (no users, no rows: the
coordinator then learns which items exist at which site, though not which user touched what).
Item ids are integers or text (product codes): a catalogue holds text when any site's ids, or
the published file's, are not all integers, and a site's integer id then matches its text. A
site then numbers its items by their position in the catalogue, leaves out rows of items the
catalogue lacks, and splits its own rows into train / validation / test with the shared core
functions, from the run's seed and its client id, exactly as the simulation splits one client's
rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from models.client import ClientData
from models.data.partitions import build_clients
from models.data.readers import integer_ids, read_item_list
from models.data.schema import ITEM, Interactions, with_catalogue
from models.data.sharding import SplitMethod, split_rows
from models.sites.schema import SchemaError


def item_set(data: Interactions) -> np.ndarray:
    """The site's item ids, sorted and unique (what it sends to enrol): int64 when the data's ids
    are integers, else their text (an object array of str)."""
    return _ids(data.item_ids)


def _ids(values: Iterable[object] | np.ndarray) -> np.ndarray:
    """Sorted unique ids: int64 when every one is an integer, else each one's text."""
    ids = np.asarray(values)
    if ids.dtype.kind in "iu":
        return np.unique(ids.astype(np.int64))
    return np.unique(np.asarray([str(v) for v in ids.tolist()], dtype=object))


def union_catalogue(item_sets: Iterable[np.ndarray]) -> np.ndarray:
    """The catalogue: the sorted union of the sites' item-id sets; text ids (each integer id as
    its text) when any site's ids are text.

    Raises
    ------
    ValueError
        If there is no set, or the union is empty.
    """
    sets = [np.asarray(s).ravel() for s in item_sets]
    if not sets:
        raise ValueError("no site enrolled: the catalogue would be empty")
    if all(s.dtype.kind in "iu" or s.size == 0 for s in sets):
        catalogue = _ids(np.concatenate([s.astype(np.int64) for s in sets]))
    else:
        catalogue = _ids(np.concatenate([s.astype(object) for s in sets]))
    if catalogue.size == 0:
        raise ValueError("the enrolled sites hold no items")
    return catalogue


def read_catalogue(path: str | Path) -> np.ndarray:
    """A published catalogue (:func:`~models.data.readers.read_item_list`), sorted and unique:
    int64 when every id is a canonical integer, as a site's data file reads them, else text.

    Raises
    ------
    DataValidationError
        Naming the file, and the row of an empty id.
    """
    return _ids(integer_ids(pd.Series(read_item_list(path), dtype=object)).to_numpy())


def item_arrays(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Item ids as the arrays a message carries (numbers only: nothing to unpickle): integer
    ids as ``items`` (int64); text ids as ``item_text``, their UTF-8 bytes end to end (uint8),
    and ``item_ends``, the offset where each one ends (int64)."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu" or ids.size == 0:
        return {"items": ids.astype(np.int64)}
    encoded = [str(v).encode() for v in ids.tolist()]
    return {
        "item_text": np.frombuffer(b"".join(encoded), dtype=np.uint8),
        "item_ends": np.cumsum([len(e) for e in encoded], dtype=np.int64),
    }


def read_item_arrays(arrays: Mapping[str, np.ndarray], what: str) -> np.ndarray:
    """The item ids of :func:`item_arrays`: int64, or text (an object array of str).

    Raises
    ------
    SchemaError
        If ``arrays`` are not one of the two forms, or the text is not cut into non-empty UTF-8
        ids.
    """
    if set(arrays) == {"items"}:
        items = arrays["items"]
        if items.dtype.kind not in "iu" or items.ndim != 1:
            raise SchemaError(f"{what}: 'items' must be a 1-d integer array")
        return items.astype(np.int64)
    if set(arrays) != {"item_text", "item_ends"}:
        raise SchemaError(
            f"{what}: must hold 'items' (integer ids), or 'item_text' and 'item_ends' (text "
            f"ids); got {sorted(arrays)}"
        )
    text, ends = arrays["item_text"], arrays["item_ends"]
    if (
        text.dtype != np.uint8
        or text.ndim != 1
        or ends.dtype.kind not in "iu"
        or ends.ndim != 1
        or ends.size == 0
        or np.any(np.diff(ends, prepend=0) <= 0)
        or int(ends[-1]) != text.size
    ):
        raise SchemaError(f"{what}: 'item_ends' must cut the uint8 'item_text' into non-empty ids")
    raw, starts = text.tobytes(), [0, *ends[:-1].tolist()]
    try:
        ids = [raw[a:b].decode("utf-8") for a, b in zip(starts, ends.tolist(), strict=True)]
    except UnicodeDecodeError as err:
        raise SchemaError(f"{what}: an item id is not UTF-8 text") from err
    return np.asarray(ids, dtype=object)


def check_sorted_ids(ids: np.ndarray, what: str) -> np.ndarray:
    """``ids`` if sorted and unique (a catalogue's order numbers the items at every site).

    Raises
    ------
    SchemaError
        If not.
    """
    if ids.ndim != 1:
        raise SchemaError(f"{what} items must be sorted and unique")
    if ids.dtype.kind in "iu":
        unsorted = bool(np.any(np.diff(ids) <= 0))
    else:
        unsorted = any(a >= b for a, b in pairwise(ids.tolist()))
    if unsorted:
        raise SchemaError(f"{what} items must be sorted and unique")
    return ids


def catalogue_key(catalogue: np.ndarray) -> bytes:
    """The catalogue's ids as bytes, to tell two catalogues apart."""
    if catalogue.dtype.kind in "iu":
        return catalogue.astype(np.int64).tobytes()
    return "\x00".join(catalogue.tolist()).encode()


def _site_ids(data: Interactions, catalogue: np.ndarray) -> Interactions:
    """``data`` with its item ids as the catalogue holds them: as text under a text catalogue
    (an integer id matches its text)."""
    if catalogue.dtype.kind in "iu" or np.asarray(data.item_ids).dtype.kind not in "iu":
        return data
    return replace(data, item_ids=np.asarray([str(v) for v in data.item_ids], dtype=object))


def outside(data: Interactions, catalogue: np.ndarray) -> tuple[int, int]:
    """How many of the site's items, and of its rows, ``catalogue`` lacks."""
    ids = pd.Index(np.asarray(_site_ids(data, catalogue).item_ids))
    lacking = pd.Index(catalogue).get_indexer(ids) < 0
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
    listed = pd.DataFrame(index=pd.Index(catalogue))
    local, _ = with_catalogue(_site_ids(data, catalogue), listed, "the coordinator's catalogue")
    holder = np.zeros(data.n_users, dtype=np.int32)
    split = split_rows(
        local, method=method, valid_fraction=valid_fraction, test_fraction=test_fraction
    )
    (client,) = build_clients(local, holder, split)
    return replace(client, client_id=client_id)
