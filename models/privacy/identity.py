"""Long-term Ed25519 identity keys of clients, and signatures that bind round keys to them.

Each client generates its identity key once and keeps the private half in a PEM file only it can
read (mode 0600); the public half is registered with the coordinator out of band (a file per
client in a registry directory, ``client-<id>.pub``). In secure aggregation a client signs its
round public keys together with the run id, the round and its own id, and every peer verifies the
signature against the registered key. A server relaying the keys can then neither substitute its
own keys for a client's (the signature would not verify) nor replay keys from another run, round
or client (they are part of the signed message).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.files import UnsafeFile, check_private_folders, make_private_folder, read_private

_DOMAIN = b"fedrec/secagg/v1"
_PUBLIC_NAME = re.compile(r"client-(\d+)\.pub")
_PUBLIC_PEM = b"-----BEGIN PUBLIC KEY-----"


class KeyAuthenticationError(Exception):
    """A peer's round key is missing a valid signature by its registered identity key.

    The verifying client aborts the round: it sends nothing more in it.
    """

    def __init__(self, client_id: int | None, peer_id: int, what: str, reason: str) -> None:
        who = "server" if client_id is None else f"client {client_id}"
        super().__init__(f"{who}: {what} of client {peer_id}: {reason}; aborting this round")
        self.client_id = client_id
        self.peer_id = peer_id


def generate_identity() -> Ed25519PrivateKey:
    """A fresh long-term identity key (from OS entropy)."""
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of the public half."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def save_identity(key: Ed25519PrivateKey, folder: Path, client_id: int) -> tuple[Path, Path]:
    """Write ``client-<id>.key`` and ``client-<id>.pub`` into ``folder``
    (:func:`write_identity`); returns both paths."""
    return write_identity(key, Path(folder), f"client-{client_id}")


def write_identity(key: Ed25519PrivateKey, folder: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.key`` (PKCS#8 PEM, mode 0600, never overwritten) and ``<stem>.pub``
    (SubjectPublicKeyInfo PEM) into ``folder``; returns both paths.

    Raises
    ------
    FileExistsError
        If the private key file already exists (an identity is generated once).
    PermissionError
        (:class:`models.files.UnsafeFile`) If a folder on its way is another user's or
        writable by others; nothing is written.
    """
    private_path = folder / f"{stem}.key"
    public_path = folder / f"{stem}.pub"
    check_private_folders(private_path, "identity key")  # a key others could swap: not made
    make_private_folder(folder)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # O_EXCL: never replace an identity; 0600 from creation, so it is never readable by others
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_identity(path: Path) -> Ed25519PrivateKey:
    """Read a private identity key written by :func:`save_identity`.

    Raises
    ------
    PermissionError
        (:class:`models.files.UnsafeFile`) If the file or a folder on its way is not private
        to this user: see :func:`models.files.read_private`.
    ValueError
        If the file is not an unencrypted Ed25519 private key in PEM.
    """
    path = Path(path)
    try:
        data = read_private(path, "identity key")
    except UnsafeFile:  # the .pub beside the key, given by mistake, is readable by all
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        if _PUBLIC_PEM not in data:
            raise
    if _PUBLIC_PEM in data:
        raise ValueError(
            f"{path} is a public key; an identity is the private key `fedrec keygen` wrote "
            f"beside it ({path.with_suffix('.key').name})"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not an unencrypted private key in PEM ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_registry(folder: Path) -> dict[int, Ed25519PublicKey]:
    """The coordinator's registry: client id -> identity public key, from ``client-<id>.pub``
    files in ``folder``.

    The keys decide whose round keys the server accepts, so each is read only when no one else
    could have put it there (:func:`models.files.read_private` with ``public``: a regular file
    of this user's that only they may write, every folder on its way this user's or root's and
    writable by no one else). Whoever could write the registry could register a key of their
    own for a client and sign round keys as that client: peers that check against the same
    registry (simulated clients) would share masks with them.

    Raises
    ------
    ValueError
        If a file is not an Ed25519 public key in PEM.
    UnsafeFile
        If a file or a folder on its way fails the checks above.
    """
    registry: dict[int, Ed25519PublicKey] = {}
    for path in sorted(Path(folder).iterdir()):
        match = _PUBLIC_NAME.fullmatch(path.name)
        if match is None:
            continue
        data = read_private(path, "registered identity key", public=True)
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, expected an Ed25519 public key")
        registry[int(match.group(1))] = key
    return registry


def signed_message(purpose: bytes, context: bytes, client_id: int, *parts: bytes) -> bytes:
    """What a client signs: a domain tag with the ``purpose`` (e.g. ``b"round-keys"``), the
    round's context (run and round), the client's id and ``parts``, each length-prefixed so no two
    different inputs give the same message."""
    fields = [_DOMAIN, purpose, context, struct.pack(">q", client_id), *parts]
    return b"".join(struct.pack(">I", len(p)) + p for p in fields)


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """An Ed25519 signature (64 bytes)."""
    return key.sign(message)


def verify(
    registry: Mapping[int, Ed25519PublicKey],
    *,
    verifier: int | None,
    signer: int,
    message: bytes,
    signature: bytes | None,
    what: str = "round keys",
) -> None:
    """Check ``signature`` on ``message`` against ``signer``'s registered identity key;
    ``verifier`` is the checking client's id (None for the server); ``what`` names the signed
    thing in the error.

    Raises
    ------
    KeyAuthenticationError
        If the signer has no registered key, the signature is missing, or it does not verify.
    """
    public = registry.get(signer)
    if public is None:
        raise KeyAuthenticationError(verifier, signer, what, "no identity key registered for it")
    if not signature:
        raise KeyAuthenticationError(verifier, signer, what, "no signature")
    try:
        public.verify(signature, message)
    except InvalidSignature as err:
        raise KeyAuthenticationError(
            verifier, signer, what, "signature does not verify against its registered identity key"
        ) from err
