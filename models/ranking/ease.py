"""EASE (Steck, WWW 2019): a closed-form item-item linear model, federated through the same
summed co-occurrences as item-kNN.

EASE learns ``B = argmin ||X - X B||^2 + lambda ||B||^2`` subject to ``diag(B) = 0``, whose
solution needs only the item Gram matrix ``G = X^T X`` of the binary users x items matrix ``X``:

    P = (G + lambda I)^-1,    B = I - P diag(1 / diag(P)),    diag(B) = 0,

and a user's scores are ``X_u B``. ``G`` is exactly what each client already sends for item-kNN
(:func:`models.ranking.knn.pack_cooccurrence`, summed by :func:`models.ranking.knn.sum_cooccurrence`),
so federated EASE is exact: equal to centralized EASE up to floating point, with no new client
statistic and nothing per user on the server.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import sparse

from models.ranking.knn import cooccurrence, sum_cooccurrence

KIND = "ease"


def check_reg(reg: float) -> float:
    """``reg`` as a float if it is a finite number > 0 (EASE's L2 penalty), else one clear error."""
    try:
        value = float(reg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"EASE reg={reg!r} must be a finite number > 0") from err
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"EASE reg={reg!r} must be a finite number > 0")
    return value


def ease_weights(gram: np.ndarray | sparse.spmatrix, *, reg: float) -> np.ndarray:
    """EASE's item-item weights ``B`` from the item Gram matrix ``X^T X``.

    Parameters
    ----------
    gram : (n_items, n_items) array or sparse matrix
        Co-occurrence counts of the binary users x items matrix (diagonal = item counts).
    reg : float
        The L2 penalty lambda, > 0.

    Returns
    -------
    ndarray (n_items, n_items)
        ``B`` with a zero diagonal; ``history @ B`` scores every item. An item nobody interacted
        with has an all-zero row and column.

    Raises
    ------
    ValueError
        If ``gram`` is not square or ``reg`` is not a finite number > 0.
    """
    reg = check_reg(reg)
    g = gram.toarray() if sparse.issparse(gram) else np.array(gram, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"EASE needs a square item Gram matrix, got shape {g.shape}")
    g[np.diag_indices_from(g)] += reg
    precision = np.linalg.inv(g)  # symmetric positive definite: G is PSD and reg > 0
    weights = -precision / np.diag(precision)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights


def federated_ease_weights(
    parts: list[dict[str, np.ndarray]], n_items: int, *, reg: float
) -> np.ndarray:
    """EASE from the clients' packed co-occurrence counts (the item-kNN client update's arrays):
    their sum is the centralized ``X^T X``, so the result is centralized EASE."""
    return ease_weights(sum_cooccurrence(parts, n_items), reg=reg)


def ease_scores(history: sparse.csr_matrix, weights: np.ndarray) -> np.ndarray:
    """``X_u B`` for every row of ``history`` (binarised): (n_users, n_items)."""
    binary = sparse.csr_matrix(history, dtype=np.float64, copy=True)
    binary.sum_duplicates()
    binary.data[:] = 1.0
    return np.asarray(binary @ weights)


class EASE:
    """EASE as an estimator: fit from interactions (centralized) or from summed client
    co-occurrence counts (federated; the same model).

    Parameters
    ----------
    reg : float
        The L2 penalty lambda (> 0); tune it on validation rows (hundreds on MovieLens).

    Attributes
    ----------
    weights_ : ndarray (n_items, n_items)
        ``B``, zero diagonal.
    known_ : ndarray of bool (n_items,)
        Items at least one user interacted with in training; the others are never recommended.
    """

    def __init__(self, reg: float = 500.0) -> None:
        self.reg = reg

    def fit(self, history: sparse.spmatrix) -> EASE:
        """Fit on a users x items interaction matrix (any value counts as an interaction)."""
        return self.fit_cooccurrence(cooccurrence(sparse.csr_matrix(history)))

    def fit_cooccurrence(self, counts: np.ndarray | sparse.spmatrix) -> EASE:
        """Fit on ``X^T X`` (e.g. :func:`models.ranking.knn.sum_cooccurrence` of client updates)."""
        self.weights_ = ease_weights(counts, reg=self.reg)
        diagonal = counts.diagonal() if sparse.issparse(counts) else np.diagonal(counts)
        self.known_ = np.asarray(diagonal) > 0
        return self

    def _check_is_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise RuntimeError("EASE is not fitted yet: call fit() or fit_cooccurrence() first")

    @property
    def n_items(self) -> int:
        self._check_is_fitted()
        return self.weights_.shape[0]

    def score(self, history: sparse.spmatrix) -> np.ndarray:
        """Scores of every item for each row of ``history`` (n_users, n_items)."""
        self._check_is_fitted()
        history = sparse.csr_matrix(history)
        if history.shape[1] != self.n_items:
            raise ValueError(f"history has {history.shape[1]} items, the model {self.n_items}")
        return ease_scores(history, self.weights_)

    def recommend(self, history: sparse.spmatrix, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per row of ``history`` and their scores, best first; never an item of
        the row's history nor an item nobody interacted with in training (rows with fewer
        eligible items are padded with item -1 and score -inf)."""
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        history = sparse.csr_matrix(history)
        scores = self.score(history)
        scores[:, ~self.known_] = -np.inf
        scores[history.nonzero()] = -np.inf
        k = min(k, self.n_items)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        items = np.take_along_axis(top, order, axis=1)
        values = np.take_along_axis(top_scores, order, axis=1)
        return np.where(np.isfinite(values), items, -1), values

    def save(self, path: str | Path) -> None:
        """``.npz`` of arrays only (``np.load(allow_pickle=False)`` reads it back)."""
        self._check_is_fitted()
        arrays = {"kind": np.array(KIND), "reg": np.array(float(self.reg))}
        np.savez(path, weights=self.weights_, known=self.known_, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> EASE:
        with np.load(path, allow_pickle=False) as data:
            if "kind" not in data or str(data["kind"]) != KIND:
                raise ValueError(f"{path}: not an EASE model")
            model = cls(float(data["reg"]))
            model.weights_ = data["weights"]
            model.known_ = data["known"].astype(bool)
        return model
