"""numpy parses every ``.npy`` header with ``ast.literal_eval``, and on CPython 3.11 two threads
building AST objects at once can fail ("SystemError: AST constructor recursion depth mismatch",
gh-106905): a client task that meets it fails, and a secure-aggregation round goes on without that
client. The readers that run in parallel client tasks hold one lock while numpy parses; a spy on
``ast.literal_eval`` records whether the lock was held at each parse.
"""

from __future__ import annotations

import ast
import io

import numpy as np
import pytest

from models.privacy import wire
from models.protocol import ClientUpdate, answer_arrays, answer_from_arrays
from models.sites.encoding import decode_arrays, encode_arrays


@pytest.fixture
def parses(monkeypatch) -> list[bool]:
    """For each ``ast.literal_eval`` call: whether :data:`wire.NPY_HEADERS` was held."""
    held: list[bool] = []
    original = ast.literal_eval

    def spy(node):
        held.append(wire.NPY_HEADERS.locked())
        return original(node)

    monkeypatch.setattr(ast, "literal_eval", spy)
    return held


def test_a_protocol_payload_is_parsed_under_the_lock(parses):
    payload = wire.pack({"kind": "update", "n": 3}, {"x": np.arange(4.0), "y": np.eye(2)})

    fields, arrays = wire.unpack(payload)

    assert fields == {"kind": "update", "n": 3}
    np.testing.assert_array_equal(arrays["y"], np.eye(2))
    assert len(parses) == 3 and all(parses)  # the JSON member and both arrays
    assert not wire.NPY_HEADERS.locked()


def test_a_kept_answer_file_is_parsed_under_the_lock(parses, tmp_path):
    update = ClientUpdate(2, np.array([1, 4]), np.array([3.0, 1.0]), {"g": np.ones((2, 3))}, {})
    path = tmp_path / "answer.npz"
    np.savez(path, **answer_arrays(update, {}))

    kept, _ = answer_from_arrays(wire.read_npz(path))

    np.testing.assert_array_equal(kept.arrays["g"], np.ones((2, 3)))
    np.testing.assert_array_equal(kept.items, [1, 4])
    assert len(parses) == 4 and all(parses)  # header, items, counts, g


def test_a_site_payload_is_parsed_under_the_lock(parses):
    data = encode_arrays({"x": np.arange(5.0), "n": np.array([7])})

    arrays = decode_arrays(data, max_bytes=10_000)

    np.testing.assert_array_equal(arrays["x"], np.arange(5.0))
    assert parses and all(parses)


def test_the_lock_is_released_when_the_payload_is_not_an_archive():
    with pytest.raises(ValueError, match="not a fedrec protocol payload"):
        wire.unpack(b"not an npz")
    assert not wire.NPY_HEADERS.locked()
    assert wire.read_npz(io.BytesIO(wire.pack({"a": 1})))  # and can be taken again
