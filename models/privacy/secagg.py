"""WEAK REFERENCE, NOT USED FOR TRAINING: pairwise-only additive masking, the secure aggregation
fedrec ran before :mod:`models.privacy.secagg_plus`. It is kept only as the baseline that the
attack tests (tests/unit/test_secagg_plus.py) break and the cost benchmark (benchmarks/secagg.py)
compares against; a test (tests/unit/test_secagg.py) keeps it out of models/, tasks/, flows/ and
fedrec/.

Per round, each client makes an X25519 key pair and publishes the public key. Every pair of
clients (i, j) derives the same secret seed from its own private key and the other's public key
(X25519, then HKDF-SHA256 bound to the round), and expands it with ChaCha20 into a mask over the
whole update vector. Updates are fixed-point encoded as integers modulo 2^64; client i adds the
mask it shares with every j > i and subtracts the one it shares with every j < i, so the masks
cancel in the sum over all clients.

Why it is weak (each is an attack test that succeeds here and fails on the new protocol):

- Dropouts: a client that vanishes after the keys leaves its masks in the others' vectors; the
  round runs again among the survivors, who mask the same updates anew (:func:`survivors_round`).
  If the dropped client's first vector ever reaches the server (a late answer, or a server that
  claims a dropout), the difference of the two sums is that client's update.
- Public keys are relayed unauthenticated: a server that substitutes its own keys unmasks a client.
- A lone client's "masked" vector is its plaintext (no threshold).
- The overflow check is per value (|x| < 2^62), not per sum of n clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRACTION_BITS = 24  # fixed-point step 2^-24 ~ 6e-8
_LIMIT = 2.0**62  # |encoded| stays below this, so sums of up to 2 clients x 2^62 cannot wrap


def encode(values: np.ndarray, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Fixed-point encoding as uint64 (two's complement of ``round(x * 2^fraction_bits)``)."""
    scaled = np.round(np.asarray(values, dtype=np.float64) * 2.0**fraction_bits)
    if scaled.size and not np.all(np.abs(scaled) < _LIMIT):
        raise ValueError(
            f"a value of magnitude {np.abs(values).max():.3g} overflows the fixed-point range "
            f"(|x| < 2^{62 - fraction_bits}); lower fraction_bits"
        )
    return scaled.astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Back from the uint64 sum to floats."""
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**fraction_bits


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair for one key agreement; the private half never leaves the client."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> ClientKeys:
        private = X25519PrivateKey.generate()
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(private, public)


def _pair_seed(own: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared)


def mask_stream(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform uint64 values expanded from a 32-byte seed with ChaCha20."""
    cipher = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(cipher.update(bytes(8 * size)), dtype=np.uint64).copy()


def mask(
    index: int,
    encoded: np.ndarray,
    keys: ClientKeys,
    public_keys: Mapping[int, bytes],
    context: bytes,
) -> np.ndarray:
    """Client ``index``'s masked vector: its encoded update plus the pairwise masks it shares with
    every other client in ``public_keys`` (added for higher indices, subtracted for lower)."""
    out = np.asarray(encoded, dtype=np.uint64).ravel().copy()
    for peer, public in public_keys.items():
        if peer == index:
            continue
        stream = mask_stream(_pair_seed(keys.private, public, context), out.size)
        if index < peer:
            out += stream
        else:
            out -= stream
    return out


def unmask_sum(masked: Sequence[np.ndarray]) -> np.ndarray:
    """The sum (mod 2^64) of every client's masked vector: the masks cancel, the sum remains."""
    if not masked:
        raise ValueError("cannot sum zero masked vectors")
    total = np.zeros_like(masked[0], dtype=np.uint64)
    for vector in masked:
        total += vector
    return total


def secure_sum(
    updates: Mapping[int, np.ndarray], context: bytes, fraction_bits: int = FRACTION_BITS
) -> np.ndarray:
    """The whole protocol in one process, for tests and benchmarks: keys, masking, summing."""
    keys = {i: ClientKeys.generate() for i in updates}
    public = {i: k.public for i, k in keys.items()}
    masked = [
        mask(i, encode(u, fraction_bits), keys[i], public, context) for i, u in updates.items()
    ]
    shape = next(iter(updates.values())).shape
    return decode(unmask_sum(masked), fraction_bits).reshape(shape)


def survivors_round(
    updates: Mapping[int, np.ndarray], survivors: Sequence[int], context: bytes, attempt: int
) -> np.ndarray:
    """The dropout rule: the round again among ``survivors`` only, with fresh keys bound to the
    attempt, over the same updates."""
    return secure_sum({i: updates[i] for i in survivors}, context + b"/attempt-%d" % attempt)
