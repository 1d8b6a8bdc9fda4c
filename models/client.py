"""One client's rows in memory, as the client itself sees them (users renumbered locally)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from hashlib import blake2b

import numpy as np
import pandas as pd
from scipy import sparse

from models.data.schema import ITEM, RATING, USER
from models.mf.als import RatingRows

SPLIT = "split"
TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = {"train": TRAIN, "valid": VALID, "test": TEST}
# The validation rows of the selection users: a model that learns from validation rows (the
# re-ranker) leaves these users' rows out of its labels and is compared (promoted) on them.
SELECT = "select"
SELECT_SHARE = 0.2  # of the users, chosen by a hash of their id (the same users in every run)
_SELECT_BUCKETS = 1000
_SELECT_PERSON = b"fedrec-select"  # BLAKE2b's personalisation: this hash, not another use's


def selection_users(user_ids: np.ndarray) -> np.ndarray:
    """Which users are selection users: about a fifth of any set of users, by a BLAKE2b hash of
    each id as text (so ``1`` and ``"1"`` agree), whatever the seed, the sharding or the library
    versions. The hash is public and keyless: which users are held out for selection is no
    secret, and the same users are held out from every run's re-ranker, so a champion's ranker
    never learnt from the rows the next run compares it on."""
    ids = np.asarray(user_ids).ravel()
    buckets = np.fromiter(
        (
            int.from_bytes(
                blake2b(str(u).encode(), digest_size=8, person=_SELECT_PERSON).digest(), "big"
            )
            % _SELECT_BUCKETS
            for u in ids
        ),
        dtype=np.int64,
        count=ids.size,
    )
    return buckets < round(SELECT_SHARE * _SELECT_BUCKETS)


@dataclass(frozen=True)
class ClientData:
    """A client's train / validation / test rows.

    Attributes
    ----------
    client_id : int
    user_ids : ndarray
        The caller's id of each local user (local index -> id); never sent to the server.
    n_items : int
        Size of the global item catalogue (item indices are global).
    frame : DataFrame
        Columns ``user`` (local index), ``item``, ``rating`` and ``split`` (0/1/2).
    user_features : DataFrame or None
        The client's own users' side features (row ``k`` = local user ``k``), when the data has
        them; they stay on the client.
    """

    client_id: int
    user_ids: np.ndarray
    n_items: int
    frame: pd.DataFrame
    user_features: pd.DataFrame | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def rows(self, split: str) -> RatingRows:
        """The rows of one split (``train``, ``valid``, ``test``, or ``select``: the validation
        rows of :func:`selection_users`), layouts cached across rounds."""
        if split == SELECT:
            return self._select_rows
        return self._rows[SPLIT_NAMES[split]]

    @cached_property
    def selected(self) -> np.ndarray:
        """Per local user: is it a selection user (:func:`selection_users`)?"""
        return selection_users(self.user_ids)

    @cached_property
    def _select_rows(self) -> RatingRows:
        valid = self.rows("valid")
        keep = self.selected[valid.users]
        return RatingRows(
            valid.users[keep],
            valid.items[keep],
            valid.ratings[keep],
            n_users=self.n_users,
            n_items=self.n_items,
        )

    @cached_property
    def _rows(self) -> dict[int, RatingRows]:
        out = {}
        for code in (TRAIN, VALID, TEST):
            part = self.frame[self.frame[SPLIT].to_numpy() == code]
            out[code] = RatingRows(
                part[USER].to_numpy(),
                part[ITEM].to_numpy(),
                part[RATING].to_numpy(),
                n_users=self.n_users,
                n_items=self.n_items,
            )
        return out

    def matrix(self, split: str, min_rating: float | None = None) -> sparse.csr_matrix:
        """Users x items indicator of one split's rows (optionally only ratings >= ``min_rating``)."""
        rows = self.rows(split)
        keep = np.ones(len(rows), bool) if min_rating is None else rows.ratings >= min_rating
        return sparse.csr_matrix(
            (np.ones(int(keep.sum())), (rows.users[keep], rows.items[keep])),
            shape=(self.n_users, self.n_items),
        )
