"""Client and server tasks of secure aggregation (explicit-feedback family).

A client's update never leaves it in the clear: the training task keeps its dense, fixed-point
encoded update and its X25519 key pair in the client's memory and returns only the public key;
once the server has broadcast the round's public keys, the masking task returns the masked vector.
The server adds the masked vectors and decodes the sum (models/privacy/secagg.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from models.mf.federated import GlobalState, MFConfig, from_dense_sum, server_update, to_dense
from models.privacy.secagg import ClientKeys, decode, encode, mask, unmask_sum
from models.protocol import ClientUpdate

# The clients' memory between the two phases of a round: (client id, context) -> (encoded, keys).
_PENDING: dict[tuple[int, bytes], tuple[np.ndarray, ClientKeys]] = {}


def round_context(run_id: str, round_: int, attempt: int = 0) -> bytes:
    """What the pairwise seeds are bound to: this run, round and key agreement."""
    return f"fedrec/{run_id}/round-{round_}/keys-{attempt}".encode()


def hold_update(update: ClientUpdate, n_items: int, mf: MFConfig, context: bytes) -> bytes:
    """On the client: encode and keep the update, make a key pair; returns the public key."""
    keys = ClientKeys.generate()
    for key in [k for k in _PENDING if k[0] == update.client_id]:
        del _PENDING[key]  # an earlier round's leftovers
    _PENDING[(update.client_id, context)] = (encode(to_dense(update, n_items, mf)), keys)
    return keys.public


@task(name="rekey-client", cache_policy=NONE)
def rekey_client(client_id: int, old: bytes, new: bytes) -> bytes:
    """A fresh key pair for the same held update (the round again, among the survivors)."""
    encoded, _ = _PENDING.pop((client_id, old))
    keys = ClientKeys.generate()
    _PENDING[(client_id, new)] = (encoded, keys)
    return keys.public


@task(name="mask-client", cache_policy=NONE)
def mask_client(
    client_id: int, public_keys: Mapping[int, bytes], context: bytes, vanish: bool = False
) -> ClientUpdate:
    """The client's masked vector over every item: all the server receives of its update.
    ``vanish`` simulates a client that drops out after the key agreement."""
    if vanish:
        raise ConnectionError(f"client-{client_id} vanished after the key agreement")
    encoded, keys = _PENDING[(client_id, context)]
    masked = mask(client_id, encoded, keys, public_keys, context)
    return ClientUpdate(client_id, np.zeros(0, np.int64), np.zeros(0, np.int64), {"masked": masked})


@task(name="secure-aggregate", cache_policy=NONE)
def secure_aggregate(
    state: GlobalState, masked: Sequence[ClientUpdate], n_items: int, mf: MFConfig
) -> tuple[GlobalState, ClientUpdate]:
    """Add the masked vectors (the masks cancel), decode the sum, take the server step; returns
    the new state and the decoded sum as one combined update."""
    combined = from_dense_sum(decode(unmask_sum([u.arrays["masked"] for u in masked])), n_items, mf)
    return server_update(state, [combined], mf), combined
