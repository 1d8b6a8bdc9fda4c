"""The client side of secure aggregation (protocol in :mod:`models.privacy.secagg_plus`).

A :class:`SecAggClient` holds one client's state for one round and moves through the phases
``new -> advertised -> shared -> masked -> signed -> done`` (or ``aborted``); each method answers one
server message and refuses to run out of order. Between phases the state can be written with
:meth:`SecAggClient.to_bytes` and read back in another process with :meth:`SecAggClient.from_bytes`
(npz, no pickle). The state holds private keys and seeds: it stays with the client, and each
phase's new state replaces the old one (an old copy could answer a phase twice).
The long-term identity key is not part of the state; the phases that sign take it as an argument.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from models.files import write_private
from models.privacy import shamir
from models.privacy.fixed_point import encode
from models.privacy.identity import KeyAuthenticationError, sign, signed_message, verify
from models.privacy.secagg_plus import (
    SEED_BYTES,
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    ProtocolViolationError,
    RoundConfig,
    SecAggError,
    ShareInbox,
    SurvivorList,
    SurvivorSignature,
    TooFewClientsError,
    UnmaskRequest,
    UnmaskShares,
    agree,
    check_client_id,
    directory_digest,
    neighbours,
    new_seed,
    new_x25519,
    pair_sign,
    prg,
    share_x,
    survivors_payload,
)
from models.privacy.wire import pack, unpack

PHASES = ("new", "advertised", "shared", "masked", "signed", "done", "aborted")
_NONCE = 12
_STATE_KIND = "secagg-client-state"


def mask_once(record: Path, round_name: str, held: np.ndarray, who: str) -> None:
    """Write down in ``record`` (durably, before the masked input exists) that ``who`` masks
    ``held`` for the round ``round_name``; refuse when it masked that round, or that very
    update, before.

    Two sums over one update with different survivors (a round run again, or the same update
    held for another round) would let the server subtract them and read the update of a client
    in one sum but not the other. It stops the very same update only: an update a few bits off
    (from a state the server nudged) is a new one, and only DP noise bounds what two such sums
    say.

    Raises
    ------
    SecAggError
        ``who`` masked this round or this update already.
    """
    marks = [
        hashlib.sha256(b"round\0" + round_name.encode()).hexdigest(),
        hashlib.sha256(b"update\0" + np.ascontiguousarray(held).tobytes()).hexdigest(),
    ]
    seen = record.read_text().split() if record.exists() else []
    if marks[0] in seen or marks[1] in seen:
        what = "this round's update" if marks[0] in seen else "this very update"
        raise SecAggError(
            f"{who} masked {what} once already ({round_name}): a second sum over it, with "
            "other survivors, would let the server subtract the two; refused"
        )
    write_private(record, "".join(f"{m}\n" for m in (*seen, *marks)).encode())


def round_keys_message(
    config: RoundConfig, client_id: int, c_public: bytes, s_public: bytes
) -> bytes:
    """The bytes a client signs over its round keys."""
    return signed_message(b"round-keys", config.context, client_id, c_public, s_public)


def survivors_message(config: RoundConfig, client_id: int, survivors: tuple[int, ...]) -> bytes:
    """The bytes a client signs over the committed survivor list."""
    return signed_message(b"survivors", config.context, client_id, survivors_payload(survivors))


def share_aad(config: RoundConfig, sender: int, recipient: int) -> bytes:
    return config.context + struct.pack(">qq", sender, recipient)


class SecAggClient:
    """One client's state in one round of secure aggregation.

    Parameters
    ----------
    client_id : int
        In ``[0, 2^31)``; unique in the round.
    config : RoundConfig
    """

    def __init__(self, client_id: int, config: RoundConfig) -> None:
        check_client_id(client_id)
        self.client_id = client_id
        self.config = config
        self.phase = "new"
        self._c_private: bytes | None = None
        self._s_private: bytes | None = None
        self._c_public: dict[int, bytes] = {}  # U1, including itself
        self._s_public: dict[int, bytes] = {}
        self._peers: list[int] = []  # neighbours in U1
        self._own_b_share: bytes | None = None
        self._own_s_share: bytes | None = None
        self._b_seed: bytes | None = None
        self._inbox: dict[int, bytes] = {}  # U2 neighbours -> ciphertext for me
        self._survivors: tuple[int, ...] | None = None

    # --- phase 0: AdvertiseKeys ------------------------------------------------------------

    def advertise_keys(self, identity: Ed25519PrivateKey) -> KeyAdvertisement:
        """Make the round's ``c`` and ``s`` key pairs and sign their public halves."""
        self._expect("new")
        self._c_private, c_public = new_x25519()
        self._s_private, s_public = new_x25519()
        message = round_keys_message(self.config, self.client_id, c_public, s_public)
        self._c_public = {self.client_id: c_public}
        self._s_public = {self.client_id: s_public}
        self.phase = "advertised"
        return KeyAdvertisement(self.client_id, c_public, s_public, sign(identity, message))

    # --- phase 1: ShareKeys ----------------------------------------------------------------

    def share_keys(
        self, directory: KeyDirectory, registry: Mapping[int, Ed25519PublicKey]
    ) -> EncryptedShares:
        """Verify every peer's signed keys, then share ``b`` and the ``s`` key among the neighbours.

        Raises
        ------
        KeyAuthenticationError
            If a peer's keys are unsigned, substituted, or signed for another run, round or id
            (the round is aborted for this client).
        TooFewClientsError
            If the directory holds fewer than t clients.
        ProtocolViolationError
            If the directory changed this client's own keys or repeats a key, or t is not a
            majority of the clients that would hold this client's shares.
        """
        self._expect("advertised")
        members = sorted(directory.c_public)
        try:
            self._check_directory(directory, registry)
        except (KeyAuthenticationError, TooFewClientsError, ProtocolViolationError):
            self.phase = "aborted"
            raise
        self._c_public = dict(directory.c_public)
        self._s_public = dict(directory.s_public)
        self._peers = neighbours(self.client_id, members, self.config, directory_digest(directory))
        if len(self._peers) + 1 < self.config.threshold:
            self.phase = "aborted"
            raise TooFewClientsError(
                f"client {self.client_id}: {len(self._peers)} neighbours, need at least "
                f"{self.config.threshold - 1} to share with threshold {self.config.threshold}"
            )
        if 2 * self.config.threshold <= len(self._peers) + 1:
            # Two disjoint groups of t share holders: a server telling one group this client
            # survived and the other that it dropped gets its self-mask seed from the first
            # and its mask key from the second, and unmasks its update alone.
            self.phase = "aborted"
            raise ProtocolViolationError(
                f"client {self.client_id}: threshold {self.config.threshold} is not a majority "
                f"of the {len(self._peers) + 1} clients holding its shares: a server could "
                "unmask its update by showing two groups different dropouts; refusing the round"
            )
        self._b_seed = new_seed()
        holders = [share_x(v) for v in [self.client_id, *self._peers]]
        b_shares = shamir.split(self._b_seed, holders, self.config.threshold)
        s_shares = shamir.split(self._s_private, holders, self.config.threshold)
        self._own_b_share = b_shares[share_x(self.client_id)]
        self._own_s_share = s_shares[share_x(self.client_id)]
        ciphertexts = {}
        for v in self._peers:
            key = self._share_key(v)
            nonce = os.urandom(_NONCE)
            plaintext = b_shares[share_x(v)] + s_shares[share_x(v)]
            aad = share_aad(self.config, self.client_id, v)
            ciphertexts[v] = nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)
        self.phase = "shared"
        return EncryptedShares(self.client_id, ciphertexts)

    def _check_directory(
        self, directory: KeyDirectory, registry: Mapping[int, Ed25519PublicKey]
    ) -> None:
        if (
            not directory.c_public.keys()
            == directory.s_public.keys()
            == directory.signatures.keys()
        ):
            raise ProtocolViolationError(f"client {self.client_id}: key directory is incomplete")
        if len(directory.c_public) < self.config.threshold:
            raise TooFewClientsError(
                f"client {self.client_id}: {len(directory.c_public)} clients advertised keys, "
                f"threshold is {self.config.threshold}: refusing the round"
            )
        own = (directory.c_public.get(self.client_id), directory.s_public.get(self.client_id))
        if own != (self._c_public[self.client_id], self._s_public[self.client_id]):
            raise ProtocolViolationError(
                f"client {self.client_id}: the directory does not carry this client's own keys"
            )
        for u in sorted(directory.c_public):
            message = round_keys_message(
                self.config, u, directory.c_public[u], directory.s_public[u]
            )
            verify(
                registry,
                verifier=self.client_id,
                signer=u,
                message=message,
                signature=directory.signatures[u],
            )
        keys = [*directory.c_public.values(), *directory.s_public.values()]
        if len(set(keys)) != len(keys):
            raise ProtocolViolationError(f"client {self.client_id}: a public key appears twice")

    # --- phase 2: MaskedInput --------------------------------------------------------------

    def masked_input(self, update: np.ndarray, inbox: ShareInbox) -> MaskedInput:
        """``y = encode(update) + PRG(b) + sum_v ±PRG(s_uv)`` over the neighbours that shared (U2).

        The self-mask seed and the ``s`` private key are dropped from the state afterwards: the
        client keeps only what it needs to answer the unmasking (its ``c`` key and shares).

        Raises
        ------
        TooFewClientsError
            If fewer than t clients (itself included) shared keys.
        FixedPointOverflowError
            If the sum of ``n_clients`` such updates could wrap.
        """
        self._expect("shared")
        if inbox.recipient != self.client_id:
            raise ProtocolViolationError(
                f"client {self.client_id}: got the share inbox of client {inbox.recipient}"
            )
        unknown = sorted(set(inbox.ciphertexts) - set(self._peers))
        if unknown:
            raise ProtocolViolationError(
                f"client {self.client_id}: shares from non-neighbours {unknown}"
            )
        if len(inbox.ciphertexts) + 1 < self.config.threshold:
            self.phase = "aborted"
            raise TooFewClientsError(
                f"client {self.client_id}: {len(inbox.ciphertexts) + 1} clients shared keys, "
                f"threshold is {self.config.threshold}: refusing to send a masked input"
            )
        values = np.asarray(update, dtype=np.float64).ravel()
        if values.size != self.config.vector_size:
            raise ValueError(
                f"update has {values.size} values, the round's vector_size is {self.config.vector_size}"
            )
        size = self.config.vector_size
        y = encode(values, n_clients=self.config.n_clients, fraction_bits=self.config.fraction_bits)
        y += prg(self._b_seed, size)
        for v in sorted(inbox.ciphertexts):
            seed = agree(
                self._s_private, self._s_public[v], self.config.context, b"mask", self.client_id, v
            )
            if pair_sign(self.client_id, v) > 0:
                y += prg(seed, size)
            else:
                y -= prg(seed, size)
        self._inbox = dict(inbox.ciphertexts)
        self._b_seed = None  # only t shares bring it back now
        self._s_private = None
        self.phase = "masked"
        return MaskedInput(self.client_id, y)

    # --- phase 3: ConsistencyCheck ---------------------------------------------------------

    def sign_survivors(
        self, request: SurvivorList, identity: Ed25519PrivateKey
    ) -> SurvivorSignature:
        """Sign the committed survivor list U3, once.

        Raises
        ------
        TooFewClientsError
            If U3 holds fewer than t clients.
        ProtocolViolationError
            If this client is not in U3, or U3 names a neighbour that never shared keys with it.
        """
        self._expect("masked")
        survivors = tuple(sorted(set(request.survivors)))
        if len(survivors) != len(request.survivors):
            raise ProtocolViolationError(f"client {self.client_id}: survivor list repeats a client")
        if len(survivors) < self.config.threshold:
            self.phase = "aborted"
            raise TooFewClientsError(
                f"client {self.client_id}: {len(survivors)} survivors, threshold is "
                f"{self.config.threshold}: refusing to unmask"
            )
        if self.client_id not in survivors:
            raise ProtocolViolationError(
                f"client {self.client_id}: not in the survivor list it was sent"
            )
        self._survivors = survivors
        self.phase = "signed"
        return SurvivorSignature(
            self.client_id,
            sign(identity, survivors_message(self.config, self.client_id, survivors)),
        )

    # --- phase 4: Unmasking ----------------------------------------------------------------

    def unmask(
        self, request: UnmaskRequest, registry: Mapping[int, Ed25519PublicKey]
    ) -> UnmaskShares:
        """Reveal shares of ``b`` for survivors and of the ``s`` key for dropped clients.

        Raises
        ------
        ProtocolViolationError
            If a client is both a survivor and dropped (the request asks for both its secrets),
            the survivors differ from the list this client signed, or a neighbour it masked with
            is in neither list.
        KeyAuthenticationError
            If a consistency signature does not verify.
        TooFewClientsError
            If fewer than t valid consistency signatures come with the request.
        """
        self._expect("signed")
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = sorted(survivors & dropped)
        if both:
            self.phase = "aborted"
            raise ProtocolViolationError(
                f"client {self.client_id}: asked for both the self-mask and the mask-key shares "
                f"of client(s) {both}: refusing to unmask"
            )
        if tuple(sorted(survivors)) != self._survivors:
            self.phase = "aborted"
            raise ProtocolViolationError(
                f"client {self.client_id}: the survivors to unmask differ from the list it signed"
            )
        missing = sorted(set(self._inbox) - survivors - dropped)
        if missing:
            self.phase = "aborted"
            raise ProtocolViolationError(
                f"client {self.client_id}: neighbours {missing} are neither survivors nor dropped"
            )
        signers = [u for u in request.signatures if u in survivors]
        for u in signers:
            verify(
                registry,
                verifier=self.client_id,
                signer=u,
                message=survivors_message(self.config, u, self._survivors),
                signature=request.signatures[u],
                what="survivor list",
            )
        if len(signers) < self.config.threshold:
            self.phase = "aborted"
            raise TooFewClientsError(
                f"client {self.client_id}: {len(signers)} survivors signed the survivor list, "
                f"threshold is {self.config.threshold}: refusing to unmask"
            )
        b_shares, s_shares = {self.client_id: self._own_b_share}, {}
        for sender in sorted(self._inbox):
            if sender not in survivors and sender not in dropped:
                continue
            b_share, s_share = self._open(sender)
            if sender in survivors:
                b_shares[sender] = b_share
            else:
                s_shares[sender] = s_share
        self.phase = "done"
        return UnmaskShares(self.client_id, b_shares, s_shares)

    def _open(self, sender: int) -> tuple[bytes, bytes]:
        blob = self._inbox[sender]
        nonce, body = blob[:_NONCE], blob[_NONCE:]
        try:
            plain = ChaCha20Poly1305(self._share_key(sender)).decrypt(
                nonce, body, share_aad(self.config, sender, self.client_id)
            )
        except InvalidTag as err:
            raise ProtocolViolationError(
                f"client {self.client_id}: the shares from client {sender} fail authentication"
            ) from err
        return plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]

    def _share_key(self, peer: int) -> bytes:
        return agree(
            self._c_private,
            self._c_public[peer],
            self.config.context,
            b"shares",
            self.client_id,
            peer,
        )

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise ProtocolViolationError(
                f"client {self.client_id}: is in phase {self.phase!r}, this step needs {phase!r}"
            )

    # --- state between processes -----------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state (secret: it holds private keys and shares) as npz bytes."""
        fields: dict[str, Any] = {
            "kind": _STATE_KIND,
            "client_id": self.client_id,
            "config": self.config.to_json(),
            "phase": self.phase,
            "c_public": self._c_public,
            "s_public": self._s_public,
            "peers": self._peers,
            "inbox": self._inbox,
            "survivors": None if self._survivors is None else list(self._survivors),
        }
        for name in ("c_private", "s_private", "own_b_share", "own_s_share", "b_seed"):
            fields[name] = getattr(self, f"_{name}")
        return pack(fields)

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggClient:
        """A state written by :meth:`to_bytes`.

        Raises
        ------
        ValueError
            If ``data`` is not a client state.
        """
        fields, _ = unpack(data)
        if fields.get("kind") != _STATE_KIND or fields.get("phase") not in PHASES:
            raise ValueError("not a secure-aggregation client state")
        client = cls(fields["client_id"], RoundConfig(**fields["config"]))
        client.phase = fields["phase"]
        client._c_public, client._s_public = fields["c_public"], fields["s_public"]
        client._peers, client._inbox = fields["peers"], fields["inbox"]
        survivors = fields["survivors"]
        client._survivors = None if survivors is None else tuple(survivors)
        for name in ("c_private", "s_private", "b_seed", "own_b_share", "own_s_share"):
            value = fields[name]
            size = (
                SEED_BYTES if name in ("c_private", "s_private", "b_seed") else shamir.SHARE_BYTES
            )
            if value is not None and len(value) != size:
                raise ValueError(f"client state: {name} has {len(value)} bytes, expected {size}")
            setattr(client, f"_{name}", value)
        return client
