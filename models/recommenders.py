"""Every model family's servable recommender, found by the kind its saved state names.

Serving and tracking know recommenders only through what each class declares (``kind``,
``request_columns``, ``requirements``) and the methods every one has (``recommend``, ``save``,
``load``), so a new family's model needs no branch there.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from scipy import sparse

    from models.federation.family import Recommender

# kind -> (module, class): a family's module is imported only when one of its models is read,
# so loading an MF model does not import LightGBM or scikit-learn
RECOMMENDERS: dict[str, tuple[str, str]] = {
    "mf": ("models.mf.recommender", "MFRecommender"),
    "ranking": ("models.ranking.recommender", "RankingRecommender"),
    "neural": ("models.neural.recommender", "NeuralRecommender"),
}
STATE = "recommender.json"

# Every family's reason for a request whose history holds no item the model knows: the start of
# the reason, then what it answers instead (the most popular items, or no score)
NO_HISTORY = "no known items in history"
# the reason of an asked item the model does not serve: a row with no score, in every family
UNKNOWN_ITEM = "unknown item: not scored"


class RequestError(ValueError):
    """A request a recommender cannot answer as asked: its message is one line naming the
    request row (0-based, as in the request's table), its user, the column, the value and what
    is allowed."""

    one_line = True  # the command line shows the message alone, as the user's to fix


def _shown(value: object) -> str:
    """A value as a request would write it (numpy scalars as plain numbers), cut at 60."""
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ndim(value: object) -> int:
    """``np.ndim``, or -1 for a ragged nesting (``[["a"], ["b", "c"]]``) numpy gives no shape."""
    try:
        return np.ndim(value)
    except ValueError:
        return -1


def _is_list(value: object) -> bool:
    return isinstance(value, list | tuple | np.ndarray) and _ndim(value) == 1


def _is_missing(value: object) -> bool:
    """None, NaN and pandas' missing values: an absent cell (a list, or a list of lists, is never
    missing)."""
    import pandas as pd

    return _ndim(value) == 0 and bool(pd.isna(value))  # type: ignore[call-overload]


def check_requests(requests: pd.DataFrame, k: object) -> None:
    """Refuse what no recommender can answer as asked, before any work: ``k`` that is not a
    positive integer, a missing ``user_id`` or ``history_items`` column, a ``history_items`` or
    ``items`` cell that is not a list (a lone id would be read one character at a time), or
    ``history_ratings`` that are not one number per history item (an empty list, or no cell,
    is a history without ratings), a user given in two rows.

    Raises
    ------
    RequestError
        For the first such value.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise RequestError(f"k {_shown(k)} is not a positive integer; allowed: an integer >= 1")
    for column in ("user_id", "history_items"):
        if column not in requests:
            raise RequestError(
                f"requests have no {column} column; allowed: one row per user with columns "
                "user_id and history_items (a list of item ids)"
            )
    ratings = requests.get("history_ratings")
    asked = requests.get("items")
    rows_of: dict[str, int] = {}
    for row, (user, history) in enumerate(
        zip(requests["user_id"], requests["history_items"], strict=True)
    ):
        where = f"request row {row} (user {_shown(str(user))})"
        if _is_missing(user) or not str(user).strip():
            raise RequestError(
                f"request row {row}: user_id {_shown(user)} is missing; allowed: the user's id "
                "(an id the model does not know gets the most popular items)"
            )
        first = rows_of.setdefault(id_text(user), row)
        if first != row:  # the answer's rows name the user only: two lists could not be told apart
            raise RequestError(
                f"request row {row}: user_id {_shown(user)} is also request row {first}'s; "
                "allowed: one row per user, with all of the user's history in it"
            )
        if not _is_list(history) and not _is_missing(history):
            raise RequestError(
                f"{where}: history_items {_shown(history)} is not a list; "
                "allowed: a list of item ids (empty for a user without history)"
            )
        if asked is not None:
            cell = asked.iloc[row]
            if not _is_list(cell) and not _is_missing(cell):
                raise RequestError(
                    f"{where}: items {_shown(cell)} is not a list; allowed: a list of item ids "
                    "to score, or an empty cell for a top-k list"
                )
        if ratings is None or _is_missing(ratings.iloc[row]):
            continue
        rated = ratings.iloc[row]
        n_items = len(as_list(history))
        if not _is_list(rated) or len(rated) not in (0, n_items):
            size = f"{len(rated)} ratings" if _is_list(rated) else _shown(rated)
            raise RequestError(
                f"{where}: history_ratings {size} for {n_items} history item(s); allowed: one "
                "rating per history item, or an empty list (no ratings)"
            )
        values = np.asarray(rated)
        if (
            values.dtype.kind in "iuf"
            and np.isfinite(values).all()
            and not any(isinstance(rating, bool) for rating in rated)  # True is no rating
        ):
            continue  # finite numbers: the common case, without float() of each one
        for rating in rated:
            try:
                ok = not isinstance(rating, bool | str) and np.isfinite(float(rating))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise RequestError(
                    f"{where}: rating {_shown(rating)} in history_ratings is not a number; "
                    "allowed: finite numbers, one per history item"
                )


