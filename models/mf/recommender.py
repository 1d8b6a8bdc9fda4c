"""The servable MF recommender: global item parameters plus the item catalogue, no user data.

It answers for a user given only that user's history (folded in on the fly), so the registered
model holds nothing personal. Saved as ``.npz`` + JSON + Parquet: nothing is unpickled on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from models.mf.params import ItemParams
from models.mf.recommend import fold_in, score_all, top_k
from models.recommenders import (
    NO_HISTORY,
    UNKNOWN_ITEM,
    RequestError,
    ServedItems,
    as_list,
    asked_items,
    best_first,
    check_requests,
    id_text,
    latest_per_item,
    title_column,
    trained_column,
)

# Request columns (one row per user) and response columns.
USER_ID = "user_id"
HISTORY_ITEMS = "history_items"
HISTORY_RATINGS = "history_ratings"
ITEMS = "items"
RESPONSE_COLUMNS = ("user_id", "rank", "item_id", "score", "reason")


@dataclass(frozen=True)
class MFRecommender(ServedItems):
    """Everything needed to serve: item parameters, the caller's item ids, popularity, ``reg``.

    Attributes
    ----------
    params : ItemParams
    item_ids : ndarray of str
        The caller's id of each item index, as text (requests carry ids as text).
    popularity : ndarray of float
        Training interactions per item (summed client counts): the cold-start ranking.
    reg : float
        The ridge used to fold users in (the one the model was trained with).
    rating_scale : tuple of float or None
        Predicted scores are clipped to it.
    trained : ndarray of bool or None
        Whether training saw rows of each item (an item of the catalogue without any keeps the
        parameters it started from): an item without is served as an unknown one, never
        recommended nor scored. None: every item counts as trained (a private model cannot
        tell without saying which items had rows).
    titles : ndarray of str or None
        The catalogue's title of each item index, which reasons name the item by (else its id).
    """

    kind: ClassVar[str] = "mf"
    # request columns beyond user_id and history_items (lists of numbers and of ids)
    request_columns: ClassVar[tuple[str, ...]] = ("history_ratings", "items")
    requirements: ClassVar[tuple[str, ...]] = ("numpy", "pandas", "scipy", "pyarrow")

    params: ItemParams
    item_ids: np.ndarray
    popularity: np.ndarray
    reg: float
    rating_scale: tuple[float, float] | None = None
    trained: np.ndarray | None = None
    titles: np.ndarray | None = None

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.params.save(folder / "item_params.npz")
        items = {"item_id": self.item_ids.astype(str), "popularity": self.popularity}
        items = self.with_item_columns(items)
        pd.DataFrame(items).to_parquet(folder / "items.parquet", index=False)
        (folder / "recommender.json").write_text(
            json.dumps(
                {"kind": self.kind, "reg": self.reg, "rating_scale": self.rating_scale, "format": 1}
            )
        )

    @classmethod
    def load(cls, folder: str | Path) -> MFRecommender:
        folder = Path(folder)
        meta = json.loads((folder / "recommender.json").read_text())
        items = pd.read_parquet(folder / "items.parquet")
        scale = meta["rating_scale"]
        return cls(
            ItemParams.load(folder / "item_params.npz"),
            items["item_id"].to_numpy(dtype=str),
            items["popularity"].to_numpy(dtype=np.float64),
            float(meta["reg"]),
            None if scale is None else (float(scale[0]), float(scale[1])),
            trained_column(items),
            title_column(items),
        )

    def _histories(
        self, requests: pd.DataFrame
    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
        """Known (item index, rating) histories per request row, and why anything was dropped."""
        index = self.served_index()
        histories, reasons = [], []
        has_ratings = HISTORY_RATINGS in requests
        for u, (_, row) in enumerate(requests.iterrows()):
            items = [id_text(i) for i in as_list(row[HISTORY_ITEMS])]
            ratings = as_list(row[HISTORY_RATINGS]) if has_ratings else []
            if self.rating_scale is not None:  # predictions come from the user's own ratings
                self._check_ratings(
                    f"request row {u} (user {str(row[USER_ID])!r})", len(items), ratings
                )
            items, ratings = latest_per_item(items, ratings)
            if self.rating_scale is None and len(ratings) != len(items):
                ratings = [1.0] * len(items)  # a model without a scale: interactions count 1
            known = [
                (index[i], float(r)) for i, r in zip(items, ratings, strict=True) if i in index
            ]
            unknown = [i for i in items if i not in index]
            reason = []
            if unknown:
                shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                reason.append(f"ignored {len(unknown)} unknown item(s): {shown}")
            if not known:
                reason.append(f"{NO_HISTORY}: most popular items")
            histories.append(
                (np.array([k for k, _ in known], dtype=np.int64), np.array([r for _, r in known]))
            )
            reasons.append("; ".join(reason))
        return histories, reasons

    def _check_ratings(self, where: str, n_items: int, ratings: Any) -> None:
        """Raise :class:`RequestError` unless ``ratings`` holds one rating on the scale per history
        item: a missing rating read as any number would be a prediction from made-up data."""
        assert self.rating_scale is not None
        low, high = self.rating_scale
        allowed = f"allowed: one rating in [{low:g}, {high:g}] per history item"
        if len(ratings) != n_items:
            raise RequestError(
                f"{where}: {n_items} history item(s) but {len(ratings)} rating(s) in "
                f"{HISTORY_RATINGS}: this model predicts ratings from the user's own; {allowed}"
            )
        for rating in ratings:
            try:
                value = float(rating)
            except (TypeError, ValueError):
                value = float("nan")
            if isinstance(rating, bool | str) or not low <= value <= high:  # NaN fails too
                raise RequestError(f"{where}: rating {rating!r} in {HISTORY_RATINGS}; {allowed}")

    def recommend(self, requests: pd.DataFrame, k: int = 10) -> pd.DataFrame:
        """Top-``k`` unseen items per request row, best first, with scores and a reason.

        With a rating scale the score is the predicted rating clipped to the scale; a user with no
        known item gets the most popular items with score NaN (a popularity count is no rating)
        and that reason. Every row's reason says where its score comes from: the history it was
        predicted from and the liked history item closest to it in the item factors.

        Rows with an ``items`` list get those items scored instead (best first, ``rank``
        counting from 1; ``k`` does not apply), an unknown one without a score, last.
        """
        check_requests(requests, k)
        histories, reasons = self._histories(requests)
        users = fold_in(histories, self.params, reg=self.reg)
        scores = score_all(users, self.params)
        # Rank on raw scores (clipping would tie every item above the scale's top); report
        # clipped predictions.
        clipped = np.clip(scores, *self.rating_scale) if self.rating_scale is not None else scores
        index = self.served_index()
        out: list[tuple[str, int, str, float, str]] = []
        for u, (_, row) in enumerate(requests.iterrows()):
            user = str(row[USER_ID])
            seen, ratings = histories[u]
            candidates = asked_items(requests, u)
            if candidates is not None:
                known = [str(i) for i in candidates if str(i) in index]
                missing = [str(i) for i in candidates if str(i) not in index]
                note = reasons[u].replace(
                    f"{NO_HISTORY}: most popular items",
                    f"{NO_HISTORY}: scored by global mean and item bias",
                )
                scored = [(item, float("nan"), UNKNOWN_ITEM) for item in missing]
                for item in known:
                    score = float(clipped[u, index[item]])
                    why = self._why(index[item], score, seen, ratings)
                    scored.append((item, score, "; ".join(filter(None, [why, note]))))
                for rank, (item, score, why) in enumerate(best_first(scored), start=1):
                    out.append((user, rank, item, score, why))
                continue
            exclude = np.zeros(self.params.n_items, dtype=bool)
            exclude[seen] = True
            if self.trained is not None:
                exclude |= ~self.trained
            if seen.size == 0:  # cold start: most popular, no predicted rating, with the reason
                best, _ = top_k(self.popularity, exclude, k)
                for rank, i in enumerate(best, start=1):
                    out.append((user, rank, str(self.item_ids[i]), float("nan"), reasons[u]))
                continue
            best, _ = top_k(scores[u], exclude, k)
            for rank, i in enumerate(best, start=1):
                score = float(clipped[u, i])
                why = self._why(int(i), score, seen, ratings)
                out.append(
                    (
                        user,
                        rank,
                        str(self.item_ids[i]),
                        score,
                        "; ".join(filter(None, [why, reasons[u]])),
                    )
                )
        return pd.DataFrame(out, columns=list(RESPONSE_COLUMNS))

    def _why(self, item: int, score: float, seen: np.ndarray, ratings: np.ndarray) -> str:
        """Where one score comes from: the history size, and the liked history item (rated at
        least the user's mean) whose factors point most nearly the same way as ``item``'s."""
        if seen.size == 0:
            return ""
        n = seen.size
        if self.rating_scale is not None:
            head = f"predicted rating {score:.1f} from your ratings of {n} item{'s' * (n != 1)}"
        else:
            head = f"score {score:.2f} from your {n} item{'s' * (n != 1)}"
        liked = seen[ratings >= ratings.mean()]
        factors = self.params.factors
        norms = np.linalg.norm(factors[liked], axis=1) * np.linalg.norm(factors[item])
        if not np.any(norms > 0):
            return head
        cosine = np.where(
            norms > 0, factors[liked] @ factors[item] / np.where(norms > 0, norms, 1), -np.inf
        )
        near = int(np.argmax(cosine))
        rated = ratings[seen == liked[near]][0]
        shown = f" you rated {rated:g}" if self.rating_scale is not None else " in your history"
        return f"{head}; closest to {self.item_label(int(liked[near]))}{shown}"
