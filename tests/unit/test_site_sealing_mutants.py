"""The sealed answer's wire format against an implementation of its documented layout written
here from the primitives: ``MAGIC | ephemeral X25519 key (32) | GCM nonce (12) | ciphertext and
tag (16)``, the key from HKDF-SHA256 over the shared secret, and a plaintext of ``len(info) as 4
bytes big-endian | info JSON | npz``. A site and a coordinator of different versions must agree on
every byte of it, which a round trip through the module alone does not show."""

import json
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from models.sites.messages import RefusedMessage
from models.sites.sealing import (
    MAGIC,
    new_answer_key,
    open_answer,
    parse_answer_key,
    seal_answer,
)

KEY = new_answer_key()
CONTEXT = b'{"kind":"train","label":"","nonce":"01","phase":"train","round":3,"run":"r","site":"a"}'
DATA = b"PK\x03\x04 an npz's bytes" * 20
INFO = {"n_users": 12, "seconds": 0.25}


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _aead(shared: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None,
        info=b"fedrec/sites/v1 answer" + ephemeral + recipient,
    ).derive(shared)  # fmt: skip
    return AESGCM(key)


def _reference_open(sealed: bytes, key: X25519PrivateKey, context: bytes) -> tuple[bytes, dict]:
    assert sealed[: len(MAGIC)] == MAGIC
    rest = sealed[len(MAGIC) :]
    ephemeral, nonce, body = rest[:32], rest[32:44], rest[44:]
    shared = key.exchange(X25519PublicKey.from_public_bytes(ephemeral))
    plain = _aead(shared, ephemeral, _raw(key.public_key())).decrypt(nonce, body, context)
    length = int.from_bytes(plain[:4], "big")
    return plain[4 + length :], json.loads(plain[4 : 4 + length])


def _reference_seal(data: bytes, info: dict, recipient: X25519PublicKey, context: bytes) -> bytes:
    note = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
    ephemeral = X25519PrivateKey.generate()
    mine = _raw(ephemeral.public_key())
    nonce = os.urandom(12)
    plain = len(note).to_bytes(4, "big") + note + data
    body = _aead(ephemeral.exchange(recipient), mine, _raw(recipient)).encrypt(
        nonce, plain, context
    )
    return MAGIC + mine + nonce + body


def test_a_sealed_answer_opens_by_its_documented_layout():
    sealed = seal_answer(DATA, INFO, KEY.public_key(), CONTEXT)

    assert _reference_open(sealed, KEY, CONTEXT) == (DATA, INFO)
    # nothing after the GCM tag: the ciphertext is exactly as long as the plaintext
    note = json.dumps(INFO, sort_keys=True, separators=(",", ":")).encode()
    assert len(sealed) == len(MAGIC) + 32 + 12 + 4 + len(note) + len(DATA) + 16


def test_an_answer_sealed_by_the_documented_layout_opens():
    sealed = _reference_seal(DATA, INFO, KEY.public_key(), CONTEXT)

    assert open_answer(sealed, KEY, CONTEXT) == (DATA, INFO)


@pytest.mark.parametrize("info", [{}, {"note": "x" * 300}])
def test_info_of_any_length_and_an_empty_npz_open_by_the_documented_layout(info):
    sealed = seal_answer(b"", info, KEY.public_key(), CONTEXT)

    assert _reference_open(sealed, KEY, CONTEXT) == (b"", info)
    assert open_answer(_reference_seal(b"", info, KEY.public_key(), CONTEXT), KEY, CONTEXT) == (
        b"",
        info,
    )


def test_the_shortest_sealed_answer_opens_and_one_byte_less_is_refused():
    """The smallest well-formed answer (empty info and npz is 6 plaintext bytes: ``{}`` and its
    length) opens; a header without a whole tag and length does not."""
    sealed = _reference_seal(b"", {}, KEY.public_key(), CONTEXT)
    assert open_answer(sealed, KEY, CONTEXT) == (b"", {})
    too_short = MAGIC + bytes(32 + 12 + 16 + 4 - 1)
    with pytest.raises(RefusedMessage, match="no sealed header"):
        open_answer(too_short, KEY, CONTEXT)


def test_a_sealed_length_beyond_the_plaintext_or_info_that_is_not_an_object_is_refused():
    recipient = KEY.public_key()

    def sealed_plain(plain: bytes) -> bytes:
        ephemeral = X25519PrivateKey.generate()
        mine, nonce = _raw(ephemeral.public_key()), os.urandom(12)
        aead = _aead(ephemeral.exchange(recipient), mine, _raw(recipient))
        return MAGIC + mine + nonce + aead.encrypt(nonce, plain, CONTEXT)

    with pytest.raises(RefusedMessage, match="info is longer than the answer"):
        open_answer(sealed_plain((3).to_bytes(4, "big") + b"{}"), KEY, CONTEXT)
    # a length that exactly covers the plaintext is fine: info with no npz after it
    assert open_answer(sealed_plain((2).to_bytes(4, "big") + b"{}"), KEY, CONTEXT) == (b"", {})
    with pytest.raises(RefusedMessage, match="info must be an object"):
        open_answer(sealed_plain((2).to_bytes(4, "big") + b"[]"), KEY, CONTEXT)
    with pytest.raises(RefusedMessage, match="info is not JSON"):
        open_answer(sealed_plain((2).to_bytes(4, "big") + b"{x"), KEY, CONTEXT)


def test_an_answer_key_of_32_bytes_of_base64_names_that_public_key():
    import base64

    raw = _raw(KEY.public_key())

    assert _raw(parse_answer_key(base64.b64encode(raw).decode())) == raw