def id_text(value: object) -> str:
    """An item id of a request as the model's index names it: as training reads ids, a whole
    float is the integer id (``50.0`` is ``"50"``: ids pass through float columns wherever a
    table had a missing value) and text is stripped."""
    if isinstance(value, float | np.floating) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return value.strip() if isinstance(value, str) else str(value)


def latest_per_item(items: list[str], ratings: list) -> tuple[list[str], list]:
    """A history that gives an item twice, read as training reads such rows: each item once, at
    its last place, with the rating it has there (``ratings`` that are not one per item are
    returned as they are)."""
    if len(set(items)) == len(items):
        return items, ratings
    last = sorted({item: i for i, item in enumerate(items)}.values())
    rated = [ratings[i] for i in last] if len(ratings) == len(items) else ratings
    return [items[i] for i in last], rated


def asked_items(requests: pd.DataFrame, row: int) -> list[str] | None:
    """The ids a request row asks to have scored (its ``items`` cell), as text; None when the
    row asks for none (no such column, or an empty cell: NaN, None), so it gets a top-K list.
    An empty list asks for nothing to be scored: it gets no rows."""
    column = requests.get("items")
    if column is None:
        return None
    value = column.iloc[row]
    if np.ndim(value) == 0:  # None, NaN, pd.NA (or a lone string: not a list of items)
        return None
    return [id_text(item) for item in value]


def best_first(scored: list[tuple[str, float, str]]) -> list[tuple[str, float, str]]:
    """A request's asked items, ``(item, score, reason)``, best score first and the ones without a
    score (NaN) last; equal scores keep the order they were asked in."""
    return sorted(scored, key=lambda row: (row[1] != row[1], -row[1] if row[1] == row[1] else 0))


def served_index(item_ids: np.ndarray, trained: np.ndarray | None) -> dict[str, int]:
    """Item id -> index of the items a model serves: those training saw rows of (``trained``;
    None: every item). An item of the catalogue without any row keeps whatever it started from,
    so it is served as an unknown one: never recommended, never scored, ignored in a history."""
    return {str(item): i for i, item in enumerate(item_ids) if trained is None or bool(trained[i])}


def served_ids(item_ids: np.ndarray, trained: np.ndarray | None) -> np.ndarray:
    """The ids of the items a model serves (see :func:`served_index`)."""
    return item_ids if trained is None else item_ids[np.asarray(trained, dtype=bool)]


