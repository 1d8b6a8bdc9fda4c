"""Sharding and splitting at the edges of their settings, each against the rule its docstring
states: the client-count range, by-key packing (largest value first onto the lightest client),
the temporal split's per-user counts, the random split's key thresholds, which fractions are
valid, and what explicit split files keep (timestamps, the rating scale)."""

import re

import numpy as np
import pandas as pd
import pytest

from models.client import TEST, TRAIN, VALID
from models.data.errors import DataValidationError
from models.data.schema import Interactions, encode_interactions
from models.data.sharding import (
    assign_clients,
    check_columns,
    combine_splits,
    row_keys,
    split_rows,
)
from tests.unit.helpers import low_rank_interactions


def _with_user_features(data: Interactions, column: str, values) -> Interactions:
    features = pd.DataFrame({column: values})
    return Interactions(
        data.frame, data.user_ids, data.item_ids, data.rating_scale, features, None, data.source
    )


def _table(rows, source, rating_scale=(1.0, 5.0), timestamps=None) -> Interactions:
    users, items = zip(*rows, strict=True)
    frame = pd.DataFrame({"user": list(users), "item": list(items), "rating": 4.0})
    if timestamps is not None:
        frame["timestamp"] = timestamps
    return encode_interactions(frame, rating_scale=rating_scale, source=source)


def test_as_many_clients_as_users_or_a_single_client_are_allowed():
    data = low_rank_interactions(n_users=12, n_items=20)
    rng = np.random.default_rng(0)

    one_each = assign_clients(data, n_clients=12, strategy="iid", rng=rng)
    single = assign_clients(data, n_clients=1, strategy="iid", rng=rng)

    assert sorted(one_each.tolist()) == list(range(12))
    assert single.tolist() == [0] * 12


@pytest.mark.parametrize("n_clients", [0, -1, None, 13])
def test_a_client_count_outside_one_to_the_number_of_users_is_refused_naming_the_file(n_clients):
    data = low_rank_interactions(n_users=12, n_items=20)

    with pytest.raises(DataValidationError, match="setting 'clients'") as caught:
        assign_clients(data, n_clients=n_clients, strategy="iid", rng=np.random.default_rng(0))

    if n_clients == 13:  # a data limit: the file that has too few users is named
        assert str(caught.value).startswith("low_rank, ")
        assert str(caught.value).endswith("allowed: 1..12")


@pytest.mark.parametrize(("n_users", "n_items"), [(40, 4), (4, 40)])
def test_dirichlet_sharding_of_few_items_or_few_users_leaves_no_client_empty(n_users, n_items):
    """Fewer items or users than the taste embedding's usual 16 dimensions still shard."""
    data = low_rank_interactions(n_users=n_users, n_items=n_items, density=0.6, seed=2)

    client = assign_clients(
        data, n_clients=3, strategy="dirichlet", alpha=0.3, rng=np.random.default_rng(0)
    )

    assert client.shape == (n_users,) and np.bincount(client, minlength=3).min() >= 1


def test_by_key_packs_the_largest_values_first_onto_the_lightest_client():
    """Values with 5, 4, 3, 3 and 3 users on 2 clients, largest first onto the lightest: 5 -> A,
    4 -> B, 3 -> B (7), 3 -> A (8), 3 -> B (10); loads 8 and 10, each value on one client."""
    sizes = {"v5": 5, "v4": 4, "w3": 3, "x3": 3, "y3": 3}
    values = [v for v, n in sizes.items() for _ in range(n)]
    data = _with_user_features(low_rank_interactions(n_users=18), "region", values)

    client = assign_clients(
        data, n_clients=2, strategy="by-key", key="region", rng=np.random.default_rng(0)
    )

    assert sorted(np.bincount(client).tolist()) == [8, 10]
    by_value = pd.Series(client).groupby(pd.Series(values)).nunique()
    assert (by_value == 1).all()
    assert client[values.index("v5")] != client[values.index("v4")]


def test_by_key_onto_one_client_puts_every_user_there():
    data = _with_user_features(low_rank_interactions(n_users=10), "region",
                               [f"r{u % 3}" for u in range(10)])  # fmt: skip

    client = assign_clients(
        data, n_clients=1, strategy="by-key", key="region", rng=np.random.default_rng(0)
    )

    assert client.tolist() == [0] * 10


def test_only_a_temporal_split_needs_timestamps():
    data = low_rank_interactions(n_users=10)
    untimed = Interactions(data.frame.drop(columns=["timestamp"]), data.user_ids, data.item_ids)

    check_columns(untimed, split="random", partition="iid", partition_key=None)
    check_columns(data, split="temporal", partition="iid", partition_key=None)
    with pytest.raises(DataValidationError, match="a temporal split needs timestamps"):
        check_columns(untimed, split="temporal", partition="iid", partition_key=None)


