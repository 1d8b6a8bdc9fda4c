"""Shamir secret sharing of short byte strings (32-byte seeds, X25519 private keys).

A secret ``s`` (at most 64 bytes, read as a big-endian integer) is the constant term of a random
polynomial ``f`` of degree ``threshold - 1`` over the prime field GF(p), p = 2^521 - 1 (a Mersenne
prime, so every 64-byte secret is a field element). The share of the holder with x-coordinate
``x`` is ``f(x)``. Any ``threshold`` shares determine ``f`` and so ``f(0) = s`` by Lagrange
interpolation; fewer are consistent with every possible secret (for any candidate ``s'`` there is
exactly one polynomial of the same degree through them and ``(0, s')``), so they carry no
information about ``s``. The coefficients come from :mod:`secrets` (OS entropy).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66: a field element, big-endian
MAX_SECRET_BYTES = 64


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Share ``secret`` among the holders ``xs`` so that any ``threshold`` of them recover it.

    Parameters
    ----------
    secret : bytes
        At most 64 bytes.
    xs : sequence of int
        Distinct x-coordinates in ``[1, p)``, one per holder (0 would be the secret itself).
    threshold : int
        Shares needed to reconstruct, ``1 <= threshold <= len(xs)``.

    Returns
    -------
    dict of int to bytes
        ``x -> f(x)`` as ``SHARE_BYTES`` big-endian bytes.

    Raises
    ------
    ValueError
        If the secret is too long, an x is out of range or repeated, or the threshold does not fit.
    """
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"secret of {len(secret)} bytes, at most {MAX_SECRET_BYTES} can be shared")
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise ValueError(
            f"threshold == {threshold}, must be in [1, {len(xs)}] for {len(xs)} holders"
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def combine(shares: Mapping[int, bytes], threshold: int, length: int) -> bytes:
    """The secret from ``threshold`` shares (the first ``threshold`` x-coordinates in order).

    Parameters
    ----------
    shares : mapping of int to bytes
        ``x -> f(x)`` as returned by :func:`split`; at least ``threshold`` of them.
    threshold : int
        The threshold the secret was shared with.
    length : int
        Length in bytes of the original secret.

    Returns
    -------
    bytes
        ``f(0)`` as ``length`` big-endian bytes. With shares of another polynomial, or fewer points
        than its degree needs, this is a wrong secret and nothing says so: callers check the result
        where they can (e.g. against a published public key).

    Raises
    ------
    ValueError
        If fewer than ``threshold`` shares are given, a share is malformed, or the interpolated
        value does not fit in ``length`` bytes (a sure sign of wrong shares).
    """
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares given, {threshold} are needed to reconstruct")
    points = sorted(shares.items())[:threshold]
    _check_xs([x for x, _ in points])
    ys = []
    for x, y in points:
        if len(y) != SHARE_BYTES:
            raise ValueError(f"share for x={x} has {len(y)} bytes, expected {SHARE_BYTES}")
        ys.append(int.from_bytes(y, "big") % PRIME)
    xs = [x for x, _ in points]
    value = 0
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        value = (value + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if value >= 1 << (8 * length):
        raise ValueError(f"reconstructed value does not fit in {length} bytes: inconsistent shares")
    return value.to_bytes(length, "big")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):  # Horner
        value = (value * x + c) % PRIME
    return value


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError(f"share x-coordinates must be distinct, got {sorted(xs)}")
    bad = [x for x in xs if not 0 < x < PRIME]
    if bad:
        raise ValueError(f"share x-coordinate {bad[0]} out of range, must be in [1, 2^521 - 1)")
