"""A published item list numbers the data: every listed item is in, rows of others are out."""

import numpy as np
import pandas as pd
import pytest

from models.data.errors import DataValidationError
from models.data.schema import encode_interactions, with_catalogue
from models.data.synthetic import generate_synthetic


def test_every_kept_row_keeps_its_item_and_rows_of_unlisted_items_are_left_out():
    data = generate_synthetic(n_users=40, n_items=60, n_interactions=600, seed=1)
    listed = pd.Index(np.r_[np.arange(0, 60, 2), np.arange(100, 110)])  # even ids, ten new
    published, kept = with_catalogue(data, pd.DataFrame(index=listed), "items.csv")

    items = data.item_ids[data.frame["item"].to_numpy()]
    assert kept.tolist() == np.isin(items, listed).tolist()  # the oracle: membership per row
    assert published.item_ids.tolist() == listed.tolist()
    np.testing.assert_array_equal(
        published.item_ids[published.frame["item"].to_numpy()], items[kept]
    )
    assert published.user_ids.tolist() == data.user_ids.tolist()
    lacking = len(set(items) - set(listed))
    assert published.notes[-1] == (
        f"the catalogue is items.csv: 40 items; {int((~kept).sum())} rows of {lacking} items "
        "it lacks are left out"
    )
    # the data's own features follow their items; an item no row rates has none
    features = published.item_features
    assert features is not None and features.iloc[-1].isna().all()
    at = {item: row for row, item in enumerate(data.item_ids)}
    assert features.iloc[0].astype(float).tolist() == (
        data.item_features.iloc[at[0]].astype(float).tolist()
    )


def test_text_ids_of_a_file_match_integer_ids_and_a_public_list_keeps_its_features():
    frame = pd.DataFrame({"user": [1, 1, 2], "item": [10, 20, 20], "rating": [4.0, 5.0, 3.0]})
    public = pd.DataFrame({"title": ["a", "b", "c"]}, index=pd.Index([10, 20, 30]))
    data = encode_interactions(frame, rating_scale=(1.0, 5.0), source="x", item_features=public,
                               features_list_every_item=True)  # fmt: skip
    assert data.n_items == 2 and data.public_items is public
    published, _ = with_catalogue(data, data.public_items, "the list")
    assert published.item_features["title"].tolist() == ["a", "b", "c"]
    as_text, kept = with_catalogue(data, pd.DataFrame(index=pd.Index(["20", "30"])), "f.csv")
    assert kept.tolist() == [False, True, True] and as_text.item_ids.tolist() == [20, 30]
    with pytest.raises(DataValidationError, match="lists an item id twice"):
        with_catalogue(data, pd.DataFrame(index=pd.Index([10, 10])), "f.csv")


def test_a_product_list_is_read_by_the_datas_item_column_or_item_id(tmp_path):
    import pytest

    from models.data.errors import DataValidationError
    from models.data.readers import read_item_list

    by_sku = tmp_path / "products.csv"
    by_sku.write_text("sku,name\nSKU-2,Mug\n007,Pen\n")
    plain = tmp_path / "items.csv"
    plain.write_text("item_id\nSKU-2\n")
    neither = tmp_path / "other.csv"
    neither.write_text("name\nMug\n")

    assert read_item_list(by_sku, "sku").tolist() == ["SKU-2", "007"]
    assert read_item_list(plain, "sku").tolist() == ["SKU-2"]
    with pytest.raises(DataValidationError) as caught:
        read_item_list(neither, "sku")
    assert str(caught.value) == (
        f"{neither}: has no 'sku' column (found ['name']); allowed: a CSV file with an sku column "
        "(the data's --item-col) or an item_id column"
    )
