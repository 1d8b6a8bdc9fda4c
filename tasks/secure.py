"""Client and server tasks of secure aggregation (families with a dense update encoding).

A client's update never leaves it in the clear: the training task keeps its dense, fixed-point
encoded update and its X25519 key pair in the client's own storage (a file beside its partition,
readable only by its owner) and returns only the public key; once the server has broadcast the
round's public keys, the masking task reads them back and returns the masked vector. The two
phases may run in different processes (Dask workers): the state travels with the client's data,
not with the process. The server adds the masked vectors and decodes the sum
(models/privacy/secagg.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from prefect import task
from prefect.cache_policies import NONE

from models.data.partitions import ClientEntry
from models.federation.family import SecureFamily
from models.privacy.secagg import ClientKeys, decode, encode, mask, unmask_sum
from models.protocol import ClientUpdate


def round_context(run_id: str, round_: int, attempt: int = 0) -> bytes:
    """What the pairwise seeds are bound to: this run, round and key agreement."""
    return f"fedrec/{run_id}/round-{round_}/keys-{attempt}".encode()


def pending_path(workspace: str, entry: ClientEntry) -> Path:
    """Where a client keeps its held update between the two phases: beside its partition."""
    return (Path(workspace) / entry.path).with_suffix(".secagg-pending.npz")


def _keep(path: Path, encoded: np.ndarray, keys: ClientKeys, context: bytes) -> None:
    """Write the held update, the round's private key and its context, readable by the owner
    only; atomically (a temp file, then rename), replacing an earlier round's."""
    private = keys.private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        np.savez(
            out,
            encoded=encoded,
            private=np.frombuffer(private, np.uint8),
            context=np.frombuffer(context, np.uint8),
        )
    os.replace(temp, path)


def _held(path: Path, context: bytes) -> tuple[np.ndarray, ClientKeys]:
    """The held update and key pair for ``context``; a clear error if the client holds none."""
    try:
        with np.load(path, allow_pickle=False) as held:
            stored, encoded, private = held["context"].tobytes(), held["encoded"], held["private"]
    except FileNotFoundError as err:
        raise LookupError(f"{path.name}: no update held for {context.decode()}") from err
    if stored != context:
        raise LookupError(
            f"{path.name}: holds the update for {stored.decode()}, not for {context.decode()}"
        )
    key = X25519PrivateKey.from_private_bytes(private.tobytes())
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return encoded, ClientKeys(key, public)


def hold_update(
    update: ClientUpdate, n_items: int, family: SecureFamily, context: bytes, where: Path
) -> bytes:
    """On the client: encode and keep the update at ``where``, make a key pair; returns the
    public key."""
    keys = ClientKeys.generate()
    _keep(where, encode(family.to_dense(update, n_items)), keys, context)
    return keys.public


@task(name="rekey-client", cache_policy=NONE)
def rekey_client(workspace: str, entry: ClientEntry, old: bytes, new: bytes) -> bytes:
    """A fresh key pair for the same held update (the round again, among the survivors)."""
    path = pending_path(workspace, entry)
    encoded, _ = _held(path, old)
    keys = ClientKeys.generate()
    _keep(path, encoded, keys, new)
    return keys.public


@task(name="mask-client", cache_policy=NONE)
def mask_client(
    workspace: str,
    entry: ClientEntry,
    public_keys: Mapping[int, bytes],
    context: bytes,
    vanish: bool = False,
) -> ClientUpdate:
    """The client's masked vector over every item: all the server receives of its update.
    ``vanish`` simulates a client that drops out after the key agreement."""
    client_id = entry.client_id
    if vanish:
        raise ConnectionError(f"client-{client_id} vanished after the key agreement")
    encoded, keys = _held(pending_path(workspace, entry), context)
    masked = mask(client_id, encoded, keys, public_keys, context)
    return ClientUpdate(client_id, np.zeros(0, np.int64), np.zeros(0, np.int64), {"masked": masked})


@task(name="secure-aggregate", cache_policy=NONE)
def secure_aggregate(
    *, family: SecureFamily, state: Any, masked: Sequence[ClientUpdate], n_items: int, phase: str
) -> tuple[Any, ClientUpdate]:
    """Add the masked vectors (the masks cancel), decode the sum, take the server step; returns
    the new state and the decoded sum as one combined update."""
    total = decode(unmask_sum([u.arrays["masked"] for u in masked]))
    combined = family.from_dense_sum(total, n_items)
    return family.server_update(state, [combined], phase), combined
