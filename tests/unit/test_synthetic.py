"""The synthetic generator: deterministic, distinct pairs, MovieLens-like shape, side features."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from models.data.errors import DataValidationError
from models.data.schema import ITEM, RATING, TIMESTAMP, USER, Interactions
from models.data.synthetic import MIN_PER_USER, N_GENRES, N_REGIONS, generate_synthetic


@pytest.fixture(scope="module")
def default_data() -> Interactions:
    return generate_synthetic()


def test_same_seed_gives_identical_data() -> None:
    # Prepare
    options = {"n_users": 300, "n_items": 200, "n_interactions": 6000, "seed": 7}

    # Execute
    first = generate_synthetic(**options)
    second = generate_synthetic(**options)

    # Assert
    pd.testing.assert_frame_equal(first.frame, second.frame)
    pd.testing.assert_frame_equal(first.item_features, second.item_features)
    pd.testing.assert_frame_equal(first.user_features, second.user_features)
    assert first.fingerprint() == second.fingerprint()


def test_different_seed_gives_different_data() -> None:
    # Prepare
    options = {"n_users": 300, "n_items": 200, "n_interactions": 6000}

    # Execute
    first = generate_synthetic(**options, seed=0)
    second = generate_synthetic(**options, seed=1)

    # Assert
    assert first.fingerprint() != second.fingerprint()
    assert not np.array_equal(first.frame[RATING].to_numpy(), second.frame[RATING].to_numpy())


def test_no_duplicate_pairs(default_data: Interactions) -> None:
    # Execute
    duplicated = default_data.frame.duplicated([USER, ITEM])

    # Assert
    assert int(duplicated.sum()) == 0


def test_sizes_and_per_user_counts(default_data: Interactions) -> None:
    # Execute
    per_user = np.bincount(default_data.frame[USER], minlength=default_data.n_users)

    # Assert
    assert len(default_data) == 100_000
    assert default_data.n_users == 2000
    assert default_data.user_ids.tolist() == list(range(2000))
    # Tail items may go undrawn, but nearly all of the 1000 should appear.
    assert 900 <= default_data.n_items <= 1000
    assert per_user.min() >= MIN_PER_USER
    assert per_user.max() <= 1000 // 2
    assert default_data.rating_scale == (1.0, 5.0)
    assert default_data.source.startswith("synthetic(seed=0, n_users=2000, n_items=1000,")


def test_ratings_are_whole_steps_within_scale_with_mean_near_3_5(
    default_data: Interactions,
) -> None:
    # Execute
    ratings = default_data.frame[RATING].to_numpy()

    # Assert
    assert ratings.min() == 1.0
    assert ratings.max() == 5.0
    assert np.array_equal(ratings, np.round(ratings))
    assert sorted(np.unique(ratings).tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert 3.3 < ratings.mean() < 3.7
    assert 0.8 < ratings.std() < 1.3


def test_half_step_scale_gives_half_step_ratings() -> None:
    # Execute
    data = generate_synthetic(
        n_users=200, n_items=100, n_interactions=4000, rating_scale=(0.5, 5.0), seed=3
    )

    # Assert
    ratings = data.frame[RATING].to_numpy()
    assert ratings.min() >= 0.5
    assert ratings.max() <= 5.0
    assert np.array_equal(ratings * 2, np.round(ratings * 2))
    assert set(np.arange(1.0, 5.0, 0.5)) <= set(np.unique(ratings))  # whole and half steps
    assert data.rating_scale == (0.5, 5.0)


def test_item_popularity_is_long_tailed(default_data: Interactions) -> None:
    # Execute
    counts = np.sort(np.bincount(default_data.frame[ITEM]))[::-1]
    top_share = counts[: len(counts) // 10].sum() / counts.sum()

    # Assert
    assert top_share > 0.40


def test_user_activity_is_skewed(default_data: Interactions) -> None:
    # Execute
    per_user = np.bincount(default_data.frame[USER])

    # Assert
    assert per_user.max() > 5 * np.median(per_user)


def test_ratings_carry_item_and_user_signal(default_data: Interactions) -> None:
    # Prepare: with pure noise, means over 30+ ratings would spread by about 1 / sqrt(30) = 0.18.
    frame = default_data.frame

    # Execute
    item_stats = frame.groupby(ITEM)[RATING].agg(["mean", "size"])
    user_stats = frame.groupby(USER)[RATING].agg(["mean", "size"])

    # Assert
    assert item_stats.loc[item_stats["size"] >= 30, "mean"].std() > 0.3
    assert user_stats.loc[user_stats["size"] >= 30, "mean"].std() > 0.3


def test_timestamps_increase_within_each_user(default_data: Interactions) -> None:
    # Prepare
    frame = default_data.frame

    # Execute
    same_user = np.diff(frame[USER].to_numpy()) == 0
    steps = np.diff(frame[TIMESTAMP].to_numpy())

    # Assert
    assert frame[TIMESTAMP].dtype == np.int64
    assert (steps[same_user] > 0).all()


def test_side_features_are_present_and_plausible(default_data: Interactions) -> None:
    # Prepare
    items, users = default_data.item_features, default_data.user_features
    genres = [f"genre_{g}" for g in range(N_GENRES)]

    # Assert
    assert list(items.columns) == [*genres, "year"]
    assert len(items) == default_data.n_items
    prevalence = items[genres].mean()
    assert ((prevalence > 0.05) & (prevalence < 0.35)).all()
    assert items["year"].between(1920, 2024).all()
    assert list(users.columns) == ["age", "occupation", "region"]
    assert len(users) == default_data.n_users
    assert set(users["region"]) <= {f"r{r}" for r in range(N_REGIONS)}
    assert users["region"].nunique() >= 5
    assert users["age"].between(13, 80).all()
    assert users.notna().all().all()


def test_regions_differ_in_taste(default_data: Interactions) -> None:
    # Prepare: users of one region share half their factors, so their genre means differ.
    frame = default_data.frame.join(default_data.user_features["region"], on=USER)
    frame = frame.join(default_data.item_features["genre_0"], on=ITEM)
    liked = frame[frame["genre_0"] == 1]

    # Execute
    by_region = liked.groupby("region")[RATING].agg(["mean", "size"])
    big = by_region[by_region["size"] >= 300]

    # Assert
    assert len(big) >= 3
    assert big["mean"].max() - big["mean"].min() > 0.1


def test_side_features_can_be_left_out() -> None:
    # Execute
    data = generate_synthetic(n_users=50, n_items=20, n_interactions=300, side_features=False)

    # Assert
    assert data.item_features is None
    assert data.user_features is None
    assert len(data) == 300


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"n_users": 10, "n_interactions": 20}, "n_interactions=20 is out of range"),
        ({"n_users": 10, "n_items": 20, "n_interactions": 101}, "allowed: 50 (5 per user) to 100"),
        ({"n_items": 5}, "n_items=5 is too small; allowed: >= 10"),
        ({"n_factors": 0}, "n_factors=0 is too small"),
        ({"rating_scale": (5.0, 5.0)}, "rating_scale=(5.0, 5.0) is not a valid range"),
    ],
)
def test_bad_arguments_raise(options: dict[str, object], expected: str) -> None:
    # Execute
    with pytest.raises(DataValidationError) as caught:
        generate_synthetic(**options)  # type: ignore[arg-type]

    # Assert
    assert expected in str(caught.value)


@pytest.mark.slow
def test_a_million_interactions_are_distinct_and_complete() -> None:
    # Execute
    data = generate_synthetic(n_users=20_000, n_items=5_000, n_interactions=1_000_000, seed=11)

    # Assert
    assert len(data) == 1_000_000
    assert data.n_users == 20_000
    assert int(data.frame.duplicated([USER, ITEM]).sum()) == 0
    assert np.bincount(data.frame[USER]).min() >= MIN_PER_USER


def test_a_bare_call_is_the_documented_default_data(default_data: Interactions) -> None:
    """The README's figures for the default data (taste 1) come from these settings."""
    documented = generate_synthetic(n_users=2000, n_items=1000, n_interactions=100_000,
                                    n_factors=8, rating_scale=(1.0, 5.0), taste=1.0, seed=0)  # fmt: skip
    pd.testing.assert_frame_equal(default_data.frame, documented.frame)


