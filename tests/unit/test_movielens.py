"""MovieLens readers: the verified statistics of the real files, and the formats on tiny stand-ins.

The real-data tests are marked ``realdata`` and skip, naming the folder looked at, when the
GroupLens files are not under ``datasets_dir()``. The files are read in place, never copied.
The tiny stand-ins below are written here, in the MovieLens layout, and are not GroupLens data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.data.errors import DataValidationError
from models.data.movielens import read_movielens_1m, read_movielens_100k, read_movielens_ratings
from models.data.readers import DATASETS_ENV, datasets_dir, load_dataset
from models.data.schema import ITEM, RATING, TIMESTAMP, USER, Interactions

REPO_ROOT = Path(__file__).resolve().parents[2]
ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def _real_folder(name: str) -> Path:
    folder = datasets_dir() / name
    if not folder.is_dir():
        pytest.skip(f"MovieLens {name} not found at {folder} (set ${DATASETS_ENV} to its parent)")
    return folder


@pytest.fixture(scope="module")
def ml100k() -> Interactions:
    return read_movielens_100k(_real_folder("ml-100k"))


@pytest.fixture(scope="module")
def ml1m() -> Interactions:
    return read_movielens_1m(_real_folder("ml-1m"))


def _rating_counts(data: Interactions) -> dict[int, int]:
    values, counts = np.unique(data.frame[RATING].to_numpy(), return_counts=True)
    return dict(zip(values.astype(int).tolist(), counts.tolist(), strict=True))


@pytest.mark.realdata
def test_ml100k_matches_the_verified_statistics(ml100k: Interactions) -> None:
    # Assert
    assert len(ml100k) == 100_000
    assert ml100k.n_users == 943
    assert ml100k.n_items == 1682
    assert ml100k.user_ids.tolist() == list(range(1, 944))
    assert ml100k.item_ids.tolist() == list(range(1, 1683))
    assert _rating_counts(ml100k) == {1: 6110, 2: 11370, 3: 27145, 4: 34174, 5: 21201}
    assert ml100k.frame[TIMESTAMP].min() == 874724710
    assert ml100k.frame[TIMESTAMP].max() == 893286638
    assert ml100k.rating_scale == (1.0, 5.0)
    assert ml100k.notes == ()


@pytest.mark.realdata
def test_ml100k_side_features(ml100k: Interactions) -> None:
    # Prepare
    items, users = ml100k.item_features, ml100k.user_features
    genres = [column for column in items.columns if column.startswith("genre_")]

    # Assert
    assert len(items) == 1682
    assert len(genres) == 19
    assert "genre_childrens" in genres
    assert "genre_sci_fi" in genres
    assert "Misérables, Les (1995)" in set(items["title"])
    assert items.loc[0, "title"] == "Toy Story (1995)"
    assert items.loc[0, "year"] == 1995
    assert items.loc[0, ["genre_animation", "genre_childrens", "genre_comedy"]].tolist() == [
        1,
        1,
        1,
    ]
    # Item 267 has no release date at all.
    assert int(items["year"].isna().sum()) == 1
    assert items[genres].to_numpy().sum(axis=1).min() >= 1
    assert list(users.columns) == ["age", "gender", "occupation", "zip"]
    assert len(users) == 943
    assert users.loc[0, ["age", "gender", "occupation", "zip"]].tolist() == [
        24,
        "M",
        "technician",
        "85711",
    ]


@pytest.mark.realdata
def test_ml1m_matches_the_verified_statistics(ml1m: Interactions) -> None:
    # Assert
    assert len(ml1m) == 1_000_209
    assert ml1m.n_users == 6040
    assert ml1m.n_items == 3706
    assert ml1m.item_ids.min() == 1
    assert ml1m.item_ids.max() == 3952
    assert _rating_counts(ml1m) == {1: 56174, 2: 107557, 3: 261197, 4: 348971, 5: 226310}
    assert ml1m.frame[TIMESTAMP].min() == 956703932
    assert ml1m.frame[TIMESTAMP].max() == 1046454590
    assert ml1m.notes == ()


@pytest.mark.realdata
def test_ml1m_side_features(ml1m: Interactions) -> None:
    # Prepare
    items, users = ml1m.item_features, ml1m.user_features
    genres = [column for column in items.columns if column.startswith("genre_")]

    # Assert
    assert len(items) == 3706
    assert items["title"].notna().all()
    assert "Misérables, Les (1995)" in set(items["title"])
    assert len(genres) == 18
    assert items[genres].to_numpy().sum(axis=1).min() >= 1
    assert items["year"].notna().all()
    assert items["year"].between(1919, 2000).all()
    assert len(users) == 6040
    assert set(users["gender"]) == {"F", "M"}
    assert users.loc[0, ["gender", "age", "occupation", "zip"]].tolist() == ["F", 1, 10, "48067"]


@pytest.mark.realdata
def test_load_dataset_resolves_names_under_datasets_dir() -> None:
    # Prepare
    _real_folder("ml-100k")

    # Execute
    data = load_dataset("ml-100k")

    # Assert
    assert len(data) == 100_000
    assert data.source == str(datasets_dir() / "ml-100k")


def _write_tiny_100k(folder: Path) -> None:
    folder.mkdir()
    (folder / "u.data").write_text("1\t2\t5\t874724710\n2\t2\t3\t874724711\n1\t3\t4\t874724712\n")
    (folder / "u.genre").write_text(
        "".join(f"{name}|{index}\n" for index, name in enumerate(ML100K_GENRES)) + "\n"
    )
    flags_a = "|".join("1" if g in (4, 5) else "0" for g in range(19))
    flags_b = "|".join("1" if g == 8 else "0" for g in range(19))
    (folder / "u.item").write_bytes(
        (
            f"2|Misérables, Les (1995)|01-Jan-1995||http://example.org/a|{flags_a}\n"
            f"3|Untitled|||http://example.org/b|{flags_b}\n"
        ).encode("latin-1")
    )
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H1N\n")


def _write_tiny_1m(folder: Path) -> None:
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::20::5::978300760\n1::10::3::978302109\n2::20::4::1\n")
    (folder / "movies.dat").write_bytes(
        (
            "10::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n"
            "20::Misérables, Les (1995)::Drama|Musical\n"
        ).encode("latin-1")
    )
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")


def test_tiny_100k_layout_is_parsed(tmp_path: Path) -> None:
    # Prepare
    _write_tiny_100k(tmp_path / "ml")

    # Execute
    data = read_movielens_100k(tmp_path / "ml")

    # Assert
    assert len(data) == 3
    assert data.user_ids.tolist() == [1, 2]
    assert data.item_ids.tolist() == [2, 3]
    assert data.frame[[USER, ITEM, RATING]].to_numpy().tolist() == [[0, 0, 5], [1, 0, 3], [0, 1, 4]]
    items = data.item_features
    assert items["title"].tolist() == ["Misérables, Les (1995)", "Untitled"]
    assert items["year"].tolist()[0] == 1995
    assert items["year"].isna().tolist() == [False, True]
    assert items.loc[0, ["genre_childrens", "genre_comedy", "genre_drama"]].tolist() == [1, 1, 0]
    assert items.loc[1, "genre_drama"] == 1
    assert data.user_features["zip"].tolist() == ["85711", "T8H1N"]
    assert data.source == str(tmp_path / "ml")


def test_tiny_1m_layout_is_parsed(tmp_path: Path) -> None:
    # Prepare
    _write_tiny_1m(tmp_path / "ml")

    # Execute
    data = read_movielens_1m(tmp_path / "ml")

    # Assert
    assert len(data) == 3
    assert data.item_ids.tolist() == [10, 20]
    assert data.frame[TIMESTAMP].tolist() == [978300760, 978302109, 1]
    items = data.item_features
    assert items["title"].tolist() == [
        "Star Wars: Episode IV - A New Hope (1977)",
        "Misérables, Les (1995)",
    ]
    assert items["year"].tolist() == [1977, 1995]
    assert items[
        ["genre_action", "genre_sci_fi", "genre_drama", "genre_musical"]
    ].to_numpy().tolist() == [
        [1, 1, 0, 0],
        [0, 0, 1, 1],
    ]
    assert data.user_features["age"].tolist() == [1, 56]


def test_tiny_1m_bad_rating_names_the_real_file_and_row(tmp_path: Path) -> None:
    # Prepare
    _write_tiny_1m(tmp_path / "ml")
    (tmp_path / "ml" / "ratings.dat").write_text("1::20::5::978300760\n1::10::7::978302109\n")

    # Execute
    with pytest.raises(DataValidationError) as caught:
        read_movielens_1m(tmp_path / "ml")

    # Assert
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'ml' / 'ratings.dat'}, row 2, column 'rating'")
    assert "value 7.0 is outside the rating scale" in message


@pytest.mark.parametrize(
    ("writer", "reader"),
    [(_write_tiny_100k, read_movielens_100k), (_write_tiny_1m, read_movielens_1m)],
)
def test_load_dataset_recognises_movielens_folders(tmp_path: Path, writer, reader) -> None:
    # Prepare
    writer(tmp_path / "ml")

    # Execute
    data = load_dataset(str(tmp_path / "ml"))

    # Assert: what the folder's own reader gives, side features included
    direct = reader(tmp_path / "ml")
    assert len(data) == len(direct) == 3
    pd.testing.assert_frame_equal(data.frame, direct.frame)
    np.testing.assert_array_equal(data.user_ids, direct.user_ids)
    np.testing.assert_array_equal(data.item_ids, direct.item_ids)
    assert data.item_features is not None
    pd.testing.assert_frame_equal(data.item_features, direct.item_features)


def test_load_dataset_finds_named_datasets_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    _write_tiny_1m(tmp_path / "ml-1m")
    monkeypatch.setenv(DATASETS_ENV, str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)

    # Execute
    data = load_dataset("ml-1m")

    # Assert
    assert datasets_dir() == tmp_path
    assert data.source == str(tmp_path / "ml-1m")


def test_datasets_dir_defaults_to_shared_beside_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.delenv(DATASETS_ENV, raising=False)

    # Execute
    folder = datasets_dir()

    # Assert
    assert folder == REPO_ROOT.parent / "shared" / "datasets"


def test_load_dataset_synthetic_passes_options() -> None:
    # Execute
    data = load_dataset("synthetic", n_users=40, n_items=20, n_interactions=400, seed=5)

    # Assert
    assert len(data) == 400
    assert data.source.startswith("synthetic(seed=5,")


def test_load_dataset_synthetic_generates_the_same_options_once() -> None:
    """The command line's pre-check and the flow it starts ask for the same synthetic data: the
    second ask is answered without generating it again, and other options are generated."""
    import models.data.readers as readers

    options = {"n_users": 40, "n_items": 20, "n_interactions": 400}
    first = load_dataset("synthetic", seed=6, **options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(readers, "generate_synthetic", lambda **kw: pytest.fail(f"generated {kw}"))
        again = load_dataset("synthetic", **options, seed=6)  # the options in another order
    other = load_dataset("synthetic", seed=7, **options)

    assert again is first
    assert other.source.startswith("synthetic(seed=7,")
    assert not other.frame.equals(first.frame)


def test_a_100k_item_file_of_the_wrong_width_names_its_fields(tmp_path: Path) -> None:
    _write_tiny_100k(tmp_path / "ml")
    (tmp_path / "ml" / "u.item").write_text("2|Untitled|||http://example.org/a|0|1\n")

    with pytest.raises(DataValidationError) as caught:
        read_movielens_100k(tmp_path / "ml")

    assert str(caught.value) == (
        f"{tmp_path / 'ml' / 'u.item'}: has 7 fields per row; allowed: 5 + 19 genre flags "
        "(from u.genre)"
    )


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("u1.base", "1\t2\t5\t874724710\n2\t2\t1\t874724711\n1\t3\t4\t874724712\n"),
        ("ratings.dat", "1::2::5::874724710\n2::2::1::874724711\n1::3::4::874724712\n"),
    ],
)
def test_a_ratings_file_of_either_layout_reads_on_movielens_scale(
    tmp_path: Path, name: str, text: str
) -> None:
    (tmp_path / name).write_text(text)

    data = read_movielens_ratings(tmp_path / name)

    assert data.rating_scale == (1.0, 5.0)
    assert data.user_ids.tolist() == [1, 2] and data.item_ids.tolist() == [2, 3]
    assert data.frame[[USER, ITEM, RATING, TIMESTAMP]].to_numpy().tolist() == [
        [0, 0, 5, 874724710], [1, 0, 1, 874724711], [0, 1, 4, 874724712]]  # fmt: skip
    assert data.source == str(tmp_path / name)


def test_every_movielens_reader_declares_the_one_to_five_scale(tmp_path: Path) -> None:
    _write_tiny_100k(tmp_path / "a")
    _write_tiny_1m(tmp_path / "b")
    assert read_movielens_100k(tmp_path / "a").rating_scale == (1.0, 5.0)
    assert read_movielens_1m(tmp_path / "b").rating_scale == (1.0, 5.0)


def test_a_ratings_file_that_is_not_there_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"u9\.base: no such file; allowed: an existing"):
        read_movielens_ratings(tmp_path / "u9.base")


def test_a_ragged_line_of_a_headerless_ratings_file_is_named_by_its_line(tmp_path: Path) -> None:
    """MovieLens files have no header: the row an error names is the file's line."""
    path = tmp_path / "u1.base"
    path.write_text("1\t2\t5\t874724710\n2\t2\t1\t874724711\n1\t3\t4\t874724712\t9\n")

    with pytest.raises(DataValidationError) as caught:
        read_movielens_ratings(path)

    assert str(caught.value) == (
        f"{path}, row 3: has 5 fields (line 3 of the file); allowed: 4 fields, as in the first row"
    )
