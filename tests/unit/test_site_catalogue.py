"""The catalogue (published, or the union of the sites' item sets); a site's rows against it."""

import re

import numpy as np
import pandas as pd
import pytest

from models.data.errors import DataValidationError
from models.data.schema import encode_interactions
from models.sites.catalogue import item_set, outside, read_catalogue, site_client, union_catalogue


def _data(items, users):
    frame = pd.DataFrame({"user": users, "item": items, "rating": np.arange(len(items)) % 5 + 1.0})
    return encode_interactions(frame, rating_scale=(1.0, 5.0), source="site.csv")


def test_the_catalogue_is_the_sorted_union():
    np.testing.assert_array_equal(
        union_catalogue([np.array([7, 3]), np.array([3, 11])]), [3, 7, 11]
    )
    with pytest.raises(ValueError, match="no site enrolled"):
        union_catalogue([])
    np.testing.assert_array_equal(union_catalogue([np.array([5]), np.array([], int)]), [5])
    with pytest.raises(ValueError, match="the enrolled sites hold no items"):
        union_catalogue([np.array([], int), np.array([], int)])


def test_a_site_numbers_its_items_by_catalogue_position_and_keeps_its_users():
    data = _data([30, 10, 30, 20], ["u1", "u1", "u2", "u2"])
    catalogue = np.array([5, 10, 20, 30, 40])
    client = site_client(
        data, catalogue, client_id=2, method="random", valid_fraction=0.0, test_fraction=0.0
    )
    assert client.client_id == 2 and client.n_items == 5
    ids = catalogue[client.frame["item"].to_numpy()]
    np.testing.assert_array_equal(np.sort(ids), [10, 20, 30, 30])
    assert sorted(client.user_ids) == ["u1", "u2"]


def test_rows_of_items_a_published_catalogue_lacks_are_left_out_and_counted():
    data = _data([1, 2, 2, 3, 9], ["u1", "u1", "u2", "u2", "u3"])
    catalogue = np.array([1, 3, 4])
    assert outside(data, catalogue) == (2, 3)  # items 2 and 9; three rows
    client = site_client(
        data, catalogue, client_id=0, method="random", valid_fraction=0.0, test_fraction=0.0
    )
    kept = sorted(
        zip(client.user_ids[client.frame["user"].to_numpy()],
            catalogue[client.frame["item"].to_numpy()], strict=True)
    )  # fmt: skip
    assert kept == [("u1", 1), ("u2", 3)]
    assert client.n_items == 3
    with pytest.raises(DataValidationError) as refused:
        item_set(_data(["7", "b"], [1, 1]), column="sku")
    # a user's own error (exit 2), naming the column and the first id that is not a number
    assert "column 'sku': value 'b' is not an integer item id; allowed: integer item ids" in str(
        refused.value
    )


def test_a_published_catalogue_is_read_from_its_item_id_column(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title\n30,c\n10,a\n30,c\n")
    np.testing.assert_array_equal(read_catalogue(path), [10, 30])
    for text, message in (
        (
            "item_id\n10\nten\n",
            "items.csv, row 2, column 'item_id': value 'ten' is not an integer; allowed: an integer",
        ),
        ("item_id\n1.5\n", "row 1, column 'item_id': value '1.5'"),
        ("item_id,title\n10,a\n,b\n", "row 2, column 'item_id': value '' is empty"),
        ("item\n10\n", "has no 'item_id' column (found ['item'])"),
        ("item_id\n", "lists no item"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_catalogue(path)
    with pytest.raises(ValueError, match="no such file"):
        read_catalogue(tmp_path / "missing.csv")


def test_a_published_catalogue_holds_any_int64_id_and_no_larger(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text(f"item_id\n{2**63 - 1}\n1000\n-{2**63 - 1}\n")
    assert read_catalogue(path).tolist() == [-(2**63 - 1), 1000, 2**63 - 1]
    for big in (2**63, -(2**63) - 1, 2**64):
        path.write_text(f"item_id\n1000\n{big}\n")
        with pytest.raises(ValueError, match=re.escape(f"row 2, column 'item_id': value '{big}'")):
            read_catalogue(path)
