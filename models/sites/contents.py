"""What a site's answer holds, in words for the site's own log: each array by name, dtype and
shape, each scalar field by name, never a value.

The description is read from the answer's npz bytes, the bytes the site seals and uploads, so it
cannot differ from what is sent: the shape and dtype of each array come from its ``.npy`` header
alone (a member is inflated no further than its header); only the small JSON members are read
whole, for their field names. An answer's ``header`` (:func:`models.protocol.answer_arrays`)
gives the names of its metrics and of its evaluation sums per split. The ``message`` of a
secure-aggregation step is itself a :func:`models.privacy.wire.pack` payload, read whole and
described the same way with its message kind.

``sent: items int64[1682], counts int64[1682], array.gram float64[1682x6]; fields client_id;
metrics train_sse, train_n; info seconds``
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from models.privacy.wire import NPY_HEADERS

_JSON = "__json__"  # the fields of a models.privacy.wire payload
_NARROWED = "__narrowed__"  # models.sites.encoding's list of arrays stored as float32
_HEADER = "header"  # the JSON of an answer's update and evaluations (models.protocol)
_MESSAGE = "message"  # the protocol message of a secure-aggregation step
_MAX_HEADER = 10_000  # bytes of one .npy header (numpy's own default limit)


def describe_answer(data: bytes, info: Mapping[str, Any]) -> str:
    """What an answer's npz ``data`` and its sealed ``info`` hold, names and shapes only.

    Parameters
    ----------
    data : bytes
        The answer's arrays as a site sends them (:func:`models.sites.encoding.encode_arrays`).
    info : mapping
        The scalar fields sealed with them (named, not valued).

    Returns
    -------
    str
        ``sent: <name> <dtype>[<shape>], ...`` then, by kind, the names of the answer's metrics
        and evaluation sums, the fields of a secure-aggregation message, and ``info <names>``.

    Raises
    ------
    ValueError
        If ``data`` is not an npz archive of ``.npy`` members (never the case for a site's own
        answer).
    """
    parts = [_describe_npz(data, outer=True)]
    if info:
        parts.append("info " + _names(info))
    return "; ".join(part for part in parts if part)


def _describe_npz(data: bytes, *, outer: bool) -> str:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as err:
        raise ValueError(f"not an npz archive: {err}") from err
    arrays: list[str] = []
    fields: list[str] = []
    with archive:
        for member in archive.infolist():
            name = member.filename.removesuffix(".npy")
            if name == _NARROWED:  # the float32 arrays show as float32 below
                continue
            if name == _HEADER and outer:
                fields.extend(_answer_header(_json_member(archive, member)))
            elif name == _JSON and not outer:
                fields[:0] = _wire_fields(_json_member(archive, member))
            elif name == _MESSAGE and outer:
                message = _message(archive, member)
                arrays.append(f"{_array(archive, member, name)} ({message})")
            else:
                arrays.append(_array(archive, member, name))
    if not outer:  # a message: its kind, then its arrays and its fields
        kind, *named = fields or ["message without fields"]
        return ", ".join([kind + (": " + ", ".join(arrays) if arrays else ""), *named])
    return "; ".join([f"sent: {', '.join(arrays) if arrays else 'no array'}", *fields])


def _array(archive: zipfile.ZipFile, member: zipfile.ZipInfo, name: str) -> str:
    """``name dtype[shape]`` from the member's ``.npy`` header, its data left unread."""
    with archive.open(member) as stream:
        dtype, shape = _npy_header(stream)
    return f"{name} {dtype}[{'x'.join(str(n) for n in shape)}]"


def _npy_header(stream: Any) -> tuple[np.dtype, tuple[int, ...]]:
    version = np.lib.format.read_magic(stream)
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    if version not in readers:
        raise ValueError(f".npy format version {version}; allowed 1.0, 2.0")
    with NPY_HEADERS:  # numpy parses the header with ast.literal_eval (see wire.NPY_HEADERS)
        shape, _, dtype = readers[version](stream, max_header_size=_MAX_HEADER)
    return dtype, tuple(int(n) for n in shape)


def _member_bytes(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> bytes:
    """The raw data of a 1-d uint8 member (a JSON document or a nested payload)."""
    with archive.open(member) as stream:
        dtype, shape = _npy_header(stream)
        if dtype != np.uint8 or len(shape) != 1:
            raise ValueError(f"member {member.filename!r} is {dtype}{list(shape)}, not uint8 bytes")
        return stream.read(shape[0])


def _json_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> Any:
    return json.loads(_member_bytes(archive, member).decode())


def _answer_header(header: Any) -> list[str]:
    """The names an answer's header carries: its client id field, its metrics, its evaluation
    sums per split (the arrays it lists are the npz's own, described as arrays)."""
    if not isinstance(header, dict):
        return ["header (not an object)"]
    others = [k for k in header if k not in ("metrics", "arrays", "evaluations")]
    out = ["fields " + _names(others) if others else ""]
    metrics = header.get("metrics")
    if isinstance(metrics, dict) and metrics:
        out.append("metrics " + _names(metrics))
    evaluations = header.get("evaluations")
    if isinstance(evaluations, dict):
        for split, sums in evaluations.items():
            named = _names(sums) if isinstance(sums, dict) and sums else "nothing"
            out.append(f"evaluation {split}: {named}")
    return [part for part in out if part]


def _message(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> str:
    """A secure-aggregation message (a :func:`models.privacy.wire.pack` payload) in words."""
    raw = _member_bytes(archive, member)
    if not raw.startswith(b"PK"):
        return f"{len(raw)} bytes that are not an npz payload"
    return _describe_npz(raw, outer=False)


def _wire_fields(document: Any) -> list[str]:
    """The kind of a protocol message (a constant of its type) and its other fields' names."""
    if not isinstance(document, dict):
        return ["fields (not an object)"]
    kind = document.get("kind")
    out = [f"{kind} message" if isinstance(kind, str) else "message of no kind"]
    others = [k for k in document if k != "kind"]
    if others:
        out.append("fields " + _names(others))
    return out


def _names(keys: Iterable[Any]) -> str:
    return ", ".join(str(k) for k in keys)
