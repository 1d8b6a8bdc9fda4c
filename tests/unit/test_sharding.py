import re

import numpy as np
import pandas as pd
import pytest

from models.client import TEST, TRAIN, VALID
from models.data.errors import DataValidationError
from models.data.partitions import (
    MANIFEST,
    build_clients,
    check_workspace,
    read_item_features,
    read_item_ids,
    read_manifest,
    read_partition,
    write_partitions,
)
from models.data.schema import Interactions, encode_interactions
from models.data.sharding import assign_clients, row_keys, split_rows
from tests.unit.helpers import low_rank_interactions


def _with_user_features(data: Interactions, column: str, values) -> Interactions:
    features = pd.DataFrame({column: values})
    return Interactions(
        data.frame, data.user_ids, data.item_ids, data.rating_scale, features, None, data.source
    )


def test_iid_is_balanced_and_deterministic():
    data = low_rank_interactions(n_users=103)
    a = assign_clients(data, n_clients=10, strategy="iid", rng=np.random.default_rng(5))
    b = assign_clients(data, n_clients=10, strategy="iid", rng=np.random.default_rng(5))
    c = assign_clients(data, n_clients=10, strategy="iid", rng=np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.bincount(a)) == {10, 11}


def test_dirichlet_is_more_skewed_than_iid_and_leaves_no_client_empty():
    data = low_rank_interactions(n_users=300, n_items=60, density=0.2, rank=3, seed=1)
    frame = data.frame

    def item_skew(client_of_user):
        # mean total-variation distance between each client's item distribution and the global one
        global_dist = np.bincount(frame["item"], minlength=data.n_items) / len(frame)
        distances = []
        for c in np.unique(client_of_user):
            rows = frame[client_of_user[frame["user"]] == c]
            dist = np.bincount(rows["item"], minlength=data.n_items) / len(rows)
            distances.append(0.5 * np.abs(dist - global_dist).sum())
        return np.mean(distances)

    iid = assign_clients(data, n_clients=5, strategy="iid", rng=np.random.default_rng(0))
    skewed = assign_clients(
        data, n_clients=5, strategy="dirichlet", alpha=0.1, rng=np.random.default_rng(0)
    )

    assert np.bincount(skewed, minlength=5).min() >= 1
    assert item_skew(skewed) > 1.2 * item_skew(iid)


def test_by_key_keeps_each_value_on_one_client():
    data = low_rank_interactions(n_users=40)
    zips = [f"{d}{n:04d}" for d, n in zip(np.arange(40) % 4, range(40), strict=True)]
    data = _with_user_features(data, "zip", zips)

    per_value = assign_clients(
        data,
        n_clients=None,
        strategy="by-key",
        key="zip",
        key_prefix=1,
        rng=np.random.default_rng(0),
    )
    packed = assign_clients(
        data, n_clients=2, strategy="by-key", key="zip", key_prefix=1, rng=np.random.default_rng(0)
    )

    prefixes = np.array([z[0] for z in zips])
    assert len(np.unique(per_value)) == 4
    for p in np.unique(prefixes):
        assert len(np.unique(per_value[prefixes == p])) == 1
        assert len(np.unique(packed[prefixes == p])) == 1
    assert sorted(np.bincount(packed)) == [20, 20]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"strategy": "iid", "n_clients": 500},
            "setting 'clients': value 500 is more clients than the data has users (60); "
            "allowed: 1..60",
        ),
        (
            {"strategy": "by-key", "n_clients": 2, "key": "region"},
            "setting 'partition_key': value 'region' is not a user-feature column",
        ),
        (
            {"strategy": "dirichlet", "n_clients": 2, "alpha": 0.0},
            "setting 'dirichlet_alpha': value 0.0 is not a valid Dirichlet concentration; "
            "allowed: a number > 0",
        ),
        (
            {"strategy": "round-robin", "n_clients": 2},
            "setting 'partition': value 'round-robin' is not a sharding strategy; "
            "allowed: iid, dirichlet, by-key",
        ),
    ],
)
def test_impossible_sharding_requests_say_why(kwargs, message):
    # named by their training settings (``fedrec train --clients``, ...), not as data columns
    with pytest.raises(DataValidationError, match=re.escape(message)):
        assign_clients(low_rank_interactions(n_users=60), rng=np.random.default_rng(0), **kwargs)


def test_random_split_fractions_and_every_user_keeps_a_training_row():
    data = low_rank_interactions(n_users=50, n_items=40, density=0.5)

    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.2)

    shares = np.bincount(split, minlength=3) / split.size
    assert shares[VALID] == pytest.approx(0.1, abs=0.03)
    assert shares[TEST] == pytest.approx(0.2, abs=0.03)
    users_with_train = np.unique(data.frame["user"].to_numpy()[split == TRAIN])
    np.testing.assert_array_equal(users_with_train, np.arange(data.n_users))
    # a user whose one row would be held out keeps it for training
    one_row = encode_interactions(
        pd.DataFrame({"user": [f"u{i}" for i in range(40)], "item": 7, "rating": 3.0}),
        rating_scale=(1.0, 5.0),
        source="t",
    )
    assert row_keys(one_row).min() < 0.3  # some of these rows draw a held-out key
    assert not split_rows(one_row, method="random", valid_fraction=0.1, test_fraction=0.2).any()


