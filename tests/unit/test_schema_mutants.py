"""``models.data.schema``: a catalogue of text ids matched as text, and the history items a
model trained on positives counts, at the cases where a changed operator would show."""

from __future__ import annotations

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
