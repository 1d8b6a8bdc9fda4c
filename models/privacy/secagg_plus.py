"""Secure aggregation that survives dropouts and a lying server: the round's configuration, its
messages, its errors and the cryptographic building blocks shared by client and server.

The protocol is SecAgg (Bonawitz et al., CCS 2017, the version secure against an actively
malicious server), with the sparse masking graph of SecAgg+ (Bell et al., CCS 2020) as an option
(``RoundConfig.degree``; ``None`` is the complete graph). Client side in
:mod:`models.privacy.secagg_plus_client`, server side in :mod:`models.privacy.secagg_plus_server`,
a one-process run in :mod:`models.privacy.secagg_plus_driver`. Message order:

0. **AdvertiseKeys.** Each client u makes two X25519 key pairs, ``c`` (to encrypt shares) and
   ``s`` (to agree masks), and signs both public keys with its long-term Ed25519 identity key,
   bound to the run, the round and its id. The server relays the set U1 of advertisements.
1. **ShareKeys.** Each client verifies every signature against the registry of identity keys (a
   substituted, replayed or unsigned key aborts its round: :class:`KeyAuthenticationError`), draws a
   self-mask seed ``b_u`` from OS entropy, Shamir-shares ``b_u`` and its ``s`` private key with
   threshold t among its neighbours (all of U1 by default) and encrypts each pair of shares for its
   recipient with ChaCha20-Poly1305 under a key from the ``c`` agreement. The server only routes
   ciphertexts; the senders form U2.
2. **MaskedInput.** ``y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv) mod 2^64`` over the fixed-point
   encoding of the update, with + for v > u and - for v < u, for neighbours v in U2. The senders
   of masked inputs form U3, and the server commits to it: no later input is accepted.
3. **ConsistencyCheck.** The server sends U3 to its members; each signs U3 with its identity key.
   The server forwards at least t such signatures, so every honest client knows that the others
   were given the same U3 (a server cannot tell one client "u survived" and another "u dropped").
4. **Unmasking.** Each client checks the signatures, then reveals its shares of ``b`` for the
   survivors U3 and of the ``s`` key for the dropped U2 \\ U3, never both for one client (a request
   for both is refused). The server reconstructs the seeds, removes the self masks of survivors and
   the pairwise masks the survivors hold with dropped clients, and decodes the sum.

Every step refuses to go on with fewer than t >= 2 clients (:class:`TooFewClientsError`), so the
server only ever learns a sum of at least t updates. A dropped client's late masked input still
carries its self mask, whose seed is never revealed: it cannot be combined with anything into an
update, and no update is ever masked twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from models.privacy.fixed_point import FRACTION_BITS
from models.privacy.identity import KeyAuthenticationError
from models.privacy.wire import pack, unpack

__all__ = [
    "KeyAuthenticationError",
    "ProtocolViolationError",
    "RoundConfig",
    "SecAggError",
    "TooFewClientsError",
]

SEED_BYTES = 32
MAX_CLIENT_ID = 2**31 - 1


class SecAggError(Exception):
    """A secure-aggregation round cannot go on."""


class TooFewClientsError(SecAggError):
    """Fewer than the threshold t of clients are left: going on could reveal a small sum."""


class ProtocolViolationError(SecAggError):
    """A message that an honest party never sends (a request for both shares of one client, a
    second, different survivor list, a message out of order, a tampered ciphertext, ...)."""


@dataclass(frozen=True)
class RoundConfig:
    """What every party of one round agrees on before it starts.

    Parameters
    ----------
    run_id, round : str, int
        Bound into every signature and key derivation, so nothing carries over between rounds.
    n_clients : int
        The most clients that may take part; the fixed-point overflow bound is checked for it.
    vector_size : int
        Length of every update vector.
    threshold : int
        Shares needed to reconstruct a seed, and the fewest clients a round goes on with; >= 2.
    fraction_bits : int
        Fixed-point step 2^-fraction_bits.
    degree : int or None
        SecAgg+ neighbours per client (an even number); ``None`` masks every pair (SecAgg).
    binding : str
        What every update of the round was computed under (e.g. a digest of the model family
        and its DP settings), bound into the context: clients given different bindings cannot
        verify each other's keys, so no round mixes updates made under different settings.
    """

    run_id: str
    round: int
    n_clients: int
    vector_size: int
    threshold: int
    fraction_bits: int = FRACTION_BITS
    degree: int | None = None
    binding: str = ""

    def __post_init__(self) -> None:
        if self.threshold < 2:
            raise ValueError(
                f"threshold == {self.threshold}, must be >= 2: a sum of one client is its update"
            )
        if self.n_clients < self.threshold:
            raise ValueError(
                f"n_clients == {self.n_clients} is below threshold == {self.threshold}"
            )
        if self.vector_size < 1:
            raise ValueError(f"vector_size == {self.vector_size}, must be >= 1")
        if self.degree is not None and (self.degree < 2 or self.degree % 2):
            raise ValueError(f"degree == {self.degree}, must be an even number >= 2 or None")
        if self.degree is not None and self.threshold > self.degree + 1:
            raise ValueError(
                f"threshold == {self.threshold} exceeds degree + 1 == {self.degree + 1} share holders"
            )

    @property
    def context(self) -> bytes:
        """The bytes every signature and derived key of this round is bound to."""
        parts = [self.run_id.encode(), b"%d" % self.round]
        if self.binding:
            parts.append(self.binding.encode())
        return b"fedrec/secagg+/" + _length_prefixed(*parts)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_threshold(n_clients: int) -> int:
    """A majority of the clients (at least 2): two disjoint sets of honest clients can never both
    reach it, so a lying server cannot split them into two different views of the dropouts."""
    return max(2, n_clients // 2 + 1)


def neighbours(client: int, members: list[int], config: RoundConfig, salt: bytes) -> list[int]:
    """The clients ``client`` shares seeds and masks with among ``members`` (U1).

    Complete graph when ``config.degree`` is None or covers everyone; otherwise SecAgg+'s
    ``degree``-regular ring over the members in an order that hashes ``salt`` (the digest of the
    signed key directory, which no single party chooses), ``degree / 2`` on each side.
    """
    others = [m for m in members if m != client]
    if config.degree is None or config.degree >= len(others):
        return sorted(others)
    order = sorted(members, key=lambda m: hashlib.sha256(salt + struct.pack(">q", m)).digest())
    at = order.index(client)
    half = config.degree // 2
    ring = {order[(at + step) % len(order)] for step in range(-half, half + 1) if step}
    return sorted(ring)


def check_client_id(client_id: int) -> None:
    if not 0 <= client_id <= MAX_CLIENT_ID:
        raise ValueError(f"client id == {client_id}, must be in [0, {MAX_CLIENT_ID}]")


def share_x(client_id: int) -> int:
    """The Shamir x-coordinate of a client's shares (never 0, which is the secret)."""
    return client_id + 1