def test_a_rows_split_is_the_same_in_every_run_that_reads_it():
    # The champion and a candidate trained with another seed, partition or more data are
    # compared on validation rows neither trained on: a row's split depends on the row alone.
    data = low_rank_interactions(n_users=60, n_items=40, density=0.4)
    frame = data.frame.assign(
        user=data.user_ids[data.frame["user"]], item=data.item_ids[data.frame["item"]]
    )
    old, new = frame.iloc[: len(frame) // 2], frame.iloc[len(frame) // 2 :]

    def split_of(rows: pd.DataFrame) -> pd.Series:
        encoded = encode_interactions(rows, rating_scale=(1.0, 5.0), source="t")
        split = split_rows(encoded, method="random", valid_fraction=0.1, test_fraction=0.1)
        ids = zip(
            encoded.user_ids[encoded.frame["user"]],
            encoded.item_ids[encoded.frame["item"]],
            strict=True,
        )
        return pd.Series(split, index=pd.MultiIndex.from_tuples(list(ids)))

    before = split_of(old)
    after = split_of(pd.concat([new, old]).sample(frac=1.0, random_state=1))  # grown, reordered
    held = before[before != TRAIN]
    assert held.size > 0.15 * before.size
    # every row held out before is held out the same way after: a user may only gain a training row
    pd.testing.assert_series_equal(after.loc[held.index], held)
    trained = before[before == TRAIN].index  # one may go back to its key's split (a fix-up)
    assert (after.loc[trained] == TRAIN).mean() > 0.99


def test_temporal_split_holds_out_each_users_latest_rows():
    data = low_rank_interactions(n_users=30, n_items=40, density=0.5)

    split = split_rows(data, method="temporal", valid_fraction=0.0, test_fraction=0.25)

    frame = data.frame.assign(split=split)
    assert frame["user"].nunique() == 30 and frame.groupby("user").size().min() >= 4
    for _, rows in frame.groupby("user"):
        assert (rows["split"] == TEST).sum() == len(rows) // 4  # floor(0.25 n), at least 1 here
        assert (
            rows.loc[rows["split"] == TEST, "timestamp"].min()
            > rows.loc[rows["split"] == TRAIN, "timestamp"].max()
        )


def test_partitions_round_trip_and_are_deterministic(tmp_path):
    data = low_rank_interactions(n_users=40, n_items=30)
    client_of_user = assign_clients(data, n_clients=3, strategy="iid", rng=np.random.default_rng(0))
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.1)
    clients = build_clients(data, client_of_user, split)

    manifest = write_partitions(data, clients, tmp_path / "ws")
    again = write_partitions(data, clients, tmp_path / "ws")  # replaces atomically

    assert manifest == again == read_manifest(tmp_path / "ws")
    assert manifest.fingerprint == data.fingerprint() and manifest.n_clients == 3
    assert sum(e.n_train + e.n_valid + e.n_test for e in manifest.clients) == len(data)
    np.testing.assert_array_equal(read_item_ids(tmp_path / "ws"), data.item_ids)
    assert read_item_features(tmp_path / "ws") is None  # ids only: no catalogue features
    for entry, client in zip(manifest.clients, clients, strict=True):
        loaded = read_partition(tmp_path / "ws", entry, manifest.n_items)
        np.testing.assert_array_equal(loaded.user_ids, client.user_ids)
        pd.testing.assert_frame_equal(
            loaded.frame.reset_index(drop=True), client.frame.reset_index(drop=True)
        )
    assert not any(p.name.startswith(".partitions-") for p in tmp_path.iterdir())


def test_side_features_and_the_rating_scale_round_trip_through_a_workspace(tmp_path):
    from models.data.synthetic import generate_synthetic

    data = generate_synthetic(n_users=60, n_items=25, n_interactions=600, seed=3,
                              side_features=True)  # fmt: skip
    assert data.user_features is not None and data.item_features is not None
    owner = assign_clients(data, n_clients=2, strategy="iid", rng=np.random.default_rng(0))
    split = split_rows(data, method="random", valid_fraction=0.1, test_fraction=0.1)
    clients = build_clients(data, owner, split)

    manifest = write_partitions(data, clients, tmp_path / "ws")

    assert read_manifest(tmp_path / "ws").rating_scale == data.rating_scale == (1.0, 5.0)
    pd.testing.assert_frame_equal(
        read_item_features(tmp_path / "ws"), data.item_features.reset_index(drop=True)
    )
    for entry, client in zip(manifest.clients, clients, strict=True):
        loaded = read_partition(tmp_path / "ws", entry, manifest.n_items)
        pd.testing.assert_frame_equal(loaded.user_features, client.user_features)
        owned = np.flatnonzero(owner == client.client_id)  # the client's users, in order
        pd.testing.assert_frame_equal(
            loaded.user_features, data.user_features.iloc[owned].reset_index(drop=True)
        )


