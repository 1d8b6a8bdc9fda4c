"""The words a site's own log gives an answer: read from the bytes sent, the same for a stored
or a deflated answer, with the dtype the wire carries (float32 when narrowed), never a value."""

import os
import re

import numpy as np
import pytest

from models.privacy.secagg_plus import KeyAdvertisement, MaskedInput
from models.protocol import ClientUpdate
from models.sites.contents import describe_answer
from models.sites.encoding import encode_arrays
from models.sites.schema import wire_arrays

UPDATE = ClientUpdate(
    7,
    np.arange(5),
    np.array([3, 1, 4, 1, 5]),
    {"gram": np.full((5, 6), 0.123456), "rhs": np.full((5, 3), 9.87)},
    {"train_sse": 12.5, "train_n": 31.0},
)
EVALUATIONS = {"valid": ({"sse": 2.25, "n": 9.0}, np.array([0, 2, 0, 1, 0, 0]))}


@pytest.mark.parametrize("compress", [False, True])
def test_an_answer_is_described_by_its_arrays_headers_and_its_fields_names(compress):
    data = encode_arrays(wire_arrays(UPDATE, EVALUATIONS), precision="float32", compress=compress)
    line = describe_answer(data, {"seconds": 0.75})
    assert line == (
        "sent: items int64[5], counts int64[5], array.gram float32[5x6], array.rhs float32[5x3], "
        "recommended.0 int64[6]; fields client_id; metrics train_sse, train_n; "
        "evaluation valid: sse, n; info seconds"
    )


@pytest.mark.parametrize("compress", [False, True])
def test_a_secure_step_is_described_by_its_message(compress):
    vector = np.arange(1000, 1040, dtype=np.uint64)
    for message, words in [
        (MaskedInput(3, vector), "masked-input message: vector uint64[40], fields client_id"),
        (
            KeyAdvertisement(3, os.urandom(32), os.urandom(32), os.urandom(64)),
            "advertise-keys message, fields client_id, c_public, s_public, signature",
        ),
    ]:
        raw = message.to_bytes()
        data = encode_arrays({"message": np.frombuffer(raw, np.uint8)}, compress=compress)
        line = describe_answer(data, {"seconds": 0.01})
        assert line == f"sent: message uint8[{len(raw)}] ({words}); info seconds"
        assert not re.search(r"\d", re.sub(r"uint(8|64)\[\d+\]", "", line))


def test_bytes_that_are_not_an_npz_are_refused():
    with pytest.raises(ValueError, match="not an npz archive"):
        describe_answer(b"not a zip", {})
