"""``models.data.schema``: a catalogue of text ids matched as text, and the history items a
model trained on positives counts, the fingerprint of the rows, at the cases where a changed operator would show."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pandas as pd
import pytest

from models.data.errors import DataValidationError
from models.data.schema import encode_interactions, rated_positives, with_catalogue


def test_text_ids_are_matched_as_text_against_a_catalogue_of_text_ids():
    # "007" and "010" are text ids (not canonical integers): they must not be read as 7 and 10
    frame = pd.DataFrame({"user": ["u", "u", "v"], "item": ["007", "010", "007"],
                          "rating": [4.0, 5.0, 3.0]})  # fmt: skip
    data = encode_interactions(frame, rating_scale=(1.0, 5.0), source="x")
    listed = pd.Index(["007", "010", "12"])
    published, kept = with_catalogue(data, pd.DataFrame(index=listed), "items.csv")
    assert kept.tolist() == frame["item"].isin(listed).tolist()
    items = published.item_ids[published.frame["item"].to_numpy()]
    assert items.tolist() == frame["item"].tolist()
    assert published.item_ids.tolist() == listed.tolist()


def test_positives_are_the_items_rated_at_or_above_the_threshold():
    items = ["a", "b", "c", "d"]
    ratings = [5.0, 3.0, 4.0, 1.0]
    kept = rated_positives(items, ratings, 4.0)
    assert kept == [item for item, rating in zip(items, ratings, strict=True) if rating >= 4.0]
    assert kept == ["a", "c"]


def test_without_a_threshold_or_ratings_that_pair_with_the_items_every_item_counts():
    items = ["a", "b", "c"]
    assert rated_positives(items, [1.0, 1.0, 1.0], None) == items
    assert rated_positives(items, None, 4.0) == items
    assert rated_positives(items, [], 4.0) == items  # a history without ratings
    assert rated_positives(items, [5.0, 1.0], 4.0) == items


def test_a_catalogue_of_one_item_numbers_the_data_and_an_empty_one_is_refused():
    frame = pd.DataFrame({"user": [1, 2], "item": [10, 20], "rating": [4.0, 5.0]})
    data = encode_interactions(frame, rating_scale=(1.0, 5.0), source="x")
    published, kept = with_catalogue(data, pd.DataFrame(index=pd.Index([20])), "one.csv")
    assert kept.tolist() == [False, True] and published.item_ids.tolist() == [20]
    with pytest.raises(DataValidationError, match="lists no item"):
        with_catalogue(data, pd.DataFrame(index=pd.Index([], dtype=object)), "none.csv")


def _reference_fingerprint(data) -> str:
    """The fingerprint written out in plain Python: the prefix, each id kind's sorted text forms,
    then every row as (user rank, item rank, rating's float64 bits, timestamp) in little-endian
    int64, the rows sorted as tuples (every column, in that order)."""
    digest = hashlib.sha256(b"fedrec interactions v2\n")
    columns = []
    for ids, column in ((data.user_ids, "user"), (data.item_ids, "item")):
        text = [str(v) for v in ids]
        ordered = sorted(text)
        rank = {t: r for r, t in enumerate(ordered)}
        digest.update("\x1f".join(ordered).encode() + b"\n")
        columns.append([rank[text[code]] for code in data.frame[column]])
    columns.append([struct.unpack("<q", struct.pack("<d", r))[0] for r in data.frame["rating"]])
    if "timestamp" in data.frame:
        columns.append([int(t) for t in data.frame["timestamp"]])
    rows = sorted(zip(*columns, strict=True))
    digest.update(b"".join(struct.pack("<q", value) for row in rows for value in row))
    return digest.hexdigest()


@pytest.mark.parametrize("timestamps", [False, True])
def test_the_fingerprint_is_the_sorted_rows_in_the_callers_ids(timestamps):
    rng = np.random.default_rng(2)
    n = 60
    frame = pd.DataFrame({"user": rng.choice([f"u{k}" for k in range(12)], n),
                          "item": rng.choice(np.arange(100, 130), n),
                          "rating": rng.choice([1.0, 2.5, 4.0, 5.0], n)})  # fmt: skip
    frame = frame.drop_duplicates(["user", "item"]).reset_index(drop=True)
    if timestamps:
        frame["timestamp"] = rng.integers(0, 10**9, len(frame))
    data = encode_interactions(frame, rating_scale=(1.0, 5.0), source="x")
    assert data.fingerprint() == _reference_fingerprint(data)
    # each item rated once, by users in the opposite order: item order is not user order
    once = pd.DataFrame({"user": ["a", "b", "c"], "item": [3, 2, 1], "rating": [1.0, 2.0, 3.0]})
    data = encode_interactions(once, rating_scale=(1.0, 5.0), source="x")
    assert data.fingerprint() == _reference_fingerprint(data)
    # a pair given twice (encode_interactions keeps both): its rows are ordered by every column
    twice = pd.DataFrame({"user": ["a", "a", "b"], "item": [1, 1, 1], "rating": [5.0, 2.0, 1.0],
                          "timestamp": [1, 9, 5]})  # fmt: skip
    data = encode_interactions(twice, rating_scale=(1.0, 5.0), source="x")
    assert data.fingerprint() == _reference_fingerprint(data)
