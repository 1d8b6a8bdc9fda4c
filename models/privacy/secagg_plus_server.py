"""The server side of secure aggregation (protocol in :mod:`models.privacy.secagg_plus`).

A :class:`SecAggServer` relays keys and ciphertexts, adds the masked inputs, commits to the
survivors, and with the revealed shares removes the masks from the sum. It never holds an
unmasked single update: each step refuses to go on with fewer than t clients, masked inputs that
arrive after the commitment are refused, and the shares it receives let it remove only the self
masks of survivors and the pairwise masks of dropped clients. Its state can be written with
:meth:`SecAggServer.to_bytes` between steps (npz, no pickle).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from models.privacy import shamir
from models.privacy.fixed_point import decode
from models.privacy.identity import KeyAuthenticationError, verify
from models.privacy.secagg_plus import (
    SEED_BYTES,
    EncryptedShares,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    ProtocolViolationError,
    RoundConfig,
    ShareInbox,
    SurvivorList,
    SurvivorSignature,
    TooFewClientsError,
    UnmaskRequest,
    UnmaskShares,
    agree,
    directory_digest,
    neighbours,
    pair_sign,
    prg,
    share_x,
    x25519_public,
)
from models.privacy.secagg_plus_client import round_keys_message, survivors_message
from models.privacy.wire import pack, unpack

_STATE_KIND = "secagg-server-state"


class SecAggServer:
    """The server's state in one round of secure aggregation.

    Parameters
    ----------
    config : RoundConfig
    registry : mapping of int to Ed25519PublicKey, optional
        Identity keys; when given, the server drops advertisements and survivor signatures that do
        not verify instead of relaying them (the clients check them either way).
    """

    def __init__(
        self, config: RoundConfig, registry: Mapping[int, Ed25519PublicKey] | None = None
    ) -> None:
        self.config = config
        self.registry = registry
        self.phase = "keys"
        self.rejected: dict[int, str] = {}  # client -> why the server dropped its message
        self._directory: KeyDirectory | None = None
        self._shared: list[int] = []  # U2
        self._survivors: tuple[int, ...] | None = None  # U3
        self._total: np.ndarray | None = None
        self._request: UnmaskRequest | None = None

    def _enough(self, clients: Sequence[int], what: str) -> None:
        if len(clients) < self.config.threshold:
            self.phase = "aborted"
            raise TooFewClientsError(
                f"round {self.config.round}: {len(clients)} clients {what}, threshold is "
                f"{self.config.threshold}: round refused"
            )

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise ProtocolViolationError(
                f"server is in phase {self.phase!r}, this step needs {phase!r}"
            )

    # --- AdvertiseKeys -> KeyDirectory -----------------------------------------------------

    def key_directory(self, adverts: Sequence[KeyAdvertisement]) -> KeyDirectory:
        """U1: every (verified, if a registry is set) advertisement, to broadcast to U1."""
        self._expect("keys")
        kept: dict[int, KeyAdvertisement] = {}
        for advert in adverts:
            if advert.client_id in kept:
                raise ProtocolViolationError(f"client {advert.client_id} advertised keys twice")
            if self.registry is not None:
                message = round_keys_message(
                    self.config, advert.client_id, advert.c_public, advert.s_public
                )
                try:
                    verify(
                        self.registry,
                        verifier=None,
                        signer=advert.client_id,
                        message=message,
                        signature=advert.signature,
                    )
                except KeyAuthenticationError as err:
                    self.rejected[advert.client_id] = str(err)
                    continue
            kept[advert.client_id] = advert
        if len(kept) > self.config.n_clients:
            raise ProtocolViolationError(
                f"{len(kept)} clients advertised keys, the round declared at most "
                f"{self.config.n_clients} (its overflow bound)"
            )
        self._enough(list(kept), "advertised keys")
        ids = sorted(kept)
        self._directory = KeyDirectory(
            {u: kept[u].c_public for u in ids},
            {u: kept[u].s_public for u in ids},
            {u: kept[u].signature for u in ids},
        )
        self.phase = "shares"
        return self._directory

    # --- ShareKeys -> inboxes ----------------------------------------------------------------

    def route_shares(self, shares: Sequence[EncryptedShares]) -> dict[int, ShareInbox]:
        """U2: the senders; each gets the ciphertexts the other senders addressed to it."""
        self._expect("shares")
        by_sender = {s.sender: s for s in shares}
        strangers = sorted(set(by_sender) - set(self._directory.c_public))
        if strangers:
            raise ProtocolViolationError(f"clients {strangers} sent shares but advertised no keys")
        self._shared = sorted(by_sender)
        self._enough(self._shared, "shared their keys")
        inboxes = {
            v: ShareInbox(
                v,
                {
                    u: by_sender[u].ciphertexts[v]
                    for u in self._shared
                    if v in by_sender[u].ciphertexts
                },
            )
            for v in self._shared
        }
        self.phase = "masked"
        return inboxes

    # --- MaskedInput -> commitment -----------------------------------------------------------

    def commit(self, inputs: Sequence[MaskedInput]) -> SurvivorList:
        """Add the masked inputs and commit to their senders as U3; later inputs are refused."""
        self._expect("masked")
        total = np.zeros(self.config.vector_size, dtype=np.uint64)
        senders = []
        for item in inputs:
            if item.client_id not in self._shared or item.client_id in senders:
                raise ProtocolViolationError(
                    f"unexpected masked input from client {item.client_id}"
                )
            vector = np.asarray(item.vector)
            if vector.dtype != np.uint64 or vector.shape != (self.config.vector_size,):
                raise ProtocolViolationError(
                    f"masked input of client {item.client_id} is {vector.dtype}{vector.shape}, "
                    f"expected uint64({self.config.vector_size},)"
                )
            total += vector
            senders.append(item.client_id)
        self._enough(senders, "sent masked inputs")
        self._total = total
        self._survivors = tuple(sorted(senders))
        self.phase = "committed"
        return SurvivorList(self._survivors)

    def late_input(self, item: MaskedInput) -> None:
        """A masked input after the commitment: always refused.

        Raises
        ------
        ProtocolViolationError
        """
        raise ProtocolViolationError(
            f"masked input of client {item.client_id} arrived after the round committed to "
            f"survivors {list(self._survivors or ())}: discarded"
        )

    # --- ConsistencyCheck -> UnmaskRequest ---------------------------------------------------

    def unmask_request(self, signatures: Sequence[SurvivorSignature]) -> UnmaskRequest:
        """U3, the dropped U2 \\ U3, and the survivors' signatures over U3 (at least t)."""
        self._expect("committed")
        kept = {}
        for item in signatures:
            if item.client_id not in self._survivors:
                continue
            if self.registry is not None:
                try:
                    verify(
                        self.registry,
                        verifier=None,
                        signer=item.client_id,
                        message=survivors_message(self.config, item.client_id, self._survivors),
                        signature=item.signature,
                        what="survivor list",
                    )
                except KeyAuthenticationError as err:
                    self.rejected[item.client_id] = str(err)
                    continue
            kept[item.client_id] = item.signature
        self._enough(list(kept), "signed the survivor list")
        dropped = tuple(u for u in self._shared if u not in self._survivors)
        self._request = UnmaskRequest(self._survivors, dropped, kept)
        self.phase = "unmask"
        return self._request

    # --- Unmasking -> the sum ----------------------------------------------------------------

    def aggregate(self, answers: Sequence[UnmaskShares]) -> np.ndarray:
        """The uint64 sum of the survivors' encoded updates.

        Raises
        ------
        TooFewClientsError
            If fewer than t clients answered, or a seed has fewer than t shares.
        ProtocolViolationError
            If a reconstructed mask key does not match its advertised public key (bad shares).
        """
        self._expect("unmask")
        answers = [a for a in answers if a.client_id in self._survivors]
        self._enough([a.client_id for a in answers], "answered the unmasking")
        size, context = self.config.vector_size, self.config.context
        total = self._total.copy()
        for u in self._survivors:
            shares = {share_x(a.client_id): a.b_shares[u] for a in answers if u in a.b_shares}
            seed = self._reconstruct(shares, u, "self-mask seed")
            total -= prg(seed, size)
        directory = self._directory
        members = sorted(directory.c_public)
        salt = directory_digest(directory)
        for d in self._request.dropped:
            shares = {share_x(a.client_id): a.s_shares[d] for a in answers if d in a.s_shares}
            s_private = self._reconstruct(shares, d, "mask key")
            if x25519_public(s_private) != directory.s_public[d]:
                raise ProtocolViolationError(
                    f"the mask key of dropped client {d} rebuilt from shares does not match its "
                    f"advertised public key: a client revealed a wrong share"
                )
            for v in neighbours(d, members, self.config, salt):
                if v not in self._survivors:
                    continue
                seed = agree(s_private, directory.s_public[v], context, b"mask", d, v)
                if pair_sign(v, d) > 0:  # v added this mask: take it away
                    total -= prg(seed, size)
                else:
                    total += prg(seed, size)
        self.phase = "done"
        return total

    def aggregate_decoded(self, answers: Sequence[UnmaskShares]) -> np.ndarray:
        """:meth:`aggregate`, decoded to floats."""
        return decode(self.aggregate(answers), fraction_bits=self.config.fraction_bits)

    def _reconstruct(self, shares: dict[int, bytes], client: int, what: str) -> bytes:
        if len(shares) < self.config.threshold:
            self.phase = "aborted"
            raise TooFewClientsError(
                f"{len(shares)} shares of the {what} of client {client}, threshold is "
                f"{self.config.threshold}: cannot finish the round"
            )
        try:
            return shamir.combine(shares, self.config.threshold, SEED_BYTES)
        except ValueError as err:
            raise ProtocolViolationError(f"the {what} of client {client}: {err}") from err

    @property
    def survivors(self) -> tuple[int, ...] | None:
        """U3 once committed."""
        return self._survivors

    # --- state between processes -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The server's state (the registry is not included: it is given out of band)."""
        d = self._directory
        fields: dict[str, Any] = {
            "kind": _STATE_KIND,
            "config": self.config.to_json(),
            "phase": self.phase,
            "rejected": self.rejected,
            "directory": None if d is None else [d.c_public, d.s_public, d.signatures],
            "shared": self._shared,
            "survivors": None if self._survivors is None else list(self._survivors),
            "request": None if self._request is None else self._request.to_bytes(),
        }
        arrays = {} if self._total is None else {"total": self._total}
        return pack(fields, arrays)

    @classmethod
    def from_bytes(
        cls, data: bytes, registry: Mapping[int, Ed25519PublicKey] | None = None
    ) -> SecAggServer:
        fields, arrays = unpack(data)
        if fields.get("kind") != _STATE_KIND:
            raise ValueError("not a secure-aggregation server state")
        server = cls(RoundConfig(**fields["config"]), registry)
        server.phase = fields["phase"]
        server.rejected = fields["rejected"]
        if fields["directory"] is not None:
            server._directory = KeyDirectory(*fields["directory"])
        server._shared = fields["shared"]
        if fields["survivors"] is not None:
            server._survivors = tuple(fields["survivors"])
        if fields["request"] is not None:
            server._request = UnmaskRequest.from_bytes(fields["request"])
        server._total = arrays.get("total")
        return server
