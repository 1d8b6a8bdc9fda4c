"""Byte encoding of protocol messages and client state without pickle.

A payload is an ``.npz`` archive (read back with ``allow_pickle=False``): numeric arrays as
themselves, everything else (ints, strings, bytes, lists, maps with int keys) in one JSON document
stored as a uint8 array. Bytes travel as base64 in the JSON; maps with int keys as lists of pairs,
maps with string keys as JSON objects (each tagged, so the three cannot be confused).
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

_JSON = "__json__"

# numpy parses each array's header with ast.literal_eval. On CPython 3.11 (gh-106905) two threads
# building AST objects at once can fail with "SystemError: AST constructor recursion depth
# mismatch"; client tasks read payloads in parallel threads, so their reads take turns here.
NPY_HEADERS = threading.Lock()


def read_npz(source: str | Path | IO[bytes]) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive (a path or a binary file), read with
    ``allow_pickle=False``, one thread at a time (:data:`NPY_HEADERS`)."""
    with NPY_HEADERS, np.load(source, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def pack(fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """``fields`` (JSON-able after the conversions above) and ``arrays`` as one npz payload."""
    document = json.dumps({k: _to_json(v) for k, v in fields.items()}, separators=(",", ":"))
    out = io.BytesIO()
    payload = {_JSON: np.frombuffer(document.encode(), dtype=np.uint8)}
    payload.update({k: np.asarray(v) for k, v in (arrays or {}).items()})
    np.savez(out, **payload)
    return out.getvalue()


def unpack(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The ``(fields, arrays)`` of :func:`pack`.

    Raises
    ------
    ValueError
        If ``data`` is not such a payload (object arrays are refused, never unpickled).
    """
    try:
        arrays = read_npz(io.BytesIO(data))
        document = json.loads(arrays.pop(_JSON).tobytes().decode())
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"not a fedrec protocol payload: {err}") from err
    return {k: _from_json(v) for k, v in document.items()}, arrays


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode()}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {"o": {k: _to_json(v) for k, v in value.items()}}
    if isinstance(value, Mapping):
        return {"m": [[int(k), _to_json(v)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "b" in value:
            return base64.b64decode(value["b"])
        if "o" in value:
            return {k: _from_json(v) for k, v in value["o"].items()}
        return {int(k): _from_json(v) for k, v in value["m"]}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value
