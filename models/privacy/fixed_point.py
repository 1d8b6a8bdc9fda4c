"""Fixed-point encoding of float vectors as integers modulo 2^64, for sums that cannot wrap.

``x`` is encoded as ``round(x * 2^fraction_bits)`` in two's complement on 64 bits (numpy's uint64
arithmetic wraps exactly modulo 2^64, which is what additive masking needs). The sum of ``n``
encodings decodes to the sum of the rounded values as long as its magnitude stays below 2^63;
:func:`encode` guarantees that for the declared number of clients by refusing any vector with
``n_clients * max|round(x * 2^fraction_bits)| >= 2^63``.
"""

from __future__ import annotations

import numpy as np

FRACTION_BITS = 24  # step 2^-24 ~ 6e-8


class FixedPointOverflowError(ValueError):
    """An update too large for the sum of the declared number of clients to fit in 63 bits."""


def encode(values: np.ndarray, *, n_clients: int, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """A flat uint64 vector of ``round(values * 2^fraction_bits)`` (two's complement).

    Parameters
    ----------
    values : ndarray
        Finite floats, any shape (flattened).
    n_clients : int
        How many encoded vectors may be summed; the bound is checked for that many.
    fraction_bits : int
        Bits after the binary point, in ``[0, 62]``.

    Raises
    ------
    FixedPointOverflowError
        If ``n_clients * max|encoded| >= 2^63`` (the sum could wrap) or a value is not finite.
    ValueError
        If ``n_clients < 1`` or ``fraction_bits`` is out of range.
    """
    if n_clients < 1:
        raise ValueError(f"n_clients == {n_clients}, must be >= 1")
    if not 0 <= fraction_bits <= 62:
        raise ValueError(f"fraction_bits == {fraction_bits}, must be in [0, 62]")
    flat = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(flat)):
        raise FixedPointOverflowError("the update holds NaN or infinite values: cannot encode")
    scaled = np.round(flat * 2.0**fraction_bits)
    largest = float(np.abs(scaled).max()) if flat.size else 0.0
    # exact in integers: floats above 2^53 are integers already
    if n_clients * int(largest) >= 2**63:
        limit = 2.0**63 / n_clients / 2.0**fraction_bits
        # the message names the bound, never the value: it may reach the server, and the
        # largest value of an update it must only see masked is that update's data
        raise FixedPointOverflowError(
            f"a value of the update overflows the sum of {n_clients} clients with "
            f"{fraction_bits} fraction bits (need n_clients * max|x| * 2^fraction_bits < 2^63, "
            f"i.e. max |x| < {limit:.6g}); clip the update or lower fraction_bits"
        )
    return scaled.astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, *, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Floats from a uint64 (sum of) encoding(s)."""
    signed = np.asarray(total, dtype=np.uint64).view(np.int64)
    return signed.astype(np.float64) / 2.0**fraction_bits
