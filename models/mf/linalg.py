"""Batched linear algebra for ALS: per-segment Gram matrices and ridge solves, without Python loops
over users or items (only over a few dozen length buckets)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np

# Upper bound on padded rows materialised at once when building Gram matrices (~8 MB at d=65: small enough for the allocator to recycle, so no fresh page faults).
_CHUNK_ROWS = 1 << 14


@cache
def _pool() -> ThreadPoolExecutor:
    # numpy's stacked matmul runs each small product on one core; chunks in threads use the rest
    # (measured 1.7x on 2 cores). Created on first use, never at import.
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="fedrec-gram")


def _bucket_width(lengths: np.ndarray) -> np.ndarray:
    """Round lengths up to a grid with four steps per octave, so padding wastes at most ~25%."""
    octave = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    step = np.left_shift(1, np.maximum(octave - 2, 0))
    return -(-lengths // step) * step


@dataclass(frozen=True)
class SegmentLayout:
    """Rows grouped by a key (a user, or an item), laid out for stacked BLAS calls.

    Build it once per set of rows (a client's training rows, say); each ALS half-step then costs one
    gather and one stacked ``matmul`` per length bucket.

    Attributes
    ----------
    keys : ndarray of shape (s,)
        Distinct keys, sorted.
    counts : ndarray of shape (s,)
        Rows per key.
    buckets : list of (positions, table_index, row_index)
        ``positions`` index into ``keys``; ``table_index[b, j]`` is the row of the other side's table
        for the ``j``-th row of segment ``positions[b]`` (or the zero padding row);
        ``row_index`` is the same in terms of input rows (or the padding sentinel ``n_rows``).
    n_table : int
        Size of the other side's table; index ``n_table`` is the padding row.
    """

    keys: np.ndarray
    counts: np.ndarray
    buckets: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    n_table: int

    @classmethod
    def build(cls, keys: np.ndarray, others: np.ndarray, n_table: int) -> SegmentLayout:
        """Group rows by ``keys``; ``others`` are the rows' indices into the other side's table."""
        n_rows = keys.size
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        if n_rows == 0:
            return cls(keys[:0], np.zeros(0, np.int64), [], n_table)
        boundary = np.flatnonzero(np.diff(sorted_keys)) + 1
        starts = np.concatenate(([0], boundary)).astype(np.int64)
        counts = np.diff(np.append(starts, n_rows))
        widths = _bucket_width(counts)
        others_ext = np.append(others, n_table)
        buckets = []
        for width in np.unique(widths):
            positions = np.flatnonzero(widths == width)
            offsets = np.arange(width)
            inside = offsets[None, :] < counts[positions, None]
            sorted_pos = np.minimum(starts[positions, None] + offsets[None, :], n_rows - 1)
            row_index = np.where(inside, order[sorted_pos], n_rows)
            buckets.append((positions, others_ext[row_index], row_index))
        return cls(sorted_keys[starts], counts, buckets, n_table)

    def _for_each_chunk(
        self,
        table: np.ndarray,
        target: np.ndarray,
        consume: Callable[[np.ndarray, np.ndarray, np.ndarray], None],
        gram_weights: np.ndarray | None = None,
    ) -> None:
        """Call ``consume(positions, grams, rhs)`` for chunks of segments, in threads when large.

        ``grams`` are ``sum w x x^T`` (``w = 1`` without ``gram_weights``) and ``rhs`` is
        ``sum t x``. Chunks are sized so that one chunk's padded rows and Gram matrices stay near
        ``_CHUNK_ROWS * d`` floats: memory stays bounded however many segments there are.
        """
        d = table.shape[1]
        table_ext = np.vstack([table, np.zeros((1, d))])
        target_ext = np.append(target, 0.0)
        root_w = None if gram_weights is None else np.append(np.sqrt(gram_weights), 0.0)

        def run(chunk: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
            positions, table_index, row_index = chunk
            block = table_ext[table_index]  # (segments, width, d)
            rhs = np.matmul(target_ext[row_index][:, None, :], block)[:, 0, :]
            if root_w is not None:
                block = block * root_w[row_index][..., None]
            grams = np.matmul(block.transpose(0, 2, 1), block)
            consume(positions, grams, rhs)

        chunks = []
        for positions, table_index, row_index in self.buckets:
            per_chunk = max(1, _CHUNK_ROWS // (table_index.shape[1] + d))
            for lo in range(0, positions.size, per_chunk):
                part = slice(lo, lo + per_chunk)
                chunks.append((positions[part], table_index[part], row_index[part]))
        if len(chunks) > 1 and sum(c[1].size for c in chunks) * d > 1 << 20:
            list(_pool().map(run, chunks))  # chunks write disjoint rows of the outputs
        else:
            for chunk in chunks:
                run(chunk)

    def solve(
        self,
        table: np.ndarray,
        target: np.ndarray,
        ridge: np.ndarray,
        *,
        gram_weights: np.ndarray | None = None,
        base: np.ndarray | None = None,
    ) -> np.ndarray:
        """Per key, the ridge regression of ``target`` on ``x = table[other]`` over its rows.

        Parameters
        ----------
        table : ndarray of shape (n_table, d)
        target : ndarray of shape (n_rows,)
        ridge : ndarray of shape (s,)
            Positive ridge of each key, on every coordinate.
        gram_weights : ndarray of shape (n_rows,), optional
            Row weights of the Gram matrix (implicit ALS's ``c - 1``).
        base : ndarray of shape (d, d), optional
            Added to every key's Gram matrix (implicit ALS's ``Y^T Y``).

        Returns
        -------
        ndarray of shape (s, d)
            ``(base + sum w x x^T + ridge I)^-1 sum t x``; the Gram matrices are never held all
            at once.
        """
        solution = np.empty((self.keys.size, table.shape[1]))

        def consume(positions: np.ndarray, grams: np.ndarray, rhs: np.ndarray) -> None:
            if base is not None:
                grams += base
            solution[positions] = ridge_solve(
                grams, rhs, np.repeat(ridge[positions, None], grams.shape[1], 1), overwrite=True
            )

        self._for_each_chunk(table, target, consume, gram_weights)
        return solution

    def packed_statistics(
        self, table: np.ndarray, target: np.ndarray, *, gram_weights: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per key: ``sum w x x^T`` as a packed upper triangle, and ``sum t x``.

        Returns
        -------
        packed : ndarray of shape (s, d(d+1)/2)
            See :func:`pack_symmetric`.
        rhs : ndarray of shape (s, d)
        """
        d = table.shape[1]
        packed = np.empty((self.keys.size, d * (d + 1) // 2))
        rhs_out = np.empty((self.keys.size, d))

        def consume(positions: np.ndarray, grams: np.ndarray, rhs: np.ndarray) -> None:
            packed[positions] = pack_symmetric(grams)
            rhs_out[positions] = rhs

        self._for_each_chunk(table, target, consume, gram_weights)
        return packed, rhs_out


def ridge_solve(
    grams: np.ndarray, rhs: np.ndarray, ridge: np.ndarray, *, overwrite: bool = False
) -> np.ndarray:
    """Solve ``(G_s + diag(ridge_s)) w_s = rhs_s`` for every segment ``s`` at once.

    ``ridge`` has shape (s, d); every entry must be positive, so each system is positive definite.
    With ``overwrite`` the ridge is added into ``grams`` in place (saves a copy of a large array).
    """
    if grams.shape[0] == 0:
        return np.zeros_like(rhs)
    system = grams if overwrite else grams.copy()
    diag = np.arange(grams.shape[1])
    system[:, diag, diag] += ridge
    return np.linalg.solve(system, rhs[..., None])[..., 0]


@cache
def _triangle_indices(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of the upper triangle in a d*d matrix, and for every cell its packed index."""
    iu, ju = np.triu_indices(d)
    packed_of_cell = np.empty((d, d), dtype=np.intp)
    packed_of_cell[iu, ju] = np.arange(iu.size)
    packed_of_cell[ju, iu] = np.arange(iu.size)
    return iu * d + ju, packed_of_cell.ravel()


def pack_symmetric(mats: np.ndarray) -> np.ndarray:
    """Upper triangles of symmetric (s, d, d) matrices as (s, d(d+1)/2): halves what crosses the wire."""
    s, d = mats.shape[0], mats.shape[-1]
    upper, _ = _triangle_indices(d)
    return np.take(
        mats.reshape(s, d * d), upper, axis=1
    )  # take on one axis: ~5x faster than [:, i, j]


def unpack_symmetric(packed: np.ndarray, d: int) -> np.ndarray:
    """Inverse of :func:`pack_symmetric`."""
    _, cells = _triangle_indices(d)
    return np.take(packed, cells, axis=1).reshape(packed.shape[0], d, d)
