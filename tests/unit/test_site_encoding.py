"""The site payload encoding: exact or bounded round trips, and refusal of every unsafe payload.

Oracles independent of the code under test: archives built by hand with ``zipfile`` and ``.npy``
headers written byte by byte, values packed with ``struct``, float32 rounding bounded by its
machine epsilon, and memory measured with ``tracemalloc``.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

from models.protocol import ClientUpdate, answer_arrays, answer_from_arrays
from models.sites.encoding import NARROWED, EncodingError, decode_arrays, encode_arrays

CAP = 10_000_000
RAN: list[str] = []


def _record_ran() -> None:
    RAN.append("unpickled")


class _Evil:
    def __reduce__(self):
        return (_record_ran, ())


def npy(descr: str, shape: tuple[int, ...], data: bytes, version: int = 1) -> bytes:
    """A version 1.0 (or 2.0: a 4-byte header length) ``.npy`` file written from the format's
    specification."""
    shape_text = "(" + "".join(f"{n}," for n in shape) + ")" if shape else "()"
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}"
    length = (10 if version == 1 else 12) + len(text) + 1
    padding = -length % 64
    header = (text + " " * padding + "\n").encode("latin1")
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + data


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


# --- reading archives built by hand ---------------------------------------------------------------


def test_reads_a_hand_built_archive_with_its_dtypes_and_values():
    data = zip_of({
        "ratings.npy": npy("<f8", (3,), struct.pack("<3d", 1.5, -2.25, 1e300)),
        "items.npy": npy("<i8", (2,), struct.pack("<2q", 2**62 + 1, -7)),
        "counts.npy": npy("<u4", (2, 2), struct.pack("<4I", 1, 2, 3, 4)),
        "weights.npy": npy("<f4", (2,), struct.pack("<2f", 0.5, 0.25)),
        "big_endian.npy": npy(">f8", (1,), struct.pack(">d", 3.75)),
        "flag.npy": npy("|b1", (), b"\x01"),
    })  # fmt: skip

    arrays = decode_arrays(data, max_bytes=CAP)

    assert arrays["ratings"].dtype == np.float64
    assert arrays["ratings"].tolist() == [1.5, -2.25, 1e300]
    assert arrays["items"].dtype == np.int64
    assert arrays["items"].tolist() == [2**62 + 1, -7]
    assert arrays["counts"].dtype == np.uint32 and arrays["counts"].tolist() == [[1, 2], [3, 4]]
    assert arrays["weights"].dtype == np.float32  # not listed as narrowed: kept as sent
    assert arrays["weights"].tolist() == [0.5, 0.25]
    assert arrays["big_endian"].dtype == np.float64 and arrays["big_endian"].dtype.isnative
    assert arrays["big_endian"].tolist() == [3.75]
    assert arrays["flag"].dtype == np.bool_ and bool(arrays["flag"]) is True


def test_reads_npy_format_version_2_and_refuses_version_3():
    values = struct.pack("<2d", 0.5, -3.0)
    data = zip_of({"v2.npy": npy("<f8", (2,), values, version=2)})
    assert decode_arrays(data, max_bytes=CAP)["v2"].tolist() == [0.5, -3.0]
    v3 = npy("<f8", (2,), values, version=2).replace(b"NUMPY\x02", b"NUMPY\x03", 1)
    with pytest.raises(EncodingError, match=r"format version \(3, 0\); allowed 1\.0, 2\.0"):
        decode_arrays(zip_of({"v3.npy": v3}), max_bytes=CAP)


def test_a_pickle_inside_an_npz_is_refused_and_never_run():
    pickled = pickle.dumps(_Evil(), protocol=2)
    member = npy("|O", (1,), pickled)  # what np.save writes for an object array
    raw = pickle.dumps({"x": _Evil()})  # and a bare pickle posing as an array
    RAN.clear()

    for data in (zip_of({"x.npy": member}), zip_of({"x.npy": raw})):
        with pytest.raises(EncodingError, match="'x'"):
            decode_arrays(data, max_bytes=CAP)

    assert RAN == []


def test_an_object_array_is_refused_both_ways():
    values = np.array([{"a": 1}, None], dtype=object)
    out = io.BytesIO()
    np.savez(out, x=values)  # numpy itself pickles object arrays into the archive

    with pytest.raises(EncodingError, match="dtype object"):
        decode_arrays(out.getvalue(), max_bytes=CAP)
    with pytest.raises(EncodingError, match="dtype object"):
        encode_arrays({"x": values})


@pytest.mark.parametrize("descr", ["<U3", "|S3", "<c16", "|V8", "<M8[s]"])
def test_non_numeric_dtypes_are_refused(descr):
    data = zip_of({"x.npy": npy(descr, (1,), bytes(np.dtype(descr).itemsize))})

    with pytest.raises(EncodingError, match="allowed: bool, integer or float"):
        decode_arrays(data, max_bytes=CAP)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_both_ways(bad):
    data = zip_of({"x.npy": npy("<f8", (2,), struct.pack("<2d", 1.0, bad))})

    with pytest.raises(EncodingError, match="non-finite"):
        decode_arrays(data, max_bytes=CAP)
    with pytest.raises(EncodingError, match="non-finite"):
        encode_arrays({"x": np.array([1.0, bad])})
    with pytest.raises(EncodingError, match="non-finite"):
        decode_arrays(zip_of({"x.npy": npy("<f4", (1,), struct.pack("<f", bad))}), max_bytes=CAP)


def test_a_zip_bomb_is_refused_before_it_is_inflated():
    n = 100_000_000 // 8  # 100 MB of zeros, about 100 KB deflated
    out = io.BytesIO()
    archive = zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED)
    with archive, archive.open("x.npy", "w") as member:
        member.write(npy("<f8", (n,), b""))
        for _ in range(100):
            member.write(bytes(1_000_000))
    data = out.getvalue()
    assert len(data) < 1_000_000

    tracemalloc.start()
    try:
        with pytest.raises(EncodingError, match="declares 100000"):
            decode_arrays(data, max_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 5_000_000


def test_a_zip_that_lies_about_its_sizes_is_refused_without_inflating_past_them():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy("<f8", (4_000_000,), bytes(32_000_000)))
    data = bytearray(out.getvalue())
    # Rewrite the central directory's uncompressed size (offset 24 of its entry) to 200 bytes.
    entry = data.rfind(b"PK\x01\x02")
    assert struct.unpack_from("<I", data, entry + 24)[0] > 32_000_000
    struct.pack_into("<I", data, entry + 24, 200)

    tracemalloc.start()
    try:
        with pytest.raises(EncodingError, match="'x'"):
            decode_arrays(bytes(data), max_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 5_000_000


def test_a_header_that_promises_more_data_than_the_member_holds_is_refused():
    member = npy("<f8", (10**12,), struct.pack("<d", 1.0))  # would allocate 8 TB if trusted

    with pytest.raises(EncodingError, match="declares shape"):
        decode_arrays(zip_of({"x.npy": member}), max_bytes=CAP)


def test_oversize_payloads_are_refused():
    data = encode_arrays({"x": np.zeros(1000)})

    with pytest.raises(EncodingError, match=f"payload of {len(data)} bytes exceeds"):
        decode_arrays(data, max_bytes=len(data) - 1)
    compressed = encode_arrays({"x": np.zeros(1000)}, compress=True)
    assert len(compressed) < 1000
    with pytest.raises(EncodingError, match="declares"):
        decode_arrays(compressed, max_bytes=1000)
    assert decode_arrays(data, max_bytes=len(data))["x"].shape == (1000,)
    declared = sum(info.file_size for info in zipfile.ZipFile(io.BytesIO(compressed)).infolist())
    assert decode_arrays(compressed, max_bytes=declared)["x"].shape == (1000,)  # at the cap


def test_malformed_archives_are_refused_with_one_line():
    cases = {
        b"not a zip at all": "not an npz archive",
        zip_of({"x.txt": npy("<f8", (0,), b"")}): "not a named .npy array",
        zip_of({"../x.npy": npy("<f8", (0,), b"")}): "not a named .npy array",
        zip_of({"x.npy": b"\x93NUMPY\x09\x00garbage"}): "'x'",
        zip_of({"x.npy": npy("<f8", (1,), bytes(8))}, zipfile.ZIP_BZIP2): "compression",
    }
    for data, message in cases.items():
        with pytest.raises(EncodingError, match=message) as caught:
            decode_arrays(data, max_bytes=CAP)
        assert "\n" not in str(caught.value)


def _with_flag_bits(data: bytes, bits: int) -> bytes:
    """``data`` (a zip of one member) with ``bits`` set in the member's general purpose flags,
    in its local header (offset 6) and its central directory entry (offset 8)."""
    out = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = out.index(signature) + offset
        out[at : at + 2] = struct.pack("<H", struct.unpack("<H", out[at : at + 2])[0] | bits)
    return bytes(out)


def test_an_encrypted_member_is_refused_and_other_flags_are_not():
    data = zip_of({"x.npy": npy("<f8", (1,), struct.pack("<d", 2.5))})
    with pytest.raises(EncodingError, match=r"payload member 'x\.npy' is encrypted"):
        decode_arrays(_with_flag_bits(data, 0x1), max_bytes=CAP)
    # bit 1 is a deflate speed option (ignored for a stored member), no reason to refuse
    assert decode_arrays(_with_flag_bits(data, 0x2), max_bytes=CAP)["x"].tolist() == [2.5]


def test_a_narrowed_listing_must_name_float32_arrays_it_holds():
    listing = json.dumps(["x"]).encode()
    listed = npy("|u1", (len(listing),), listing)

    integer = zip_of({"x.npy": npy("<i8", (1,), struct.pack("<q", 3)), f"{NARROWED}.npy": listed})
    with pytest.raises(EncodingError, match="not float32"):
        decode_arrays(integer, max_bytes=CAP)
    with pytest.raises(EncodingError, match="does not hold"):
        decode_arrays(zip_of({f"{NARROWED}.npy": listed}), max_bytes=CAP)
    x32 = npy("<f4", (1,), struct.pack("<f", 0.1))
    for other in ({"x": 1}, "x", [1], ["x", 1]):  # names as an object, a string, not strings
        text = json.dumps(other).encode()
        data = zip_of({"x.npy": x32, f"{NARROWED}.npy": npy("|u1", (len(text),), text)})
        with pytest.raises(EncodingError, match="list is not a list of names"):
            decode_arrays(data, max_bytes=CAP)
    widened = zip_of({"x.npy": npy("<f4", (1,), struct.pack("<f", 0.1)), f"{NARROWED}.npy": listed})
    x = decode_arrays(widened, max_bytes=CAP)["x"]
    assert x.dtype == np.float64 and x[0] == struct.unpack("<f", struct.pack("<f", 0.1))[0]


# --- round trips ----------------------------------------------------------------------------------


def _mixed(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "array.gram": rng.normal(size=(50, 561)) * 10.0 ** rng.integers(-30, 30, size=(50, 1)),
        "items": np.sort(rng.choice(2**40, size=50, replace=False)).astype(np.int64),
        "counts": rng.integers(1, 1000, size=50),
        "header": np.frombuffer(b'{"client_id": 3}', np.uint8),
        "global_mean": np.array(3.58),
        "round": np.array(7),
        "flag": np.array([True, False]),
        "f32": rng.normal(size=4).astype(np.float32),
        "empty": np.zeros((0, 3)),
        "fortran": np.asfortranarray(rng.normal(size=(3, 4))),  # written with fortran_order True
    }


@pytest.mark.parametrize("compress", [False, True])
def test_float64_round_trip_is_bit_exact(compress):
    arrays = _mixed(np.random.default_rng(0))

    back = decode_arrays(encode_arrays(arrays, compress=compress), max_bytes=CAP)

    assert set(back) == set(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype, name
        assert back[name].shape == value.shape, name
        assert back[name].tobytes() == value.tobytes(), name
        assert back[name].flags.writeable, name


@pytest.mark.parametrize("compress", [False, True])
def test_float32_round_trip_is_within_float32_epsilon_and_keeps_integers(compress):
    arrays = _mixed(np.random.default_rng(1))

    data = encode_arrays(arrays, precision="float32", compress=compress)
    back = decode_arrays(data, max_bytes=CAP)

    eps = 2.0**-23  # float32's machine epsilon, written down independently of numpy
    for name in ("array.gram", "global_mean", "empty"):
        value = arrays[name]
        assert back[name].dtype == np.float64 and back[name].shape == value.shape
        assert np.all(np.abs(back[name] - value) <= eps * np.abs(value)), name
    assert np.any(back["array.gram"] != arrays["array.gram"])  # it was really narrowed
    for name in ("items", "counts", "header", "round", "flag", "f32"):
        assert back[name].dtype == arrays[name].dtype, name
        assert back[name].tobytes() == arrays[name].tobytes(), name
    if not compress:
        full = len(encode_arrays(arrays))
        assert len(data) < 0.55 * full  # the float64 bulk is stored in half the bytes


def test_float32_refuses_values_it_cannot_represent():
    with pytest.raises(EncodingError, match="beyond the float32 range"):
        encode_arrays({"x": np.array([1.0, 1e39])}, precision="float32")
    assert decode_arrays(encode_arrays({"x": np.array([1e39])}), max_bytes=CAP)["x"][0] == 1e39
    largest = float(np.finfo(np.float32).max)  # the largest float32 itself is representable
    data = encode_arrays({"x": np.array([-largest, largest])}, precision="float32")
    assert decode_arrays(data, max_bytes=CAP)["x"].tolist() == [-largest, largest]


def test_a_client_answer_survives_the_compact_encoding():
    rng = np.random.default_rng(2)
    update = ClientUpdate(
        4,
        np.array([3, 9, 11], dtype=np.int64),
        np.array([5, 1, 2], dtype=np.int64),
        {"gram": rng.normal(size=(3, 6)), "rhs": rng.normal(size=(3, 3))},
        {"train_sse": 12.5, "train_n": 8.0},
    )
    recommended = np.array([0, 2, 1, 0], dtype=np.int64)
    evaluations = {"valid": ({"sse": 1.25, "n": 4.0}, recommended)}

    data = encode_arrays(answer_arrays(update, evaluations), precision="float32", compress=True)
    back, back_evaluations = answer_from_arrays(decode_arrays(data, max_bytes=CAP))

    assert back.client_id == 4 and back.metrics == update.metrics
    assert back.items.tolist() == [3, 9, 11] and back.counts.tolist() == [5, 1, 2]
    for name in ("gram", "rhs"):
        error = np.abs(back.arrays[name] - update.arrays[name])
        assert np.all(error <= 2.0**-23 * np.abs(update.arrays[name]))
    assert back_evaluations["valid"][0] == {"sse": 1.25, "n": 4.0}
    assert back_evaluations["valid"][1].tolist() == recommended.tolist()


@pytest.mark.parametrize(
    ("arrays", "options", "message"),
    [
        ({"a/b": np.zeros(1)}, {}, "name"),
        ({"": np.zeros(1)}, {}, "name"),
        ({NARROWED: np.zeros(1)}, {}, "name"),
        ({"x": np.zeros(1)}, {"precision": "float16"}, "precision"),
    ],
)
def test_bad_encode_requests_are_refused(arrays, options, message):
    with pytest.raises(EncodingError, match=message):
        encode_arrays(arrays, **options)


def test_max_bytes_must_be_a_positive_integer():
    with pytest.raises(EncodingError, match="max_bytes"):
        decode_arrays(encode_arrays({"x": np.zeros(1)}), max_bytes=0)
