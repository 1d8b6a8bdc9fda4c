"""A site's answer sealed to the coordinator of one run, so that only that coordinator reads it.

The artifact store is shared: without per-site permissions every site (and anyone who can read
the MLflow server) can fetch every file in it. Signatures pin who wrote an answer, not who can
read it. So each run's coordinator draws a fresh X25519 key pair from the operating system's
entropy (:func:`new_answer_key`), keeps the private half in memory only, and names the public
half in every request it signs (``answer_key``): a substituted key breaks the signature. The
site seals its answer's arrays and info to that key (ECIES: an ephemeral X25519 key of its own,
HKDF-SHA256 over the shared secret, AES-256-GCM); the sealed bytes are what it uploads and what
its signed answer's sha256 pins.

The associated data is the request the answer belongs to (run, site, kind, phase, round, label,
nonce): a sealed answer moved to another request does not open. When the run ends the private
key is gone with the coordinator's process, so kept exchange files (``--keep-workspace``) stay
unreadable by everyone, the coordinator included.

Layout: ``MAGIC | ephemeral public key (32) | GCM nonce (12) | ciphertext + tag (16)``, and the
plaintext is ``len(info JSON) as 4 bytes big-endian | info JSON | npz``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from models.sites.messages import RefusedMessage, RoundAnswer, RoundRequest, canonical

MAGIC = b"fedrec-sealed-v1"
_KEY, _NONCE, _TAG, _LENGTH = 32, 12, 16, 4
OVERHEAD = len(MAGIC) + _KEY + _NONCE + _TAG + _LENGTH  # bytes beyond the npz and its info
MAX_INFO_BYTES = 16 * 1024  # an answer's info is a few numbers; its length is checked unparsed


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def new_answer_key() -> X25519PrivateKey:
    """A run's answer key: fresh from the operating system's entropy, never written anywhere."""
    return X25519PrivateKey.generate()


def answer_key_field(key: X25519PrivateKey) -> str:
    """The request field naming ``key``'s public half (base64 of its 32 raw bytes)."""
    return base64.b64encode(_raw(key.public_key())).decode()


def parse_answer_key(text: Any) -> X25519PublicKey:
    """The public key a request's ``answer_key`` names.

    Raises
    ------
    RefusedMessage
        If it is not base64 of 32 bytes.
    """
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _KEY:
        raise RefusedMessage("request answer_key must be base64 of a 32-byte X25519 public key")
    return X25519PublicKey.from_public_bytes(raw)


def sealing_context(request: RoundRequest | RoundAnswer) -> bytes:
    """The associated data of the answer to ``request`` (or of ``answer``, which names the same
    fields): what it answers, nothing else."""
    named = ("run", "site", "kind", "phase", "round", "label", "nonce")
    return canonical({name: getattr(request, name) for name in named})


def _cipher(shared: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"fedrec/sites/v1 answer" + ephemeral + recipient,
    ).derive(shared)
    return AESGCM(key)


def seal_answer(
    data: bytes, info: Mapping[str, Any], recipient: X25519PublicKey, context: bytes
) -> bytes:
    """``data`` (an npz) and ``info`` sealed to ``recipient`` for the request ``context``."""
    note = canonical(dict(info))
    if len(note) > MAX_INFO_BYTES:
        raise ValueError(f"answer info of {len(note)} bytes, the limit is {MAX_INFO_BYTES}")
    plain = len(note).to_bytes(_LENGTH, "big") + note + data
    ephemeral = X25519PrivateKey.generate()
    mine, theirs = _raw(ephemeral.public_key()), _raw(recipient)
    nonce = os.urandom(_NONCE)
    sealed = _cipher(ephemeral.exchange(recipient), mine, theirs).encrypt(nonce, plain, context)
    return MAGIC + mine + nonce + sealed


def open_answer(
    sealed: bytes, key: X25519PrivateKey, context: bytes
) -> tuple[bytes, dict[str, Any]]:
    """The npz bytes and info of an answer sealed to ``key`` for the request ``context``.

    Raises
    ------
    RefusedMessage
        If the bytes are not a sealed answer, were sealed to another key or for another
        request, or were altered.
    """
    head = len(MAGIC) + _KEY + _NONCE
    if len(sealed) < head + _TAG + _LENGTH or not sealed.startswith(MAGIC):
        raise RefusedMessage("answer is not sealed to this run's answer key (no sealed header)")
    ephemeral = sealed[len(MAGIC) : len(MAGIC) + _KEY]
    nonce = sealed[len(MAGIC) + _KEY : head]
    try:
        peer = X25519PublicKey.from_public_bytes(ephemeral)
        cipher = _cipher(key.exchange(peer), ephemeral, _raw(key.public_key()))
        plain = cipher.decrypt(nonce, sealed[head:], context)
    except (InvalidTag, ValueError) as err:
        raise RefusedMessage(
            "answer does not open with this run's answer key (sealed to another key, for "
            "another request, or altered)"
        ) from err
    length = int.from_bytes(plain[:_LENGTH], "big")
    if _LENGTH + length > len(plain):
        raise RefusedMessage("sealed answer's info is longer than the answer")
    if length > MAX_INFO_BYTES:  # before parsing: a site's own file could hold the coordinator
        raise RefusedMessage(
            f"sealed answer's info of {length} bytes, the limit is {MAX_INFO_BYTES}"
        )
    try:
        info = json.loads(plain[_LENGTH : _LENGTH + length])
    except RecursionError:
        raise RefusedMessage("sealed answer's info is nested too deeply") from None
    except ValueError as err:
        raise RefusedMessage(f"sealed answer's info is not JSON: {err}") from err
    if not isinstance(info, dict):
        raise RefusedMessage("sealed answer's info must be an object")
    return plain[_LENGTH + length :], info
