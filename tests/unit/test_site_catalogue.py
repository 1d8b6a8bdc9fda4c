"""The catalogue (published, or the union of the sites' item sets); a site's rows against it."""

import re

import numpy as np
import pandas as pd
import pytest

from models.data.schema import encode_interactions
from models.sites.catalogue import (
    check_sorted_ids,
    item_arrays,
    item_set,
    outside,
    read_catalogue,
    read_item_arrays,
    site_client,
    union_catalogue,
)
from models.sites.encoding import decode_arrays, encode_arrays
from models.sites.schema import SchemaError


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


def test_text_item_ids_make_a_text_catalogue_that_integer_ids_match_by_their_text():
    shop = _data(["sku-b", "sku-a", "sku-b", "café"], ["u1", "u1", "u2", "u2"])
    numbered = _data([7, 30, 7], ["v1", "v2", "v2"])
    assert item_set(shop).tolist() == ["café", "sku-a", "sku-b"]
    assert item_set(numbered).dtype == np.int64

    catalogue = union_catalogue([item_set(shop), item_set(numbered), np.array([], np.int64)])
    assert catalogue.tolist() == ["30", "7", "café", "sku-a", "sku-b"]  # sorted as text
    for data, expected in (
        (shop, ["sku-a", "sku-b", "sku-b", "café"]),
        (numbered, ["30", "7", "7"]),
    ):
        client = site_client(
            data, catalogue, client_id=1, method="random", valid_fraction=0.0, test_fraction=0.0
        )
        assert client.n_items == 5
        assert sorted(catalogue[client.frame["item"].to_numpy()]) == sorted(expected)
        assert outside(data, catalogue) == (0, 0)

    published = np.array(["7", "sku-b"], dtype=object)  # a product list without sku-a, café
    assert outside(shop, published) == (2, 2) and outside(numbered, published) == (1, 1)
    client = site_client(
        shop, published, client_id=0, method="random", valid_fraction=0.0, test_fraction=0.0
    )
    assert published[client.frame["item"].to_numpy()].tolist() == ["sku-b", "sku-b"]
    # text ids against integer ones: none matches, so every row is counted out
    assert outside(shop, np.array([7, 30])) == (3, 4)


@pytest.mark.parametrize(
    "ids",
    [np.array([3, -1, 2**62]), np.array(["sku-1", "café", "a", "日本"], dtype=object)],
)
def test_item_ids_cross_the_wire_as_numbers_and_come_back_equal(ids):
    arrays = item_arrays(ids)
    assert all(a.dtype.kind in "iu" for a in arrays.values())  # nothing to unpickle
    back = read_item_arrays(decode_arrays(encode_arrays(arrays), max_bytes=10**6), "catalogue")
    assert back.tolist() == ids.tolist() and back.dtype == ids.dtype


def test_malformed_item_arrays_are_refused_by_name():
    text = np.frombuffer(b"abcd", dtype=np.uint8)
    for arrays, message in [
        ({"items": np.array([1.5])}, "catalogue: 'items' must be a 1-d integer array"),
        ({"items": np.array([1]), "extra": np.array([1])}, "must hold 'items' (integer ids)"),
        ({"item_text": text, "item_ends": np.array([2, 2, 4])}, "into non-empty ids"),
        ({"item_text": text, "item_ends": np.array([2, 5])}, "into non-empty ids"),
        ({"item_text": text.astype(np.int64), "item_ends": np.array([4])}, "uint8 'item_text'"),
        ({"item_text": np.frombuffer(b"\xff\xfe", np.uint8), "item_ends": np.array([2])},
         "an item id is not UTF-8 text"),
    ]:  # fmt: skip
        with pytest.raises(SchemaError, match=re.escape(message)):
            read_item_arrays(arrays, "catalogue")
    with pytest.raises(SchemaError, match="catalogue items must be sorted and unique"):
        check_sorted_ids(np.array(["b", "a"], dtype=object), "catalogue")
    with pytest.raises(SchemaError, match="catalogue items must be sorted and unique"):
        check_sorted_ids(np.array([1, 1]), "catalogue")
    assert check_sorted_ids(np.array(["a", "b"], dtype=object), "catalogue").tolist() == ["a", "b"]


def test_a_published_catalogue_is_read_from_its_item_id_column(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title\n30,c\n10,a\n30,c\n")
    np.testing.assert_array_equal(read_catalogue(path), [10, 30])
    assert read_catalogue(path).dtype == np.int64
    # as a site's data file reads them: ids that are not all canonical integers stay text
    path.write_text("item_id\n10\nten\n007\n1.5\n10\n")
    assert read_catalogue(path).tolist() == ["007", "1.5", "10", "ten"]
    for text, message in (
        ("item_id,title\n10,a\n,b\n", "row 2, column 'item_id': value '' is empty"),
        ("item\n10\n", "has no 'item_id' column (found ['item'])"),
        ("item_id\n", "lists no item"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_catalogue(path)
    with pytest.raises(ValueError, match="no such file"):
        read_catalogue(tmp_path / "missing.csv")


def test_a_published_catalogue_holds_any_int64_id_and_larger_ones_as_text(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text(f"item_id\n{2**63 - 1}\n1000\n-{2**63 - 1}\n")
    assert read_catalogue(path).tolist() == [-(2**63 - 1), 1000, 2**63 - 1]
    for big in (2**63, -(2**63) - 1, 2**64):  # as a data file's ids beyond int64 are read
        path.write_text(f"item_id\n1000\n{big}\n")
        assert read_catalogue(path).tolist() == sorted(["1000", str(big)])


def test_text_ids_of_one_character_and_a_site_of_one_item_cross_the_wire():
    """Where a size or an offset is off by one: sites whose item sets are one text id each, a
    list of one text id, and an id of one character first."""
    sites = [np.array(["b"], dtype=object), np.array(["a"], dtype=object)]
    assert union_catalogue(sites).tolist() == ["a", "b"]

    for ids in (np.array(["x"], dtype=object), np.array(["a", "bc", "d"], dtype=object)):
        arrays = item_arrays(ids)
        assert set(arrays) == {"item_text", "item_ends"}
        assert read_item_arrays(arrays, "the catalogue").tolist() == ids.tolist()


def test_a_repeated_text_id_is_not_sorted_and_unique():
    with pytest.raises(SchemaError, match="the catalogue items must be sorted and unique"):
        check_sorted_ids(np.array(["a", "b", "b"], dtype=object), "the catalogue")
    assert check_sorted_ids(np.array(["a", "b"], dtype=object), "the catalogue").tolist() == [
        "a", "b",
    ]  # fmt: skip


def test_the_left_out_line_names_a_single_row_and_nothing_for_none():
    from models.sites.catalogue import left_out_note

    assert left_out_note("shop-a", {"outside_rows": 0, "outside_items": 0}) is None
    assert left_out_note("shop-a", {"outside_rows": 1, "outside_items": 1}) == (
        "shop-a: 1 of its rows, of 1 items the published catalogue lacks, are left out of this run"
    )