def test_a_workspace_is_a_new_or_empty_folder_or_a_fedrec_one_never_a_data_folder(tmp_path):
    check_workspace(tmp_path / "new")  # not there yet
    (tmp_path / "empty").mkdir()
    check_workspace(tmp_path / "empty")
    data = tmp_path / "data"
    data.mkdir()
    (data / "ratings.csv").write_text("user_id,item_id,rating\n")
    with pytest.raises(ValueError, match="holds files and is not a fedrec workspace"):
        check_workspace(data)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_workspace(tmp_path / "file")
    (data / MANIFEST).write_text("{}")
    check_workspace(data)  # a fedrec workspace: a run may replace it


def test_fingerprint_ignores_row_order_but_sees_a_changed_rating():
    data = low_rank_interactions(n_users=20, n_items=10)
    shuffled = Interactions(
        data.frame.sample(frac=1.0, random_state=0), data.user_ids, data.item_ids
    )
    changed_frame = data.frame.copy()
    changed_frame.loc[0, "rating"] += 1.0
    changed = Interactions(changed_frame, data.user_ids, data.item_ids)
    assert shuffled.fingerprint() == data.fingerprint() != changed.fingerprint()


def test_explicit_splits_share_one_id_space_and_keep_their_labels():
    from models.data.schema import encode_interactions
    from models.data.sharding import combine_splits

    train = encode_interactions(
        pd.DataFrame({"user": ["a", "b", "b"], "item": [1, 2, 3], "rating": [4.0, 3.0, 5.0]}),
        rating_scale=(1.0, 5.0),
        source="train.csv",
    )
    test = encode_interactions(
        pd.DataFrame({"user": ["b", "c"], "item": [1, 9], "rating": [2.0, 1.0]}),
        rating_scale=(1.0, 5.0),
        source="test.csv",
    )

    combined, split = combine_splits(train, test)

    frame = combined.frame
    decoded = list(
        zip(combined.user_ids[frame["user"]], combined.item_ids[frame["item"]], split, strict=True)
    )
    assert decoded == [("a", 1, 0), ("b", 2, 0), ("b", 3, 0), ("b", 1, 2), ("c", 9, 2)]
    assert combined.n_items == 4 and combined.source == "train.csv + test.csv"
    # ("c", 9): neither the user nor the item is in the training file; the run says so
    assert combined.notes == (
        "test.csv: 1 of 2 rows have a user or an item the training file lacks",
    )
    disjoint = encode_interactions(
        pd.DataFrame({"user": ["x"], "item": [7], "rating": [2.0]}),
        rating_scale=(1.0, 5.0), source="other.csv",
    )  # fmt: skip
    assert combine_splits(train, disjoint)[0].notes == (
        "other.csv: 1 of 1 rows have a user or an item the training file lacks: the metrics on "
        "it say nothing of the model",
    )


@pytest.mark.parametrize("shared_with", ["train", "valid"])
def test_a_held_out_row_that_another_split_file_has_is_refused(shared_with):
    from models.data.schema import encode_interactions
    from models.data.sharding import combine_splits

    def table(rows, source):
        users, items = zip(*rows, strict=True)
        frame = pd.DataFrame({"user": list(users), "item": list(items), "rating": 4.0})
        return encode_interactions(frame, rating_scale=(1.0, 5.0), source=source)

    train = table([("a", 1), ("a", 2), ("b", 1), ("b", 3)], "train.csv")
    valid = table([("a", 3), ("c", 1)], "valid.csv")
    test = table([("a", 4), ("b", 2), ("b", 1)] if shared_with == "train" else [("a", 4), ("c", 1)],
                 "test.csv")  # fmt: skip
    assert combine_splits(train, table([("a", 4)], "test.csv"), valid)  # disjoint: accepted
    numbers = table([(1, 10), (2, 11)], "numbers.csv")
    with pytest.raises(DataValidationError, match=r"\(the first: user '2', item '11'\)"):
        combine_splits(numbers, table([("2", "11")], "text.parquet"))  # 2 and "2": one user
    with pytest.raises(DataValidationError, match=r"\(the first: user 2, item 11\)"):
        combine_splits(numbers, table([(2, 11)], "more.csv"))  # not 2.0: the ratings are floats

    with pytest.raises(DataValidationError) as caught:
        combine_splits(train, test, valid)

    other, first = {"train": ("the training file train.csv", "'b', item 1"),
                    "valid": ("the validation file valid.csv", "'c', item 1")}[shared_with]  # fmt: skip
    n = 1
    assert str(caught.value) == (
        f"test.csv: {n} of {len(test.frame)} rows have a (user, item) pair {other} also has (the "
        f"first: user {first}); allowed: held-out rows of pairs the other split files lack: the "
        "model would be scored on rows it learned"
    )


