"""The validated, id-encoded form of an interaction dataset that the rest of the core consumes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import pandas as pd

from models.data.errors import DataValidationError

# Column names of the internal interaction frame.
USER = "user"
ITEM = "item"
RATING = "rating"
TIMESTAMP = "timestamp"


@dataclass(frozen=True)
class Interactions:
    """Interactions with contiguous integer ids, and the mapping back to the caller's ids.

    Attributes
    ----------
    frame : DataFrame
        Columns ``user`` and ``item`` (int32, contiguous from 0), ``rating`` (float64) and,
        when the source has one, ``timestamp`` (int64, Unix seconds).
    user_ids, item_ids : ndarray
        ``user_ids[k]`` is the caller's id of internal user ``k`` (likewise for items).
    rating_scale : tuple of float or None
        The declared (min, max) of explicit ratings; ``None`` for implicit feedback.
    user_features, item_features : DataFrame or None
        Side features indexed by internal id, when the source has them.
    source : str
        Where the rows came from (a path, or ``synthetic(...)``), for messages.
    public_items : DataFrame or None
        A public list of items shipped with the data, indexed by the caller's ids, with their
        features (MovieLens' movie list, the synthetic generator's items): every item that
        exists, rated or not. :func:`with_catalogue` numbers the data against it.
    """

    frame: pd.DataFrame
    user_ids: np.ndarray
    item_ids: np.ndarray
    rating_scale: tuple[float, float] | None = None
    user_features: pd.DataFrame | None = None
    item_features: pd.DataFrame | None = None
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    public_items: pd.DataFrame | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.frame)

    def fingerprint(self) -> str:
        """A SHA-256 over the rows in the caller's ids, independent of row order and of the
        internal encoding.

        Computed once per instance (about 0.1 s on ML-1M); the instance is immutable.
        """
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(b"fedrec interactions v2\n")
        columns = []
        for ids, column in ((self.user_ids, USER), (self.item_ids, ITEM)):
            # each id by its rank among the ids' text forms: the same for any internal encoding
            text = np.asarray([str(v) for v in ids], dtype=object)
            order = np.argsort(text, kind="stable")
            rank = np.empty(len(ids), np.int64)
            rank[order] = np.arange(len(ids))
            digest.update("\x1f".join(text[order].tolist()).encode() + b"\n")
            columns.append(rank[self.frame[column].to_numpy()])
        columns.append(self.frame[RATING].to_numpy(np.float64).view(np.int64))
        if TIMESTAMP in self.frame:
            columns.append(self.frame[TIMESTAMP].to_numpy(np.int64))
        rows = np.stack(columns, axis=1)
        if self.n_users * self.n_items < 2**62:  # one key per (user, item): a single sort
            key = rows[:, 0] * self.n_items + rows[:, 1]
            order = np.argsort(key, kind="stable")
            if np.any(key[order][1:] == key[order][:-1]):  # a pair repeated: order by all columns
                order = np.lexsort(rows.T[::-1])
        else:
            order = np.lexsort(rows.T[::-1])
        rows = rows[order]
        digest.update(np.ascontiguousarray(rows).astype("<i8").tobytes())
        return digest.hexdigest()


def encode_interactions(
    frame: pd.DataFrame,
    *,
    rating_scale: tuple[float, float] | None,
    source: str,
    user_features: pd.DataFrame | None = None,
    item_features: pd.DataFrame | None = None,
    notes: tuple[str, ...] = (),
    features_list_every_item: bool = False,
) -> Interactions:
    """Map the caller's user and item ids (any hashable dtype) to contiguous integers.

    Parameters
    ----------
    frame : DataFrame
        Validated rows with columns ``user``, ``item``, ``rating`` and optionally ``timestamp``,
        holding the caller's ids.
    rating_scale, source, notes
        Stored on the result.
    user_features, item_features : DataFrame, optional
        Indexed by the caller's ids; rows for ids absent from ``frame`` are dropped.
    features_list_every_item : bool
        ``item_features`` is a public list of every item (kept whole as ``public_items``).

    Returns
    -------
    Interactions
    """
    user_codes, user_ids = pd.factorize(frame[USER], sort=True)
    item_codes, item_ids = pd.factorize(frame[ITEM], sort=True)
    encoded = pd.DataFrame(
        {
            USER: user_codes.astype(np.int32),
            ITEM: item_codes.astype(np.int32),
            RATING: frame[RATING].to_numpy(dtype=np.float64),
        }
    )
    if TIMESTAMP in frame:
        encoded[TIMESTAMP] = frame[TIMESTAMP].to_numpy(dtype=np.int64)
    user_ids = np.asarray(user_ids)
    item_ids = np.asarray(item_ids)
    public = item_features if features_list_every_item else None
    if user_features is not None:
        user_features = user_features.reindex(user_ids).reset_index(drop=True)
    if item_features is not None:
        item_features = item_features.reindex(item_ids).reset_index(drop=True)
    return Interactions(
        frame=encoded,
        user_ids=user_ids,
        item_ids=item_ids,
        rating_scale=rating_scale,
        user_features=user_features,
        item_features=item_features,
        source=source,
        notes=tuple(notes),
        public_items=public,
    )


def with_catalogue(
    data: Interactions, catalogue: pd.DataFrame, what: str
) -> tuple[Interactions, np.ndarray]:
    """``data`` numbered against ``catalogue`` (indexed by the caller's item ids, unique; with
    feature columns or none): every item it lists is an item of the model, rated or not, and
    rows of items it lacks are left out (a note names ``what`` and counts them). The model's
    item list then says nothing about which items the rows touch. Also returns which of the
    rows were kept.

    Raises
    ------
    DataValidationError
        When the catalogue lists no item, or an id twice.
    """
    index = catalogue.index
    if len(index) == 0 or not index.is_unique:
        raise DataValidationError(
            "lists no item" if len(index) == 0 else "lists an item id twice",
            file=what,
            allowed="each item id once",
        )
    ids = np.asarray(data.item_ids)
    if ids.dtype.kind in "iu" and index.dtype.kind not in "iu":  # ids read as text
        numeric = pd.to_numeric(pd.Series(index), errors="coerce")
        if numeric.notna().all():
            index = pd.Index(numeric.astype(np.int64))
    position = index.get_indexer(pd.Index(ids))
    rows = position[data.frame[ITEM].to_numpy()]
    keep = rows >= 0
    frame = data.frame[keep].reset_index(drop=True)
    frame[ITEM] = rows[keep].astype(np.int32)
    features = None
    if len(catalogue.columns):
        features = catalogue.reset_index(drop=True)
    elif data.item_features is not None:  # the data's own, for the items it rated
        inverse = np.full(len(index), -1, dtype=np.int64)
        inverse[position[position >= 0]] = np.flatnonzero(position >= 0)
        features = data.item_features.reindex(inverse).reset_index(drop=True)
    left_out = int((~keep).sum())
    note = f"the catalogue is {what}: {len(index)} items"
    if left_out:
        lacking = int((position < 0).sum())
        note += f"; {left_out} rows of {lacking} items it lacks are left out"
    published = replace(
        data, frame=frame, item_ids=np.asarray(index), item_features=features,
        notes=(*data.notes, note),
    )  # fmt: skip
    return published, keep


def rated_positives(
    items: list[str], ratings: Sequence[float] | None, threshold: float | None
) -> list[str]:
    """The history items a model trained on rows rated ``>= threshold`` counts as positives:
    every item when there is no threshold or ``ratings`` (a list-like) does not match ``items``
    one for one (a history without ratings)."""
    if threshold is None or ratings is None:
        return items
    if len(ratings) != len(items):
        return items
    return [item for item, rating in zip(items, ratings, strict=True) if rating >= threshold]


def require_ratings(data: Interactions, rating_col: str | None) -> Interactions:
    """``data`` unchanged when it holds explicit ratings (it has a rating scale).

    Raises
    ------
    DataValidationError
        Data read without a rating column (implicit feedback: every row would be the same
        rating, so a rating model would learn nothing and score a perfect error of 0).
    """
    if data.rating_scale is None:
        raise DataValidationError(
            "has no ratings: every row would count as the same rating",
            file=data.source or None,
            column=rating_col,
            allowed="a rating column (--rating-col), or --feedback implicit for data without ratings",
        )
    return data


def every_row_positive(data: Interactions) -> Interactions:
    """``data`` for implicit feedback without a positive threshold: every row is a positive,
    whatever its rating. Rows rated differently get a note saying so (a 0/1 or 1-5 column
    would otherwise count its lowest rows as positives in silence)."""
    if data.rating_scale is None or not len(data.frame):  # no rating column: rows are clicks
        return data
    ratings = data.frame[RATING]
    low, high = float(ratings.min()), float(ratings.max())
    if low == high:
        return data
    note = (
        f"every row counts as a positive, whatever its rating (here {low:g} to {high:g}); "
        "--positive-threshold T keeps only the rows rated >= T"
    )
    return replace(data, notes=(*data.notes, note))


def keep_positives(
    data: Interactions, threshold: float | None, *, empty_ok: bool = False
) -> Interactions:
    """Implicit feedback from ratings: only rows rated ``>= threshold`` remain (all rows for
    ``None``), each now meaning "interacted"; the user and item catalogues are unchanged.

    Raises
    ------
    DataValidationError
        A threshold above every rating (nothing would remain to train on), unless ``empty_ok``:
        one site's data among many may hold no positive row.
    """
    if threshold is None:
        return data
    ratings = data.frame[RATING].to_numpy()
    keep = ratings >= threshold
    if ratings.size and not keep.any() and not empty_ok:
        unrated = data.rating_scale is None  # read without a rating column: every row is 1
        raise DataValidationError(
            f"keeps no row as a positive (the highest rating is {ratings.max():g}"
            + (", as the data has no rating column: every row counts 1)" if unrated else ")"),
            file=data.source or None,
            setting="positive_threshold",
            value=threshold,
            allowed=f"a threshold <= {ratings.max():g}"
            + (", or name the rating column (--rating-col)" if unrated else ""),
        )
    note = f"kept {int(keep.sum())} of {keep.size} rows rated >= {threshold} as positives"
    return replace(data, frame=data.frame[keep].reset_index(drop=True), notes=(*data.notes, note))
