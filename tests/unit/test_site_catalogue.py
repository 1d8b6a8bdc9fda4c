"""The catalogue is the union of the sites' item sets; a site's rows are numbered against it."""

import numpy as np
import pandas as pd
import pytest

from models.data.schema import encode_interactions
from models.sites.catalogue import item_set, site_client, union_catalogue


def _data(items, users):
    frame = pd.DataFrame({"user": users, "item": items, "rating": np.arange(len(items)) % 5 + 1.0})
    return encode_interactions(frame, rating_scale=(1.0, 5.0), source="site.csv")


def test_the_catalogue_is_the_sorted_union():
    np.testing.assert_array_equal(
        union_catalogue([np.array([7, 3]), np.array([3, 11])]), [3, 7, 11]
    )
    with pytest.raises(ValueError, match="no site enrolled"):
        union_catalogue([])


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


def test_a_site_item_missing_from_the_catalogue_is_refused():
    with pytest.raises(ValueError, match="1 of the site's items are not in the catalogue"):
        site_client(
            _data([1, 2], [1, 1]),
            np.array([1]),
            client_id=0,
            method="random",
            valid_fraction=0.1,
            test_fraction=0.1,
        )
    with pytest.raises(ValueError, match="integer ids"):
        item_set(_data(["a", "b"], [1, 1]))