def test_regions_and_genres_are_the_documented_ones(default_data: Interactions) -> None:
    assert set(default_data.user_features["region"]) == {f"r{r}" for r in range(10)}
    genres = [c for c in default_data.item_features.columns if c.startswith("genre_")]
    assert genres == [f"genre_{g}" for g in range(8)]


def test_users_join_over_two_years_from_2020_and_rate_about_every_two_days(
    default_data: Interactions,
) -> None:
    frame = default_data.frame
    start, year = 1_577_836_800, 365 * 86_400  # 2020-01-01 UTC
    first = frame.groupby(USER)[TIMESTAMP].min()  # a user's join time + a first gap of days
    assert first.min() >= start
    assert 0.9 * year < first.median() - start < 1.1 * year  # the middle of the two years
    assert first.quantile(0.05) - start < 0.15 * year

    gaps = frame.groupby(USER)[TIMESTAMP].diff().dropna() / 86_400
    per_user = gaps.groupby(frame[USER]).mean()
    # each user's pace: 2 days x lognormal(0, 1), whose median is 1
    assert 1.5 < per_user.median() < 2.5


def test_popular_items_are_rated_higher(default_data: Interactions) -> None:
    stats = default_data.frame.groupby(ITEM)[RATING].agg(["mean", "size"])
    stats = stats[stats["size"] >= 10]
    assert np.corrcoef(np.log(stats["size"]), stats["mean"])[0, 1] > 0.2


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"n_users": 0}, "n_users=0 is too small; allowed: >= 1"),
        ({"n_items": 9}, "n_items=9 is too small; allowed: >= 10"),
        ({"n_users": 10, "n_items": 20, "n_interactions": 49}, "n_interactions=49 is out of range"),
        # half of 21 items is 10 per user: 101 rows could never be drawn
        (
            {"n_users": 10, "n_items": 21, "n_interactions": 101},
            "n_interactions=101 is out of range",
        ),
        ({"rating_scale": (float("nan"), 5.0)}, "rating_scale=(nan, 5.0) is not a valid range"),
        ({"rating_scale": (1.0, float("inf"))}, "rating_scale=(1.0, inf) is not a valid range"),
        ({"rating_scale": (5.0, 1.0)}, "rating_scale=(5.0, 1.0) is not a valid range"),
        ({"taste": 0.0}, "taste=0.0 is not a valid strength; allowed: > 0"),
        ({"taste": float("inf")}, "taste=inf is not a valid strength"),
        ({"taste": float("nan")}, "taste=nan is not a valid strength"),
    ],
)
def test_arguments_just_outside_their_range_are_refused(options, expected) -> None:
    with pytest.raises(DataValidationError, match=f"^{re.escape(expected)}"):
        generate_synthetic(**options)


