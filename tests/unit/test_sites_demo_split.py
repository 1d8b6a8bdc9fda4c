"""The sites demo's split of ML-100K's occupations into sites of about equal row counts."""

from __future__ import annotations

import pandas as pd
import pytest

from fedrec.sites_demo import DemoError, occupation_groups, split_by_occupation


def test_occupations_go_largest_first_to_the_lightest_site():
    # by hand: 50 -> A; 30 -> B; 20 -> C; 15 -> C (20 < 30); 10 -> B (30 < 35); 5 -> C (35 < 40)
    counts = {"a": 50, "b": 30, "c": 20, "d": 15, "e": 10, "f": 5}
    assert occupation_groups(counts, 3) == [["a"], ["b", "e"], ["c", "d", "f"]]


def test_occupations_of_equal_size_go_in_order_of_their_names():
    assert occupation_groups({"c": 5, "b": 5, "a": 5, "d": 1}, 3) == [["a", "d"], ["b"], ["c"]]


def test_every_occupation_lands_in_exactly_one_site():
    counts = {f"o{i}": (i * 37) % 101 + 1 for i in range(21)}
    groups = occupation_groups(counts, 3)
    flat = [o for g in groups for o in g]
    assert sorted(flat) == sorted(counts)
    totals = [sum(counts[o] for o in g) for g in groups]
    # greedy largest-first: no two sites differ by more than the largest occupation
    assert max(totals) - min(totals) <= max(counts.values())


def test_fewer_occupations_than_sites_is_refused():
    with pytest.raises(DemoError, match="2 occupations cannot fill 3 sites"):
        occupation_groups({"a": 1, "b": 2}, 3)
    # as many occupations as sites: one each
    assert occupation_groups({"a": 1, "b": 2, "c": 3}, 3) == [["c"], ["b"], ["a"]]


def test_the_files_hold_each_users_rows_once_and_only_at_their_occupations_site(tmp_path):
    data = tmp_path / "ml"
    data.mkdir()
    ratings = pd.DataFrame({"user_id": [1, 1, 2, 3, 3, 3, 4], "item_id": [10, 11, 10, 12, 13, 14, 10],
                            "rating": [5, 4, 3, 2, 1, 5, 4], "timestamp": range(7)})  # fmt: skip
    ratings.to_csv(data / "u.data", sep="\t", header=False, index=False)
    (data / "u.user").write_text(
        "1|20|M|student|1\n2|30|F|writer|2\n3|40|M|doctor|3\n4|50|F|writer|4\n"
    )
    shares = split_by_occupation(data, tmp_path / "out", ["x", "y"])
    # doctor (3 rows) -> x; student (2 rows) -> y; writer (2 rows) -> y (2 < 3)
    assert [(s.occupations, s.rows, s.users) for s in shares] == [
        (("doctor",), 3, 1),
        (("student", "writer"), 4, 3),
    ]
    x = pd.read_csv(tmp_path / "out" / "x.csv")
    y = pd.read_csv(tmp_path / "out" / "y.csv")
    assert list(x.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert set(x["user_id"]) == {3} and set(y["user_id"]) == {1, 2, 4}
    both = pd.concat([x, y]).sort_values("timestamp").reset_index(drop=True)
    pd.testing.assert_frame_equal(both, ratings)
    assert (tmp_path / "out" / "x.csv").stat().st_mode & 0o777 == 0o600


def test_a_missing_dataset_names_the_file(tmp_path):
    with pytest.raises(DemoError, match=r"u\.data: missing"):
        split_by_occupation(tmp_path, tmp_path / "out", ["x"])
