"""The servable neural recommender: the network, the item catalogue and popularity; no user data.

A user is served from the history in the request: the history goes through the network (no
dropout, ``z = mu``), every item gets its softmax probability, seen items are masked and the top
``k`` are returned with a reason. The reason names the history item whose removal lowers the
recommended item's probability most (occlusion: one extra forward pass per history item), so it
says which part of the history the recommendation rests on. Saved as ``.npz`` + Parquet + JSON:
nothing is unpickled on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy import sparse

from models.mf.recommend import top_k
from models.neural.network import (
    Architecture,
    Params,
    load_network,
    log_softmax,
    logits,
    save_network,
)
from models.recommenders import (
    NO_HISTORY,
    UNKNOWN_ITEM,
    ServedItems,
    asked_items,
    best_first,
    check_requests,
    rows_matrix,
    title_column,
    trained_column,
)

KIND = "neural"
USER_ID = "user_id"
ITEMS = "items"
RESPONSE_COLUMNS = ("user_id", "rank", "item_id", "score", "reason")
# Occlusion for the reasons costs one forward pass per history item; past this many items only
# the first ones (by item index) are candidates for the reason.
MAX_EXPLAINED_HISTORY = 500


@dataclass(frozen=True)
class NeuralRecommender(ServedItems):
    """A trained Mult-DAE/Mult-VAE with the caller's item ids.

    Attributes
    ----------
    params : dict of str -> ndarray
    arch : Architecture
    item_ids : ndarray of str
        The caller's id of each item index, as text.
    popularity : ndarray of float
        Training interactions per item: the cold-start ranking.
    titles : ndarray of str or None
        For reasons ("because you liked <title>"); ids are used without them.
    positive_threshold : float or None
        A request's history rows rated below it are left out, as training left them out; None
        (or a history without ratings): every row is a positive.
    trained : ndarray of bool or None
        Whether training saw rows of each item. An item without any keeps the input weights it
        started from (its input was never on), so it is served as an unknown one: never
        recommended nor scored, ignored in a history. None: every item counts as trained.
    """

    kind: ClassVar[str] = KIND
    # request columns beyond user_id and history_items (lists of ids and of numbers)
    request_columns: ClassVar[tuple[str, ...]] = ("items", "history_ratings")
    requirements: ClassVar[tuple[str, ...]] = ("numpy", "pandas", "scipy", "pyarrow")

    params: Params
    arch: Architecture
    item_ids: np.ndarray
    popularity: np.ndarray
    titles: np.ndarray | None = None
    positive_threshold: float | None = None
    trained: np.ndarray | None = None

    @property
    def n_items(self) -> int:
        return self.arch.n_items

    # --- scoring ---------------------------------------------------------------------------
    def score(self, history: sparse.spmatrix) -> np.ndarray:
        """Softmax probability of every item for each row of ``history`` (n_users, n_items).

        Rows with no interaction get the network's answer to an empty input (the same for all).
        """
        history = sparse.csr_matrix(history)
        if history.shape[1] != self.n_items:
            raise ValueError(f"history has {history.shape[1]} items, the model {self.n_items}")
        out = np.empty(history.shape, dtype=np.float64)
        for lo in range(0, history.shape[0], 1000):  # bounded memory for many users
            block = logits(self.params, self.arch, history[lo : lo + 1000]).astype(np.float64)
            out[lo : lo + 1000] = np.exp(log_softmax(block))
        return out

    # --- serving ---------------------------------------------------------------------------
    def recommend(self, requests: pd.DataFrame, k: int = 10) -> pd.DataFrame:
        """Top-``k`` unseen items per request row (``user_id``, ``history_items``), best first,
        with the probability as score and a reason.

        A row with an ``items`` list gets those items scored instead (best first, ``k`` does not
        apply; unknown ones left out with a note). A history with no known item gets the most popular items
        (score NaN: a training count is no probability), with that reason.
        """
        check_requests(requests, k)
        index = self.served_index()
        read = self.request_histories(requests, self.positive_threshold)
        histories, met = [h.positives for h in read], [h.met for h in read]
        notes = [h.note for h in read]
        matrix = rows_matrix(histories, self.n_items)
        scores = self.score(matrix)
        out: list[tuple[str, int, str, float, str]] = []
        for u, user in enumerate(requests[USER_ID].astype(str)):
            seen = histories[u]
            asked = asked_items(requests, u)
            if asked is not None:
                known = [str(i) for i in asked if str(i) in index]
                missing = [str(i) for i in asked if str(i) not in index]
                reason = "; ".join(
                    filter(
                        None,
                        [
                            notes[u],
                            f"{NO_HISTORY}: the network's answer to an empty history"
                            if seen.size == 0
                            else "",
                        ],
                    )
                )
                reason = reason or "asked: scored by the network"
                in_history = set(met[u].tolist())  # positive or not: the user has met it
                scored = [
                    (item, float("nan"), "in the history: not scored")
                    if index[item] in in_history
                    else (item, float(scores[u, index[item]]), reason)
                    for item in known
                ] + [(item, float("nan"), UNKNOWN_ITEM) for item in missing]
                for rank, (item, score, why) in enumerate(best_first(scored), start=1):
                    out.append((user, rank, item, score, why))
                continue
            exclude = np.zeros(self.n_items, dtype=bool)
            if self.trained is not None:
                exclude |= ~self.trained
            exclude[met[u]] = True
            if seen.size == 0:
                best, _ = top_k(self.popularity, exclude, k)
                best_scores = np.full(best.size, np.nan)  # a popularity count is no probability
                reasons = [f"{NO_HISTORY}: most popular items"] * best.size
            else:
                best, best_scores = top_k(scores[u], exclude, k)
                reasons = self._reasons(seen, best)
            for rank, (i, s, why) in enumerate(
                zip(best, best_scores, reasons, strict=True), start=1
            ):
                reason = "; ".join(filter(None, [why, notes[u]]))
                out.append((user, rank, str(self.item_ids[i]), float(s), reason))
        return pd.DataFrame(out, columns=list(RESPONSE_COLUMNS))

    def _reasons(self, seen: np.ndarray, recommended: np.ndarray) -> list[str]:
        """For each recommended item, the history item without which its log-probability drops
        most ("because you liked X"); a one-item history is the reason by itself."""
        if recommended.size == 0:
            return []
        explained = seen[:MAX_EXPLAINED_HISTORY]
        full = sparse.csr_matrix(
            (np.ones(seen.size), (np.zeros(seen.size, np.int64), seen)), shape=(1, self.n_items)
        )
        n = explained.size
        # Row j: the history without its item j (leave-one-out), then the full history last.
        rows = np.repeat(np.arange(n), seen.size)
        cols = np.tile(seen, n)
        keep = cols != np.repeat(explained, seen.size)
        occluded = sparse.csr_matrix(
            (np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(n, self.n_items)
        )
        both = sparse.vstack([occluded, full]).tocsr()
        log_probs = np.log(np.maximum(self.score(both)[:, recommended], 1e-300))
        drop = log_probs[-1] - log_probs[:-1]  # (n, len(recommended)): larger = more needed
        anchors = explained[np.argmax(drop, axis=0)]
        return [f"because you liked {self.item_label(int(a))}" for a in anchors]

    # --- persistence -----------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_network(folder / "network.npz", self.params, self.arch)
        items = pd.DataFrame({"item_id": self.item_ids.astype(str), "popularity": self.popularity})
        items = self.with_item_columns(items)
        items.to_parquet(folder / "items.parquet", index=False)
        meta = {"kind": KIND, "format": 1, "positive_threshold": self.positive_threshold}
        (folder / "recommender.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: str | Path) -> NeuralRecommender:
        folder = Path(folder)
        meta = json.loads((folder / "recommender.json").read_text())
        if meta.get("kind") != KIND:
            raise ValueError(f"{folder}: not a neural recommender (kind={meta.get('kind')!r})")
        params, arch = load_network(folder / "network.npz")
        items = pd.read_parquet(folder / "items.parquet")
        if len(items) != arch.n_items:
            raise ValueError(
                f"{folder}: items.parquet lists {len(items)} items, the network {arch.n_items}"
            )
        return cls(
            params,
            arch,
            items["item_id"].to_numpy(dtype=str),
            items["popularity"].to_numpy(dtype=np.float64),
            title_column(items),
            None if meta.get("positive_threshold") is None else float(meta["positive_threshold"]),
            trained_column(items),
        )
