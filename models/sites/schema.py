"""What a global state or a client's answer may contain, checked before either is used.

A site checks the global state it downloads against its family (names, dtypes, shapes from the
catalogue's size and the factor count, finiteness); the coordinator checks each answer against
the client protocol's vocabulary (:mod:`models.protocol`): known array names only, item indices
inside the catalogue, arrays aligned with them, finite numbers, the expected client id. Bytes
are decoded by :func:`models.sites.encoding.decode_arrays` (size caps, no pickles) first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.federation.evaluation import Evaluation
from models.federation.family import Family
from models.mf.family import ExplicitMF
from models.protocol import (
    GLOBAL_ARRAYS,
    ITEM_ARRAYS,
    ClientUpdate,
    answer_arrays,
    answer_from_arrays,
)


class SchemaError(ValueError):
    """Arrays that do not fit what was expected; ``str(err)`` says which and why."""


# name -> (dtype kind, shape with "n" for the catalogue size, "k" for the factors, None: any)
_EXPLICIT = {
    "factors": ("f", ("n", "k")),
    "bias": ("f", ("n",)),
    "global_mean": ("f", ()),
    "round": ("iu", ()),
}
# state arrays the server keeps for itself and never publishes: which items some client had
# training rows of (a site trains the same without it)
SERVER_ONLY = frozenset({"trained"})
_EXPLICIT_OPTIONAL = {
    "popularity": ("f", ("n",)),
    "baseline": ("f", ("n",)),
    "opt_first": ("f", ("n", None)),
    "opt_second": ("f", ("n", None)),
}


# The largest magnitude of a state value a client computes with: far above what training makes
# (factors, biases and means of a few units), far below what overflows a fold-in. A coordinator
# that sent 1e200 made a private client's answer NaN exactly where its users' rows are, and the
# site's refusal of that answer (or a NaN floored to an exact 0) told which.
STATE_LIMIT = 1e6
_BOUNDED = ("factors", "bias", "global_mean", "baseline")


def _check_finite(name: str, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise SchemaError(f"array {name!r} holds NaN or infinite values")
    if name in _BOUNDED and array.size and np.max(np.abs(array)) > STATE_LIMIT:
        raise SchemaError(
            f"state array {name!r} holds values beyond +-{STATE_LIMIT:g}; allowed: what training "
            "makes (a few units)"
        )


def check_state(family: Family, arrays: Mapping[str, np.ndarray], n_items: int) -> None:
    """Refuse a global state that ``family`` with ``n_items`` items cannot have produced.

    Raises
    ------
    SchemaError
    """
    if not isinstance(family, ExplicitMF):
        _check_like_initial(family, arrays, n_items)
        return
    sizes = {"n": n_items, "k": family.config.n_factors}
    missing = set(_EXPLICIT) - set(arrays)
    extra = set(arrays) - set(_EXPLICIT) - set(_EXPLICIT_OPTIONAL)
    if missing or extra:
        raise SchemaError(f"state arrays: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for name, array in arrays.items():
        kinds, shape = (_EXPLICIT | _EXPLICIT_OPTIONAL)[name]
        if array.dtype.kind not in kinds:
            raise SchemaError(
                f"state array {name!r} has dtype {array.dtype}, expected kind {kinds}"
            )
        expected = tuple(sizes.get(d, d) if isinstance(d, str) else d for d in shape)
        if len(array.shape) != len(expected) or any(
            e is not None and a != e for a, e in zip(array.shape, expected, strict=True)
        ):
            raise SchemaError(f"state array {name!r} has shape {array.shape}, expected {expected}")
        _check_finite(name, array)


def _check_like_initial(family: Family, arrays: Mapping[str, np.ndarray], n_items: int) -> None:
    """A family without a schema of its own: the state must have the names, dtype kinds and
    shapes of the family's own initial state (plus the item popularity the server adds), and
    the same structural integers (e.g. the network's layer sizes)."""
    initial = family.state_arrays(family.initial_state(n_items, seed=0))
    optional = {"popularity": np.zeros(n_items)}
    missing = set(initial) - set(arrays)
    extra = set(arrays) - set(initial) - set(optional)
    if missing or extra:
        raise SchemaError(f"state arrays: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for name, array in arrays.items():
        like = initial.get(name, optional.get(name))
        assert like is not None
        like = np.asarray(like)
        if array.dtype.kind != like.dtype.kind or array.shape != like.shape:
            raise SchemaError(
                f"state array {name!r} is {array.dtype} {array.shape}, expected "
                f"{like.dtype} {like.shape}"
            )
        if like.dtype.kind in "biu" and name != "round" and not np.array_equal(array, like):
            raise SchemaError(f"state array {name!r} describes another model than the family's")
        _check_finite(name, array)


def wire_arrays(update: ClientUpdate, evaluations: Mapping[str, Evaluation]) -> dict:
    """A client's answer as named arrays for the wire: :func:`models.protocol.answer_arrays`,
    with each split's top-K counts named by the split's position in the header (split names
    such as ``baseline/valid`` are not array names)."""
    arrays = answer_arrays(update, evaluations)
    out = {k: v for k, v in arrays.items() if not k.startswith("recommended.")}
    for index, split in enumerate(evaluations):
        if f"recommended.{split}" in arrays:
            out[f"recommended.{index}"] = arrays[f"recommended.{split}"]
    return out


def _named_splits(arrays: Mapping[str, np.ndarray], splits: list[str]) -> dict:
    """The inverse renaming of :func:`wire_arrays`."""
    out = {k: v for k, v in arrays.items() if not k.startswith("recommended.")}
    for index, split in enumerate(splits):
        if f"recommended.{index}" in arrays:
            out[f"recommended.{split}"] = arrays[f"recommended.{index}"]
    return out


def check_answer_arrays(
    arrays: Mapping[str, np.ndarray], *, client_id: int, n_items: int
) -> tuple[ClientUpdate, dict[str, Evaluation]]:
    """The update and evaluations of a client's answer as :func:`wire_arrays` packs it,
    refused unless it holds only the protocol's fields.

    Raises
    ------
    SchemaError
    """
    if "header" not in arrays or "items" not in arrays or "counts" not in arrays:
        raise SchemaError("answer lacks header, items or counts")
    header = arrays["header"]
    if header.dtype != np.uint8 or header.ndim != 1:
        raise SchemaError("answer header must be a 1-d uint8 array of JSON")
    try:
        parsed: Any = json.loads(header.tobytes().decode(), parse_constant=_no_constant)
    except RecursionError:
        raise SchemaError("answer header is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise SchemaError(f"answer header is not JSON: {err}") from err
    if not isinstance(parsed, dict) or set(parsed) != {
        "client_id",
        "metrics",
        "arrays",
        "evaluations",
    }:
        raise SchemaError("answer header must hold client_id, metrics, arrays, evaluations")
    if parsed["client_id"] != client_id:
        raise SchemaError(f"answer is for client {parsed['client_id']!r}, expected {client_id}")
    if sorted(parsed["arrays"]) != sorted(
        n.removeprefix("array.") for n in arrays if n.startswith("array.")
    ):
        raise SchemaError("answer header lists other arrays than the answer holds")
    _check_numbers(parsed["metrics"], "metrics")
    if not isinstance(parsed["evaluations"], dict):
        raise SchemaError("answer evaluations must be an object")
    for split, sums in parsed["evaluations"].items():
        _check_numbers(sums, f"evaluation {split!r}")
    allowed = {"header", "items", "counts"}
    allowed |= {f"array.{n}" for n in ITEM_ARRAYS | GLOBAL_ARRAYS}
    allowed |= {f"recommended.{i}" for i in range(len(parsed["evaluations"]))}
    extra = set(arrays) - allowed
    if extra:
        raise SchemaError(f"answer has arrays outside the protocol: {sorted(extra)}")
    arrays = _named_splits(arrays, list(parsed["evaluations"]))
    items, counts = arrays["items"], arrays["counts"]
    if items.dtype.kind not in "iu" or counts.dtype.kind not in "iuf":
        raise SchemaError("answer items must be integers and counts numbers (noisy under DP)")
    if items.ndim != 1 or counts.shape != items.shape:
        raise SchemaError(f"answer items {items.shape} and counts {counts.shape} must align")
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise SchemaError(f"answer names items outside the catalogue of {n_items}")
    if items.size > 1 and np.any(np.diff(items) <= 0):
        raise SchemaError("answer items must be sorted and unique")
    if counts.dtype.kind in "iu" and counts.size and counts.min() < 0:
        raise SchemaError("answer counts must be >= 0")
    for name, array in arrays.items():
        _check_finite(name, array)
        aligned = name.startswith("array.") and name.removeprefix("array.") in ITEM_ARRAYS
        if aligned and array.shape[:1] != items.shape:
            raise SchemaError(f"answer array {name!r} does not align with its items")
        counts_ok = array.ndim == 1 and array.shape[0] == n_items and array.dtype.kind in "iuf"
        if name.startswith("recommended.") and not (counts_ok and (array >= 0).all()):
            raise SchemaError(f"answer {name!r} must be {n_items} counts >= 0, one per item")
    return answer_from_arrays(arrays)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_numbers(raw: Any, what: str) -> None:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str)
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and np.isfinite(v)
        for k, v in raw.items()
    ):
        raise SchemaError(f"answer {what} must be an object of finite numbers")