@pytest.mark.parametrize(("valid", "test"), [(0.2, 0.3), (0.0, 0.4), (0.35, 0.0), (0.5, 0.49)])
def test_a_temporal_split_holds_out_floor_of_each_fraction_of_each_users_latest_rows(valid, test):
    """Per user, rows ordered by time (ties by key): the last ``floor(n * test)`` are test, the
    ``floor(n * valid)`` before them validation, the rest training."""
    data = low_rank_interactions(n_users=25, n_items=30, density=0.3, seed=4)
    frame = data.frame.assign(timestamp=data.frame["timestamp"] // 10**8)  # many ties
    data = Interactions(frame, data.user_ids, data.item_ids)
    keys = row_keys(data)

    split = split_rows(data, method="temporal", valid_fraction=valid, test_fraction=test)

    expected = np.zeros(len(frame), dtype=np.int8)
    users = frame["user"].to_numpy()
    for u in np.unique(users):
        rows = np.flatnonzero(users == u)
        rows = rows[np.lexsort((keys[rows], frame["timestamp"].to_numpy()[rows]))]
        n = rows.size
        n_test, n_valid = int(np.floor(n * test)), int(np.floor(n * valid))
        expected[rows[n - n_test :]] = TEST
        expected[rows[n - n_test - n_valid : n - n_test]] = VALID
    np.testing.assert_array_equal(split, expected)
    assert bool((split == VALID).any()) is (valid > 0)
    assert bool((split == TEST).any()) is (test > 0)


def test_a_random_splits_thresholds_hold_out_keys_strictly_below_them():
    """Test below ``test_fraction``, validation below ``test_fraction + valid_fraction``: a row
    whose key equals a threshold is on the upper side of it."""
    data = low_rank_interactions(n_users=30, n_items=40, density=0.5)
    keys = row_keys(data)
    edge = float(np.sort(keys)[len(keys) // 5])  # a key of one row, as the threshold

    as_test = split_rows(data, method="random", valid_fraction=0.0, test_fraction=edge)
    as_valid = split_rows(data, method="random", valid_fraction=edge, test_fraction=0.0)

    assert (keys == edge).sum() == 1
    np.testing.assert_array_equal(as_test, np.where(keys < edge, TEST, TRAIN))
    np.testing.assert_array_equal(as_valid, np.where(keys < edge, VALID, TRAIN))


@pytest.mark.parametrize(
    ("valid", "test"),
    [(0.5, 0.5), (0.7, 0.4), (-0.1, 0.2), (0.2, -0.1), (1.0, 0.0), (0.0, 1.0)],
)
def test_held_out_fractions_must_each_be_in_0_1_and_sum_below_1(valid, test):
    data = low_rank_interactions(n_users=10)

    with pytest.raises(DataValidationError, match="are not valid held-out fractions"):
        split_rows(data, method="random", valid_fraction=valid, test_fraction=test)


@pytest.mark.parametrize(("valid", "test"), [(0.0, 0.0), (0.0, 0.99), (0.99, 0.0), (0.5, 0.49)])
def test_held_out_fractions_at_the_edges_of_the_valid_range_are_accepted(valid, test):
    data = low_rank_interactions(n_users=10)

    split = split_rows(data, method="random", valid_fraction=valid, test_fraction=test)

    assert split.shape == (len(data.frame),)


def test_explicit_split_files_keep_their_timestamps_and_the_widest_rating_scale():
    train = _table([("a", 1), ("b", 2)], "train.csv", (1.0, 5.0), timestamps=[10, 20])
    test = _table([("a", 3), ("b", 1)], "test.csv", (0.5, 4.0), timestamps=[30, 40])
    untimed = _table([("a", 3), ("b", 1)], "test.csv", None)

    combined, split = combine_splits(train, test)

    assert combined.frame["timestamp"].tolist() == [10, 20, 30, 40]
    assert split.tolist() == [TRAIN, TRAIN, TEST, TEST]
    assert combined.rating_scale == (0.5, 5.0)
    partly, _ = combine_splits(train, untimed)  # one file without times: no timestamps at all
    assert "timestamp" not in partly.frame and partly.rating_scale == (1.0, 5.0)


def test_by_key_refusal_names_the_number_of_values_outside_one_to_it():
    data = _with_user_features(low_rank_interactions(n_users=10), "region",
                               [f"r{u % 3}" for u in range(10)])  # fmt: skip

    for n_clients in (0, 4):
        with pytest.raises(DataValidationError, match=re.escape("allowed: 1..3")):
            check_columns(data, split="random", partition="by-key", partition_key="region",
                          n_clients=n_clients)  # fmt: skip
    check_columns(data, split="random", partition="by-key", partition_key="region", n_clients=3)


def test_refusals_for_a_missing_column_name_the_file_and_what_it_offers():
    data = low_rank_interactions(n_users=10)  # source "low_rank"
    untimed = Interactions(data.frame.drop(columns=["timestamp"]), data.user_ids, data.item_ids,
                           source="ratings.csv")  # fmt: skip

    with pytest.raises(DataValidationError, match=r"^ratings\.csv, column 'timestamp'"):
        split_rows(untimed, method="temporal", valid_fraction=0.1, test_fraction=0.1)
    with pytest.raises(DataValidationError, match=r"^low_rank, setting 'partition_key'") as none:
        check_columns(data, split="random", partition="by-key", partition_key="region")
    assert str(none.value).endswith("allowed: none (this dataset has no user features)")
    featured = _with_user_features(data, "zip", ["1"] * 10)
    with pytest.raises(DataValidationError, match=r"allowed: zip$"):
        check_columns(featured, split="random", partition="by-key", partition_key="region")


def test_split_each_user_rounds_each_share_as_recbole_does():
    """RecBole's ``_calcu_split_ids``: held-out counts ``int(fraction * n)``; a share with
    ``0 < fraction * n < 1`` gets one row (while training keeps two), one of 1 or more does not,
    and a zero fraction gets none. Counts by hand: 20 rows at 0.2 / 0.1 -> 14, 4, 2; 15 at 0.1 /
    0.1 -> 13, 1, 1 (1.5 rounds down); 9 at 0.0 / 0.1 -> 8, 0, 1."""
    from models.data.sharding import split_each_user

    def counts(n, valid, test):
        frame = pd.DataFrame({"user": "u", "item": [f"i{j}" for j in range(n)], "rating": 1.0})
        data = encode_interactions(frame, rating_scale=None, source="t")
        split = split_each_user(
            data, valid_fraction=valid, test_fraction=test, rng=np.random.default_rng(0)
        )
        return np.bincount(split, minlength=3).tolist()

    assert counts(20, 0.2, 0.1) == [14, 4, 2]
    assert counts(15, 0.1, 0.1) == [13, 1, 1]
    assert counts(9, 0.0, 0.1) == [8, 0, 1]


def test_dirichlet_with_a_large_concentration_spreads_users_evenly():
    """Dirichlet(alpha) shares with a huge alpha are nearly uniform: every taste group is cut
    into near-equal parts, so the clients are near-equal in size."""
    data = low_rank_interactions(n_users=90, n_items=30, density=0.3, seed=3)

    client = assign_clients(
        data, n_clients=3, strategy="dirichlet", alpha=1e6, rng=np.random.default_rng(0)
    )

    sizes = np.bincount(client, minlength=3)
    assert sizes.sum() == 90 and np.abs(sizes - 30).max() <= 3, sizes


@pytest.mark.parametrize("seed", range(4))
def test_dirichlet_with_a_tiny_concentration_over_many_clients_leaves_none_empty(seed):
    """With alpha 0.01 most clients draw no users; each then takes one from the largest client,
    which never empties a client that already had one."""
    data = low_rank_interactions(n_users=30, n_items=20, density=0.3, seed=seed)

    client = assign_clients(
        data, n_clients=12, strategy="dirichlet", alpha=0.01, rng=np.random.default_rng(seed)
    )

    assert np.bincount(client, minlength=12).min() >= 1


@pytest.mark.parametrize("seed", range(4))
def test_dirichlet_groups_users_by_taste_not_by_how_much_they_rated(seed):
    """Two disjoint tastes (items 0-9 and 10-19), users rating 1 to 10 items of theirs: the taste
    groups are the tastes, and with a tiny alpha each goes whole to one client (but for at most
    one user moved to a client that drew nobody)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        items = rng.choice(10, size=1 + (u // 2) % 10, replace=False) + 10 * (u % 2)
        rows += [(f"u{u}", int(i), 1.0) for i in items]
    data = encode_interactions(
        pd.DataFrame(rows, columns=["user", "item", "rating"]), rating_scale=None, source="t"
    )
    taste = np.array([int(u[1:]) % 2 for u in data.user_ids])

    client = assign_clients(
        data, n_clients=2, strategy="dirichlet", alpha=1e-3, rng=np.random.default_rng(seed)
    )

    for t in (0, 1):
        assert np.bincount(client[taste == t], minlength=2).max() >= (taste == t).sum() - 1