def seen_in_training(previous: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """Which items some client had training rows of, so far: ``previous`` (None: no round yet)
    or'ed with this round's summed ``counts``."""
    now = np.asarray(counts) > 0
    return now if previous is None else np.asarray(previous, dtype=bool) | now


def trained_column(items: pd.DataFrame) -> np.ndarray | None:
    """The ``trained`` column of a saved ``items.parquet``, if it has one."""
    return items["trained"].to_numpy(dtype=bool) if "trained" in items else None


def title_column(items: pd.DataFrame) -> np.ndarray | None:
    """The ``title`` column of a saved ``items.parquet``, if it has one."""
    return items["title"].to_numpy(dtype=object) if "title" in items else None


def as_list(value: object) -> list:
    """A request cell as a list: it may hold a list, a numpy array, or nothing (NaN/None)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return list(value)  # type: ignore[call-overload]


def rows_matrix(rows: list[np.ndarray], n_items: int) -> sparse.csr_matrix:
    """A 0/1 matrix of ``len(rows)`` x ``n_items`` with row ``u`` set at the indices ``rows[u]``."""
    from scipy import sparse  # here: reading which kind a saved model is needs no scipy

    users = np.repeat(np.arange(len(rows)), [r.size for r in rows])
    cols = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return sparse.csr_matrix((np.ones(users.size), (users, cols)), shape=(len(rows), n_items))


@dataclass(frozen=True)
class RequestHistory:
    """One request row's history as a model with a positive threshold reads it."""

    positives: np.ndarray  # sorted indices of the known items it counts as positives
    met: np.ndarray  # sorted indices of every known item in it, positive or not: never recommended
    note: str  # why anything was left out ("ignored 2 unknown item(s): a, b"), or ""


class ServedItems:
    """The items a recommender with ``item_ids``, a ``trained`` mask (None: every item) and
    ``titles`` (None: none) serves, for the three recommenders: :attr:`known_items`, their index,
    each item's name in reasons, and the ``trained`` and ``title`` columns of the saved
    ``items.parquet`` that :func:`trained_column` and :func:`title_column` read back."""

    item_ids: np.ndarray
    trained: np.ndarray | None
    titles: np.ndarray | None

    @property
    def known_items(self) -> np.ndarray:
        """The ids of the items this model serves: those training saw rows of."""
        return served_ids(self.item_ids, self.trained)

    def served_index(self) -> dict[str, int]:
        """Item id -> index of the items the model serves (:attr:`known_items`)."""
        return served_index(self.item_ids, self.trained)

    def request_histories(
        self, requests: pd.DataFrame, positive_threshold: float | None
    ) -> list[RequestHistory]:
        """Each request row's ``history_items`` (and ``history_ratings``, if given) as indices
        of the served items: the positives (rated ``>= positive_threshold``, or every item) and
        every item the user has met, with a note naming the unknown positives left out."""
        from models.data.schema import rated_positives

        index = self.served_index()
        ratings = requests.get("history_ratings")
        out = []
        for u, every in enumerate(requests["history_items"]):
            every = [id_text(i) for i in as_list(every)]
            rated = None if ratings is None else as_list(ratings.iloc[u])
            every, kept = latest_per_item(every, [] if rated is None else rated)
            rated = None if rated is None else kept
            items = rated_positives(every, rated, positive_threshold)
            unknown = [i for i in items if i not in index]
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            out.append(
                RequestHistory(
                    positives=np.array(sorted({index[i] for i in items if i in index}), np.int64),
                    met=np.array(sorted({index[i] for i in every if i in index}), np.int64),
                    note=f"ignored {len(unknown)} unknown item(s): {shown}" if unknown else "",
                )
            )
        return out

    def item_label(self, item: int) -> str:
        """How a reason names the item at index ``item``: its title, else its id."""
        if self.titles is not None and isinstance(self.titles[item], str) and self.titles[item]:
            return str(self.titles[item])
        return str(self.item_ids[item])

    def with_item_columns(self, items: Any) -> Any:
        """``items`` (a table or a dict of its columns) with the ``trained`` and ``title``
        columns, where the model has them."""
        if self.trained is not None:
            items["trained"] = np.asarray(self.trained, dtype=bool)
        if self.titles is not None:
            items["title"] = self.titles
        return items


def recommender_class(kind: str) -> type:
    """The installed class that reads a saved recommender of ``kind``."""
    module, name = RECOMMENDERS[kind]
    return getattr(importlib.import_module(module), name)


def read_recommender(folder: str | Path) -> Recommender:
    """A recommender from its saved state files (npz, Parquet, JSON, LightGBM text), read by the
    installed classes: nothing in the folder is executed or unpickled.

    Raises
    ------
    ValueError
        If the folder holds no fedrec recommender, or one of a kind this version does not know.
    """
    folder = Path(folder)
    if not (folder / STATE).is_file():
        raise ValueError(f"{folder}: not a fedrec recommender (no {STATE})")
    kind = json.loads((folder / STATE).read_text()).get("kind")
    if kind is None:  # states saved before the kind was recorded: MF models
        kind = "mf"
    if kind not in RECOMMENDERS:
        raise ValueError(
            f"{folder}: recommender kind {kind!r} is unknown to this fedrec; "
            f"allowed: {', '.join(RECOMMENDERS)}"
        )
    return recommender_class(kind).load(folder)
