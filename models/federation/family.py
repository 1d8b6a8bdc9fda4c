"""The seam between the round loop and a model family.

A family says what its training is made of (:class:`Phase`), what a client computes in a round,
how the server folds the answers into the next global state, how a client evaluates a state,
and what the servable model is. The round loop (:mod:`models.federation.loop` in one process,
``flows/rounds.py`` as Prefect tasks) knows nothing else about the model, so a new model is one
implementation of :class:`Family`, not a new loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from models.client import ClientData
from models.federation.evaluation import Evaluation
from models.protocol import ClientUpdate


@dataclass(frozen=True)
class Phase:
    """One stretch of a family's training that runs the same client computation.

    Attributes
    ----------
    name : str
        Passed back to the family's client and server functions.
    rounds : int
    everyone : bool
        Every client answers once, unsampled and unevaluated (e.g. the global mean, item
        co-occurrences); such rounds are not steps: their result is part of the next step's model.
    per_device : bool
        With per-user cohorts, each device flips its own sampling coin (else cohorts are sampled
        like clients).
    """

    name: str
    rounds: int
    everyone: bool = False
    per_device: bool = True


def item_labels(item_ids: np.ndarray | None, n_items: int) -> np.ndarray:
    """The caller's id of each item index, as text (requests carry ids as text); the indices
    themselves when a family was given no catalogue."""
    return np.asarray(np.arange(n_items) if item_ids is None else item_ids).astype(str)


def optional_arrays(**arrays: np.ndarray | None) -> dict[str, np.ndarray]:
    """The named parts of a family's state that it holds: a part that is None (no popularity
    fallback, no mask of trained items) is left out of the checkpoint."""
    return {name: value for name, value in arrays.items() if value is not None}


def trained_mask(arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """A checkpoint's mask of the items that had training rows, as booleans; None when it has
    none."""
    trained = arrays.get("trained", None)
    return None if trained is None else np.asarray(trained, dtype=bool)


@runtime_checkable
class Recommender(Protocol):
    """What serving needs of any family's model (no user data inside)."""

    item_ids: np.ndarray

    @property
    def known_items(self) -> np.ndarray:
        """The ids of the items it serves: those training saw rows of (a subset of
        ``item_ids``); the others are unknown to it, as ids outside the catalogue are."""
        ...

    def recommend(self, requests: pd.DataFrame, k: int = 10) -> pd.DataFrame: ...

    def save(self, folder: Any) -> None: ...


@runtime_checkable
class Family(Protocol):
    """A model family, as the round loop sees it. ``State`` is the family's global state: an
    immutable value with a ``round`` counter."""

    name: str
    top_k: int
    eval_splits: tuple[str, ...]  # what clients evaluate every step
    private: bool  # under DP: the clients' streams come from OS entropy, not the seed

    def phases(self, rounds: int) -> list[Phase]:
        """The training's phases for ``rounds`` sampled rounds."""
        ...

    def initial_state(self, n_items: int, seed: int) -> Any:
        """The global state before any round (drawn from ``seed``)."""
        ...

    def client_round(
        self,
        client: ClientData,
        state: Any,
        phase: str,
        rng: np.random.Generator,
        eval_splits: Sequence[str],
    ) -> tuple[ClientUpdate, dict[str, Evaluation]]:
        """On a client: evaluate ``state`` on ``eval_splits``, then compute this round's update."""
        ...

    def evaluate(
        self, client: ClientData, state: Any, splits: Sequence[str]
    ) -> dict[str, Evaluation]:
        """On a client: metric sums of ``state``'s model over the client's rows of each split."""
        ...

    def server_update(self, state: Any, updates: Sequence[ClientUpdate], phase: str) -> Any:
        """On the server: the next global state from the round's updates (possibly none)."""
        ...

    def servable(self, state: Any) -> Recommender:
        """The model to register and serve."""
        ...

    def warm_start(self, state: Any, champion: Recommender) -> tuple[Any, int] | None:
        """``state`` with the champion's parameters carried over, and how many items; None when
        the champion cannot seed this family's state (another family or shape)."""
        ...

    def for_champion(self, champion: Recommender) -> tuple[Family, Any] | str:
        """A family and state that evaluate the champion the way this run's model is evaluated,
        or the reason it cannot be compared."""
        ...

    def state_arrays(self, state: Any) -> dict[str, np.ndarray]:
        """The state as named arrays (for checkpoints; nothing to unpickle)."""
        ...

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> Any:
        """The inverse of :meth:`state_arrays`."""
        ...

    def describe(self, state: Any) -> pd.Series | None:
        """Feature importance or similar for the run's artifacts; None if the family has none."""
        ...


@runtime_checkable
class SecureFamily(Family, Protocol):
    """A family whose updates can be summed under secure aggregation: each becomes one dense
    vector over the whole catalogue, so the server learns neither values nor touched items."""

    def to_dense(self, update: ClientUpdate, n_items: int) -> np.ndarray: ...

    def from_dense_sum(self, total: np.ndarray, n_items: int) -> ClientUpdate: ...


def min_secure_threshold(family: Family) -> int:
    """The fewest clients a secure sum of ``family``'s updates may hold: 2 (a sum of one client is
    its update), and under DP the clients whose noise shares add up to the full noise (each
    client adds ``1 / sqrt(shares)`` of it), so a sum over fewer would carry less noise than the
    accountant counted. A client refuses to mask its update for a round of a lower threshold."""
    dp = getattr(getattr(family, "config", None), "dp", None)
    shares = dp.shares if family.private and dp is not None else 1
    return max(2, int(shares))


def secure_phase(family: Family, phase: Phase) -> bool:
    """Whether secure aggregation covers ``phase`` of ``family``: every sampled round, and the
    phases every client answers once that the family encodes too (its
    ``secure_everyone_phases``, e.g. the explicit family's global mean); the others go in the
    clear."""
    return not phase.everyone or phase.name in getattr(family, "secure_everyone_phases", ())