def test_validation_is_carved_from_explicit_training_rows_only():
    from models.data.sharding import hold_out_validation

    data = low_rank_interactions(n_users=40, n_items=30, density=0.5)
    split = np.where(np.random.default_rng(0).random(len(data.frame)) < 0.2, TEST, TRAIN).astype(
        np.int8
    )

    out = hold_out_validation(data, split, fraction=0.1)

    np.testing.assert_array_equal(out == TEST, split == TEST)  # test rows untouched
    assert (out == VALID).sum() == pytest.approx(0.1 * (split == TRAIN).sum(), rel=0.25)
    users_with_train = np.unique(data.frame["user"].to_numpy()[out == TRAIN])
    assert users_with_train.size == np.unique(data.frame["user"].to_numpy()[split == TRAIN]).size


def test_split_each_user_follows_recboles_ratio_rounding():
    import pandas as pd

    from models.data.schema import encode_interactions
    from models.data.sharding import split_each_user

    sizes = {"a": 25, "b": 9, "c": 2, "d": 1}  # int(0.1 * n) = 2, 0, 0, 0
    frame = pd.DataFrame(
        [(u, f"i{j}", 1.0) for u, n in sizes.items() for j in range(n)],
        columns=["user", "item", "rating"],
    )
    data = encode_interactions(frame, rating_scale=None, source="t")

    split = split_each_user(
        data, valid_fraction=0.1, test_fraction=0.1, rng=np.random.default_rng(0)
    )

    counts = pd.crosstab(data.user_ids[data.frame["user"].to_numpy()], split)
    counts = counts.reindex(columns=[0, 1, 2], fill_value=0)
    assert counts.loc["a"].tolist() == [21, 2, 2]
    assert counts.loc["b"].tolist() == [7, 1, 1]  # 0.9 rounds to 0: one row each, from train
    assert counts.loc["c"].tolist() == [1, 0, 1]  # test first; train keeps its last row
    assert counts.loc["d"].tolist() == [1, 0, 0]


def test_fingerprint_follows_the_rows_in_the_callers_ids_not_the_internal_encoding():
    from models.data.schema import encode_interactions

    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "user": rng.choice(["ann", "bob", "cy", "dee"], size=40),
            "item": rng.integers(0, 6, size=40),  # (user, item) pairs repeat
            "rating": rng.integers(1, 6, size=40).astype(float),
            "timestamp": rng.integers(0, 10**9, size=40),
        }
    )

    def fingerprint(rows: pd.DataFrame) -> str:
        return encode_interactions(rows, rating_scale=(1.0, 5.0), source="t").fingerprint()

    def rows_as_text(rows: pd.DataFrame) -> list[str]:  # the oracle: the sorted rows as text
        return sorted("|".join(map(str, r)) for r in rows.itertuples(index=False))

    reordered = frame.iloc[rng.permutation(len(frame))]  # first-seen order encodes ids anew
    assert rows_as_text(reordered) == rows_as_text(frame)
    assert fingerprint(reordered) == fingerprint(frame)
    for column, value in (("user", "eve"), ("item", 9), ("rating", 2.5), ("timestamp", 7)):
        changed = frame.copy()
        changed.loc[5, column] = value
        assert rows_as_text(changed) != rows_as_text(frame)
        assert fingerprint(changed) != fingerprint(frame), column


def test_a_private_run_refused_for_too_many_clients_is_not_told_how_many_key_values_there_are():
    from models.data.sharding import check_columns

    data = _with_user_features(low_rank_interactions(n_users=40), "region",
                               [f"r{u % 3}" for u in range(40)])  # fmt: skip
    options = {"split": "random", "partition": "by-key", "partition_key": "region", "n_clients": 5}

    with pytest.raises(DataValidationError, match=r"distinct values \(3\); allowed: 1\.\.3"):
        check_columns(data, **options)
    with pytest.raises(DataValidationError) as private:
        check_columns(data, **options, private=True)
    assert "3" not in str(private.value).replace("r3", ""), str(private.value)
    assert str(private.value).endswith(
        "distinct values (how many is not said under dp_epsilon); allowed: fewer clients"
    )
    with pytest.raises(DataValidationError, match="how many is not said"):
        assign_clients(data, n_clients=5, strategy="by-key", key="region",
                       rng=np.random.default_rng(0), private=True)  # fmt: skip
