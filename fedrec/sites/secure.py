"""A site's half of secure aggregation: its update held on its own disk, and one protocol step
per signed request (:mod:`models.privacy.secagg_plus`, client side
:class:`~models.privacy.secagg_plus_client.SecAggClient`).

A ``train`` request that carries ``secure`` makes the site keep its update's dense vector in its
state folder (owner-only) and answer only a receipt with the vector's length. Then one ``secagg``
request per step, each carrying the server's message, moves the site's
:class:`SecAggClient` through advertise keys -> share keys -> masked input -> sign survivors ->
unmask, its state written back between steps in ``<state>/secagg/<run-round>/``. The site:

- signs its round keys with its own identity key (the key it signs its answers with), drawn
  from its own entropy (X25519 pairs, the self-mask seed);
- verifies its peers' round keys against the registry of site keys in the coordinator's signed
  request (``sites.yaml``), whose entry for this site must be this site's key;
- masks only the update it holds for the request's run and round, only once (the held vector is
  deleted when masked), and only for a round whose threshold t is at least its DP noise shares
  (the sum the server learns then carries the full noise);
- masks only in a round whose t is a majority of the clients holding its shares (checked by
  :class:`SecAggClient`: two disjoint groups of t could be shown different dropouts and reveal
  both of its secrets), with its own fixed-point step, over no more clients than the registry;
- masks only in a round bound to the settings it trained under (``RoundConfig.binding``, a
  digest of the request's family spec and phase): peers' round keys are signed over it, so a
  coordinator that asked peers to train with less noise cannot complete a round with them.

A refused step (a substituted key, too few peers, a step out of order) aborts the site's round:
it raises :class:`~models.sites.messages.RefusedMessage` with the protocol's reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.federation.family import Family, min_secure_threshold
from models.files import make_private_folder, read_private, write_private
from models.privacy.identity import KeyAuthenticationError, public_bytes
from models.privacy.secagg_plus import (
    KeyDirectory,
    Message,
    RoundConfig,
    SecAggError,
    ShareInbox,
    SurvivorList,
    UnmaskRequest,
)
from models.privacy.secagg_plus_client import SecAggClient, mask_once
from models.privacy.wire import pack, unpack
from models.protocol import ClientUpdate
from models.sites.messages import RefusedMessage, RoundRequest
from models.sites.spec import training_binding

STEPS = ("advertise", "share", "mask", "sign", "unmask")
# Fixed-point step of a round across sites: 2^-30 ~ 9.3e-10, so each value of the unmasked sum
# is within n_sites * 2^-31 of the plain sum (4.7e-9 for 10 sites; the simulation's 2^-24 ~
# 6e-8 is coarser). The overflow bound is |x| < 2^33 / n_sites per value (8.6e8 for 10 sites):
# the largest value a site sends is its rating sum, about 3.5 x its rows on a 1-5 scale, so ten
# sites of up to about 245 million rows each.
FRACTION_BITS = 30
HELD, STATE = "held-update.npz", "round-state.npz"
MASKED = "masked-updates"  # per run: one sha256 per round and per update this site masked


def registry_field(keys: dict[int, Ed25519PublicKey]) -> dict[str, str]:
    """The ``secure.registry`` of a request: client id -> base64 raw public key."""
    return {str(c): base64.b64encode(public_bytes(k)).decode() for c, k in sorted(keys.items())}


def read_registry_field(raw: Any) -> dict[int, Ed25519PublicKey]:
    """The registry a request carries, checked.

    Raises
    ------
    RefusedMessage
        If it is not an object of client ids to 32-byte base64 keys.
    """
    if not isinstance(raw, dict) or not raw:
        raise RefusedMessage("secure registry must be an object of client ids to public keys")
    keys = {}
    for client, value in raw.items():
        try:
            keys[int(client)] = Ed25519PublicKey.from_public_bytes(
                base64.b64decode(value, validate=True)
            )
        except (TypeError, ValueError, binascii.Error) as err:
            raise RefusedMessage(f"secure registry entry {client!r} is not a public key") from err
    return keys


class SecureSite:
    """The secure-aggregation state of one site, in ``folder`` (``<state>/secagg``).

    Parameters
    ----------
    folder : path
        Created 0700 when missing.
    key : Ed25519PrivateKey
        The site's identity key: it signs the round keys and the survivor list.
    peers : frozenset of bytes, optional
        The raw public keys of the federation's sites as this site's operator pinned them
        (``fedrec site run --peers``); without them the site takes its peers' keys from the
        coordinator's signed request, so a coordinator that lies about them could stand in for a
        peer in the key agreement.
    """

    def __init__(
        self, folder: str | Path, key: Ed25519PrivateKey, peers: frozenset[bytes] | None = None
    ) -> None:
        self.folder = Path(folder)
        make_private_folder(self.folder)
        self.key = key
        self.peers = peers

    def _round_folder(self, run: str, round_: int) -> Path:
        name = hashlib.sha256(f"{run}\n{round_}".encode()).hexdigest()[:32]
        return self.folder / name

    def _registry(self, request: RoundRequest) -> dict[int, Ed25519PublicKey]:
        keys = read_registry_field((request.secure or {}).get("registry"))
        if len({public_bytes(key) for key in keys.values()}) < len(keys):  # one key, two peers
            raise RefusedMessage("the secure registry lists one key for more than one client")
        own = keys.get(request.client_id)
        if own is None or public_bytes(own) != public_bytes(self.key):
            raise RefusedMessage(
                f"the secure registry does not hold this site's key for client {request.client_id}"
            )
        for client, key in sorted(keys.items()):
            if self.peers is not None and public_bytes(key) not in self.peers:
                raise RefusedMessage(
                    f"the secure registry's key for client {client} is not one of this site's "
                    "pinned peers (--peers)"
                )
        return keys

    # --- training: keep the update -----------------------------------------------------------

    def hold(
        self, request: RoundRequest, family: Family, update: ClientUpdate, n_items: int
    ) -> int:
        """Keep ``update``'s dense vector for the request's run and round; returns its length.

        Raises
        ------
        RefusedMessage
            If the family cannot be summed under masks or the registry lacks this site's key.
        """
        to_dense = getattr(family, "to_dense", None)
        if to_dense is None:
            raise RefusedMessage(f"the {family.name} family cannot be securely aggregated")
        self._registry(request)
        dense = np.asarray(to_dense(update, n_items), dtype=np.float64).ravel()
        fields = {"run": request.run, "round": request.round,
                  "min_threshold": min_secure_threshold(family),
                  "binding": training_binding(request.family, request.phase)}  # fmt: skip
        folder = self._round_folder(request.run, request.round)
        write_private(folder / HELD, pack(fields, {"dense": dense}))
        return int(dense.size)

    def _held(self, folder: Path, config: RoundConfig) -> tuple[np.ndarray, int]:
        path = folder / HELD
        if not path.is_file():
            raise RefusedMessage(
                f"this site holds no update of round {config.round} (never trained it, or "
                "masked it already)"
            )
        fields, arrays = unpack(read_private(path, "held update"))
        dense = arrays["dense"]
        if dense.size != config.vector_size:
            raise RefusedMessage(
                f"the round masks {config.vector_size} values, this site holds {dense.size}"
            )
        if config.binding != fields["binding"]:  # the peers' noise shares are the ones counted
            raise RefusedMessage(
                f"the secure round of round {config.round} binds other training settings than "
                "this site's update was made with: refusing to mask"
            )
        return dense, int(fields["min_threshold"])

    # --- one protocol step -------------------------------------------------------------------

    def answer(self, request: RoundRequest, message: bytes | None) -> bytes:
        """This site's protocol message for the step ``request.phase``.

        Raises
        ------
        RefusedMessage
            With the reason: the request, its round or its message does not fit, or the
            protocol refused the step (a key not signed by its registered site key, too few
            clients, a step out of order); the site's round is aborted then.
        """
        step = request.phase
        if step not in STEPS:
            raise RefusedMessage(f"secure step {step!r}; allowed: {', '.join(STEPS)}")
        try:
            config = RoundConfig(**(request.secure or {})["round"])
        except (TypeError, ValueError, KeyError) as err:
            raise RefusedMessage(f"secure round configuration: {err}") from err
        if (config.run_id, config.round) != (request.run, request.round):
            raise RefusedMessage("the secure round names another run or round than the request")
        registry = self._registry(request)
        if config.fraction_bits != FRACTION_BITS or config.n_clients > len(registry):
            # both set the fixed-point range: one made too narrow overflows on the update
            raise RefusedMessage(
                f"the secure round sets {config.fraction_bits} fraction bits over "
                f"{config.n_clients} clients; this site masks with {FRACTION_BITS} over at most "
                f"the {len(registry)} sites of the registry"
            )
        folder = self._round_folder(request.run, request.round)
        if step == "advertise":
            self._held(folder, config)
            client = SecAggClient(request.client_id, config)
        else:
            if not (folder / STATE).is_file():
                raise RefusedMessage(f"no secure state for round {config.round}: advertise first")
            client = SecAggClient.from_bytes(read_private(folder / STATE, "secure round state"))
            if client.config != config or client.client_id != request.client_id:
                raise RefusedMessage("the secure round differs from the one this site joined")
        try:
            reply = self._step(step, client, folder, config, message, registry)
        except (SecAggError, KeyAuthenticationError) as err:
            write_private(folder / STATE, client.to_bytes())
            raise RefusedMessage(f"secure aggregation {step}: {err}") from err
        except ValueError as err:  # a malformed protocol message
            raise RefusedMessage(f"secure aggregation {step}: {err}") from err
        write_private(folder / STATE, client.to_bytes())
        if step == "mask":  # masked once: the update is gone, nothing can mask it again
            (folder / HELD).unlink()
        if step == "unmask":  # done: the round's keys and shares are no longer needed
            shutil.rmtree(folder)
        return reply.to_bytes()

    def _step(
        self,
        step: str,
        client: SecAggClient,
        folder: Path,
        config: RoundConfig,
        message: bytes | None,
        registry: dict[int, Ed25519PublicKey],
    ) -> Message:
        if step == "advertise":
            return client.advertise_keys(self.key)
        if message is None:
            raise RefusedMessage(f"secure step {step} needs the server's message")
        if step == "share":
            return client.share_keys(KeyDirectory.from_bytes(message), registry)
        if step == "mask":
            dense, min_threshold = self._held(folder, config)
            if config.threshold < min_threshold:
                raise RefusedMessage(
                    f"the round's threshold {config.threshold} is below the {min_threshold} "
                    "clients whose noise shares make the full DP noise: refusing to mask"
                )
            # once per run: a coordinator that sent the same state for two rounds would get
            # the same update twice, and two sums over it with different survivors
            run_folder = self.folder / hashlib.sha256(config.run_id.encode()).hexdigest()[:32]
            mask_once(run_folder / MASKED, f"{config.run_id}/round-{config.round}", dense,
                      f"client-{client.client_id}")  # fmt: skip
            return client.masked_input(dense, ShareInbox.from_bytes(message))
        if step == "sign":
            return client.sign_survivors(SurvivorList.from_bytes(message), self.key)
        return client.unmask(UnmaskRequest.from_bytes(message), registry)