# --- keys, seeds and the PRG ----------------------------------------------------------------


def new_x25519() -> tuple[bytes, bytes]:
    """A fresh X25519 pair from OS entropy as ``(private raw, public raw)``."""
    private = X25519PrivateKey.generate()
    return _raw_private(private), _raw_public(private)


def x25519_public(private: bytes) -> bytes:
    return _raw_public(X25519PrivateKey.from_private_bytes(private))


def agree(
    private: bytes, peer_public: bytes, context: bytes, purpose: bytes, a: int, b: int
) -> bytes:
    """A 32-byte key both ends of the pair (a, b) derive: X25519 then HKDF-SHA256, bound to the
    round, the purpose and the unordered pair."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    low, high = sorted((a, b))
    info = _length_prefixed(context, purpose, struct.pack(">qq", low, high))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def new_seed() -> bytes:
    """A self-mask seed from OS entropy."""
    return os.urandom(SEED_BYTES)


def prg(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform uint64 values: the ChaCha20 keystream of a 32-byte seed."""
    cipher = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(cipher.update(bytes(8 * size)), dtype=np.uint64).copy()


def pair_sign(own: int, peer: int) -> int:
    """+1 if ``own`` adds the pair's mask, -1 if it subtracts it."""
    return 1 if own < peer else -1


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def survivors_payload(survivors: tuple[int, ...]) -> bytes:
    """The survivor list as the bytes clients sign in the consistency check."""
    return struct.pack(f">{len(survivors)}q", *sorted(survivors))


