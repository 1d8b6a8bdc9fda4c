"""The words a site's own log gives an answer: read from the bytes sent, the same for a stored
or a deflated answer, with the dtype the wire carries (float32 when narrowed), never a value."""

import io
import json
import os
import re
import zipfile

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


def _with_header(header) -> bytes:
    raw = np.frombuffer(json.dumps(header).encode(), np.uint8)
    return encode_arrays({"items": np.arange(3), "header": raw})


def test_a_header_names_only_the_parts_it_has():
    line = describe_answer(_with_header({"client_id": 2, "metrics": {}, "evaluations": {}}), {})
    assert line == "sent: items int64[3]; fields client_id"

    header = {"metrics": ["sse"], "evaluations": {"test": [], "valid": {}}}
    line = describe_answer(_with_header(header), {})
    assert line == "sent: items int64[3]; evaluation test: nothing; evaluation valid: nothing"


@pytest.mark.parametrize(
    "member", [np.zeros(4, np.float32), np.zeros((2, 2), np.uint8)], ids=["float", "2-d"]
)
def test_a_json_member_that_is_not_a_row_of_bytes_is_refused(member):
    with pytest.raises(ValueError, match=r"member 'header\.npy' is .* not uint8 bytes"):
        describe_answer(encode_arrays({"header": member}), {})


def test_an_array_of_npy_format_2_is_described_like_one_of_format_1():
    stored = io.BytesIO()
    with zipfile.ZipFile(stored, "w") as archive:
        for name, version in (("items", (1, 0)), ("counts", (2, 0))):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.arange(3), version=version)
            archive.writestr(f"{name}.npy", member.getvalue())
    assert describe_answer(stored.getvalue(), {}) == "sent: items int64[3], counts int64[3]"