@pytest.mark.parametrize("n_interactions", [50, 100], ids=["fewest", "most"])
def test_the_ends_of_the_range_are_drawn_exactly(n_interactions: int) -> None:
    """5 rows per user at least, half the items per user at most: at either end every user has
    exactly that many, distinct items."""
    data = generate_synthetic(n_users=10, n_items=20, n_interactions=n_interactions, seed=2)

    per_user = np.bincount(data.frame[USER], minlength=10)
    assert per_user.tolist() == [n_interactions // 10] * 10
    assert int(data.frame.duplicated([USER, ITEM]).sum()) == 0
    assert data.n_users == 10 and data.n_items <= 20


def test_the_source_names_every_setting_and_taste_only_when_it_is_not_the_default() -> None:
    small = {"n_users": 20, "n_items": 20, "n_interactions": 100}
    assert generate_synthetic(**small, seed=4).source == (
        "synthetic(seed=4, n_users=20, n_items=20, n_interactions=100, n_factors=8, "
        "rating_scale=(1.0, 5.0), side_features=True)"
    )
    assert generate_synthetic(**small, taste=6.0, side_features=False).source.endswith(
        "side_features=False, taste=6.0)"
    )


def test_a_user_rates_items_one_at_a_time() -> None:
    """Timestamps strictly increase within a user even for the fastest pace: a gap is at least
    one second."""
    data = generate_synthetic(n_users=300, n_items=100, n_interactions=15_000, seed=5)
    frame = data.frame
    same_user = np.diff(frame[USER].to_numpy()) == 0
    steps = np.diff(frame[TIMESTAMP].to_numpy())[same_user]
    assert steps.min() >= 1


def test_the_smallest_data_allowed_is_drawn() -> None:
    data = generate_synthetic(n_users=1, n_items=10, n_interactions=5, n_factors=1, seed=1)
    assert len(data) == 5 and data.n_users == 1


def test_a_region_meets_more_often_the_items_it_rates_above_their_mean(
    default_data: Interactions,
) -> None:
    """Who saw what carries taste: the factors that raise a rating also raise the chance that a
    user meets the item, so an item's share of a region's rows (against its share of all rows)
    goes with how much higher that region rates it."""
    frame = default_data.frame.join(default_data.user_features["region"], on=USER)
    cells = frame.groupby(["region", ITEM])[RATING].agg(["mean", "size"]).reset_index()
    overall = frame.groupby(ITEM)[RATING].agg(["mean", "size"])
    cells = cells.merge(overall, left_on=ITEM, right_index=True, suffixes=("", "_all"))
    region_rows = frame.groupby("region").size()
    share = cells["size"] / region_rows.loc[cells["region"]].to_numpy()
    lift = np.log(share / (cells["size_all"] / len(frame)))
    above = cells["mean"] - cells["mean_all"]
    kept = cells["size"] >= 10
    assert np.corrcoef(lift[kept], above[kept])[0, 1] > 0.3


def test_a_drawn_pair_is_found_among_the_sorted_ones_at_either_end() -> None:
    from models.data.synthetic import _contains

    taken = np.array([3, 8, 20, 41])
    found = _contains(taken, np.array([41, 3, 20, 0, 9, 42]))
    assert found.tolist() == [True, True, True, False, False, False]
    assert _contains(np.empty(0, np.int64), np.array([1])).tolist() == [False]