def directory_digest(directory: KeyDirectory) -> bytes:
    """SHA-256 over the whole signed key directory (salt of the SecAgg+ graph)."""
    parts = [
        struct.pack(">q", u)
        + directory.c_public[u]
        + directory.s_public[u]
        + directory.signatures[u]
        for u in sorted(directory.c_public)
    ]
    return hashlib.sha256(b"".join(parts)).digest()


# --- messages -------------------------------------------------------------------------------

M = TypeVar("M", bound="Message")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CHECKS = {  # the field types messages use, as written in their annotations
    "int": _is_int,
    "bytes": lambda v: isinstance(v, bytes),
    "tuple[int, ...]": lambda v: isinstance(v, tuple) and all(_is_int(x) for x in v),
    "dict[int, bytes]": lambda v: (
        isinstance(v, dict) and all(_is_int(k) and isinstance(x, bytes) for k, x in v.items())
    ),
    "np.ndarray": lambda v: isinstance(v, np.ndarray) and v.dtype == np.uint64 and v.ndim == 1,
}


class Message:
    """Base of the protocol messages: ``to_bytes``/``from_bytes`` through :mod:`wire` (no pickle)."""

    kind: ClassVar[str]

    def to_bytes(self) -> bytes:
        fields, arrays = {"kind": self.kind}, {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                arrays[field.name] = value
            else:
                fields[field.name] = value
        return pack(fields, arrays)

    @classmethod
    def from_bytes(cls: type[M], data: bytes) -> M:
        fields, arrays = unpack(data)
        kind = fields.pop("kind", None)
        if kind != cls.kind:
            raise ProtocolViolationError(f"expected a {cls.kind} message, got {kind!r}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        values = fields | arrays
        expected = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if set(values) != set(expected):
            raise ProtocolViolationError(
                f"malformed {cls.kind} message: fields {sorted(values)}, expected {sorted(expected)}"
            )
        for name, value in values.items():
            if not _CHECKS[expected[name]](value):
                raise ProtocolViolationError(
                    f"malformed {cls.kind} message: {name} is not a valid {expected[name]}"
                )
        return cls(**values)


@dataclass(frozen=True)
class KeyAdvertisement(Message):
    """Client -> server (AdvertiseKeys): the round's two public keys, signed."""

    kind: ClassVar[str] = "advertise-keys"
    client_id: int
    c_public: bytes
    s_public: bytes
    signature: bytes


@dataclass(frozen=True)
class KeyDirectory(Message):
    """Server -> clients: every advertisement the server received (U1), keyed by client id."""

    kind: ClassVar[str] = "key-directory"
    c_public: dict[int, bytes]
    s_public: dict[int, bytes]
    signatures: dict[int, bytes]


@dataclass(frozen=True)
class EncryptedShares(Message):
    """Client -> server (ShareKeys): one AEAD ciphertext per recipient."""

    kind: ClassVar[str] = "encrypted-shares"
    sender: int
    ciphertexts: dict[int, bytes]


@dataclass(frozen=True)
class ShareInbox(Message):
    """Server -> one client: the ciphertexts addressed to it, keyed by sender (U2 minus itself)."""

    kind: ClassVar[str] = "share-inbox"
    recipient: int
    ciphertexts: dict[int, bytes]


@dataclass(frozen=True)
class MaskedInput(Message):
    """Client -> server (MaskedInput): ``y_u`` as uint64."""

    kind: ClassVar[str] = "masked-input"
    client_id: int
    vector: np.ndarray


@dataclass(frozen=True)
class SurvivorList(Message):
    """Server -> survivors (ConsistencyCheck): the committed U3."""

    kind: ClassVar[str] = "survivor-list"
    survivors: tuple[int, ...]


@dataclass(frozen=True)
class SurvivorSignature(Message):
    """Client -> server: its identity signature over U3."""

    kind: ClassVar[str] = "survivor-signature"
    client_id: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Server -> survivors (Unmasking): U3, the dropped U2 \\ U3, and >= t signatures over U3."""

    kind: ClassVar[str] = "unmask-request"
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: dict[int, bytes]


@dataclass(frozen=True)
class UnmaskShares(Message):
    """Client -> server: its shares of ``b`` for survivors and of the ``s`` key for dropped ones."""

    kind: ClassVar[str] = "unmask-shares"
    client_id: int
    b_shares: dict[int, bytes]
    s_shares: dict[int, bytes]
