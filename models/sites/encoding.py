"""The bytes of the arrays a site sends or receives, and their checked reading.

A payload is an ``.npz`` archive (``np.savez`` or ``np.savez_compressed``) of numeric arrays:
booleans, integers and floats, never objects, never a pickle. ``precision="float32"`` stores
every float64 array as float32 (half the bytes, a relative rounding error below float32's
epsilon, 2**-24 per number); the archive lists which arrays were narrowed, and reading widens
exactly those back to float64, so every other array (integers, bool, arrays that were float32
already) comes back with its own dtype and its exact values.

Reading trusts nothing in the bytes: the archive's size, the uncompressed sizes its directory
declares (checked before anything is inflated, so a small zip that would inflate to gigabytes
is refused unread), each member's ``.npy`` header against those sizes, the dtypes and the
finiteness of every float are all checked, and each array is built from its checked header
and its raw bytes (no unpickling is possible: object dtypes are refused before any data is read).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping
from typing import Literal

import numpy as np

from models.privacy.wire import NPY_HEADERS

Precision = Literal["float64", "float32"]
PRECISIONS: tuple[Precision, ...] = ("float64", "float32")

# Archive member listing the arrays stored as float32 that were float64 (JSON, uint8).
NARROWED = "__narrowed__"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_KINDS = frozenset("biuf")  # bool, signed and unsigned integers, floats
# Members np.savez writes: stored or deflated. Others (bzip2, lzma) are refused: zipfile inflates
# them without an output bound per read.
_COMPRESSIONS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_MAX_MEMBERS = 4096
_HEADER_READERS = {  # .npy format version -> numpy's reader of that version's header
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_MAX_HEADER = 10_000  # bytes of one .npy header (numpy's own default limit)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class EncodingError(ValueError):
    """Arrays that cannot be encoded, or bytes that are not an acceptable payload."""


def encode_arrays(
    arrays: Mapping[str, np.ndarray],
    *,
    precision: Precision = "float64",
    compress: bool = False,
) -> bytes:
    """Named numeric arrays as ``.npz`` bytes.

    Parameters
    ----------
    arrays : mapping of str to ndarray
        Names of 1-128 characters from ``[A-Za-z0-9_.-]``; bool, integer or float arrays with
        finite values.
    precision : {"float64", "float32"}
        ``float32`` stores every float64 array as float32; other arrays are stored as they are.
    compress : bool
        Deflate the members (``np.savez_compressed``).

    Returns
    -------
    bytes

    Raises
    ------
    EncodingError
        On a bad name, a non-numeric dtype, a non-finite value, or a float64 value beyond the
        float32 range with ``precision="float32"``.
    """
    if precision not in PRECISIONS:
        raise EncodingError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    payload: dict[str, np.ndarray] = {}
    narrowed: list[str] = []
    for name, value in arrays.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == NARROWED:
            raise EncodingError(
                f"array name {name!r} is not allowed: 1-128 characters of [A-Za-z0-9_.-], "
                f"not {NARROWED!r}"
            )
        array = np.asarray(value)
        _check_values(name, array)
        if precision == "float32" and array.dtype == np.float64:
            if array.size and float(np.max(np.abs(array))) > _FLOAT32_MAX:
                raise EncodingError(f"array {name!r} has values beyond the float32 range")
            array = array.astype(np.float32)
            narrowed.append(name)
        payload[name] = array
    if narrowed:
        payload[NARROWED] = np.frombuffer(json.dumps(narrowed).encode(), np.uint8)
    out = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(out, **payload)
    return out.getvalue()


def decode_arrays(data: bytes, *, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of an :func:`encode_arrays` payload (or any plain numeric ``.npz``), checked.

    Parameters
    ----------
    data : bytes
    max_bytes : int
        Cap on the payload's length and, separately, on the sum of its members' uncompressed
        sizes.

    Returns
    -------
    dict of str to ndarray
        Arrays the payload lists as narrowed come back as float64; the others keep their dtype.

    Raises
    ------
    EncodingError
        If the bytes are not a zip of ``.npy`` members, are larger than ``max_bytes`` packed or
        unpacked, hold an object array, a pickle, a non-numeric dtype or a non-finite float, or
        list a narrowed array that is not float32.
    """
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise EncodingError(f"max_bytes {max_bytes!r} must be a positive integer")
    if len(data) > max_bytes:
        raise EncodingError(f"payload of {len(data)} bytes exceeds the cap of {max_bytes} bytes")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise EncodingError(f"payload is not an npz archive: {err}") from err
    with archive:
        members = _check_directory(archive.infolist(), max_bytes)
        arrays = {name: _read_member(archive, info, name) for name, info in members.items()}
    narrowed = _narrowed_names(arrays)
    for name in narrowed:
        if arrays[name].dtype != np.float32:
            raise EncodingError(
                f"array {name!r} is listed as narrowed but is {arrays[name].dtype}, not float32"
            )
        arrays[name] = arrays[name].astype(np.float64)
    return arrays


def _check_values(name: str, array: np.ndarray) -> None:
    if array.dtype.hasobject or array.dtype.kind not in _KINDS or array.dtype.fields:
        raise EncodingError(
            f"array {name!r} has dtype {array.dtype}; allowed: bool, integer or float arrays"
        )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise EncodingError(f"array {name!r} has non-finite values (NaN or infinity)")


def _check_directory(infos: list[zipfile.ZipInfo], max_bytes: int) -> dict[str, zipfile.ZipInfo]:
    """The members by array name, after checking what the zip directory declares."""
    if len(infos) > _MAX_MEMBERS:
        raise EncodingError(f"payload has {len(infos)} members, more than {_MAX_MEMBERS}")
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise EncodingError(
            f"payload declares {declared} uncompressed bytes, more than the cap of {max_bytes}"
        )
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename.removesuffix(".npy")
        if not info.filename.endswith(".npy") or not (_NAME.fullmatch(name) or name == NARROWED):
            raise EncodingError(f"payload member {info.filename!r} is not a named .npy array")
        if name in members:
            raise EncodingError(f"payload holds array {name!r} twice")
        if info.compress_type not in _COMPRESSIONS:
            raise EncodingError(
                f"payload member {info.filename!r} uses compression {info.compress_type}; "
                "allowed: stored or deflated"
            )
        if info.flag_bits & 0x1:
            raise EncodingError(f"payload member {info.filename!r} is encrypted")
        members[name] = info
    return members


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> np.ndarray:
    """One ``.npy`` member, its header checked against its declared size before its data is read."""
    try:
        with archive.open(info) as stream:
            raw = stream.read(info.file_size + 1)  # zipfile never inflates past the declared size
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # CRC, truncation, inflate
        raise EncodingError(f"array {name!r} cannot be read: {err}") from err
    if len(raw) != info.file_size:
        raise EncodingError(
            f"array {name!r} holds {len(raw)} bytes, its directory entry says {info.file_size}"
        )
    fp = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(fp)
        if version not in _HEADER_READERS:
            raise EncodingError(
                f"array {name!r} has .npy format version {version}; allowed 1.0, 2.0"
            )
        with NPY_HEADERS:
            header = _HEADER_READERS[version](fp, max_header_size=_MAX_HEADER)
    except ValueError as err:
        if isinstance(err, EncodingError):
            raise
        raise EncodingError(f"array {name!r} has no valid .npy header: {err}") from err
    shape, fortran_order, dtype = header
    if dtype.hasobject or dtype.kind not in _KINDS or dtype.fields:
        raise EncodingError(
            f"array {name!r} has dtype {dtype}; allowed: bool, integer or float arrays"
        )
    count = int(np.prod(shape, dtype=object))
    expected = count * dtype.itemsize
    if expected != len(raw) - fp.tell():
        raise EncodingError(
            f"array {name!r} declares shape {shape} of {dtype} ({expected} bytes) but holds "
            f"{len(raw) - fp.tell()} bytes of data"
        )
    # the data as the header describes it, copied out of the member's bytes (a writable array)
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=fp.tell())
    array = array.reshape(shape, order="F" if fortran_order else "C").copy()
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if name != NARROWED:
        _check_values(name, array)
    return array


def _narrowed_names(arrays: dict[str, np.ndarray]) -> list[str]:
    """The names listed in the payload's :data:`NARROWED` member (removed from ``arrays``)."""
    listing = arrays.pop(NARROWED, None)
    if listing is None:
        return []
    try:
        names = json.loads(listing.astype(np.uint8, casting="safe").tobytes().decode())
    except RecursionError:
        raise EncodingError(f"the payload's {NARROWED!r} list is nested too deeply") from None
    except (TypeError, ValueError, UnicodeDecodeError) as err:
        raise EncodingError(f"the payload's {NARROWED!r} list is not a JSON list: {err}") from err
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise EncodingError(f"the payload's {NARROWED!r} list is not a list of names")
    missing = sorted(set(names) - set(arrays))
    if missing:
        raise EncodingError(f"the payload lists narrowed arrays it does not hold: {missing}")
    return sorted(set(names))
