"""Read the GroupLens MovieLens 100K and 1M folders into validated, encoded ``Interactions``.

Every problem with an input surfaces as one ``DataValidationError`` line naming the file; the
checks on the rows themselves live in ``validate.py``.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from models.data.errors import DataValidationError
from models.data.schema import Interactions, encode_interactions
from models.data.tables import read_table
from models.data.validate import validate_interactions

MOVIELENS_SCALE = (1.0, 5.0)
NAMED_DATASETS = ("ml-100k", "ml-1m")

_ML_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


def read_movielens_100k(folder: str | os.PathLike[str]) -> Interactions:
    """Read the GroupLens MovieLens 100K folder (``u.data`` with ``u.item``, ``u.user``, ``u.genre``).

    Parameters
    ----------
    folder : str or PathLike
        The unzipped ``ml-100k`` folder.

    Returns
    -------
    Interactions
        Ratings on the (1, 5) scale with Unix-second timestamps. ``item_features`` has
        ``title``, ``year`` (nullable Int64, from the release date) and one int8
        ``genre_<name>`` column per genre of ``u.genre``; ``user_features`` has ``age``,
        ``gender``, ``occupation`` and ``zip``.

    Raises
    ------
    DataValidationError
        When a file is missing or malformed, naming that file.
    """
    folder = Path(folder)
    paths = _require_files(folder, ("u.data", "u.item", "u.user", "u.genre"), "MovieLens 100K")
    raw = read_table(paths["u.data"], sep="\t", header=None, names=list(_ML_COLUMNS))
    frame, notes = _validate_movielens(raw, paths["u.data"])

    genres = read_table(paths["u.genre"], sep="|", header=None, names=["name", "index"])
    genre_names = genres.sort_values("index")["name"].tolist()
    item_fields = ["item_id", "title", "release_date", "video_release_date", "imdb_url"]
    items = read_table(
        paths["u.item"], sep="|", header=None, encoding="latin-1", quoting=csv.QUOTE_NONE
    )
    if items.shape[1] != len(item_fields) + len(genre_names):
        raise DataValidationError(
            f"has {items.shape[1]} fields per row",
            file=str(paths["u.item"]),
            allowed=f"{len(item_fields)} + {len(genre_names)} genre flags (from u.genre)",
        )
    items.columns = item_fields + [_genre_column(name) for name in genre_names]
    released = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce")
    items["year"] = released.dt.year.astype("Int64")
    flags = [_genre_column(name) for name in genre_names]
    item_features = items.set_index("item_id")[["title", "year", *flags]].astype(
        {flag: np.int8 for flag in flags}
    )

    user_features = read_table(
        paths["u.user"],
        sep="|",
        header=None,
        names=["user_id", "age", "gender", "occupation", "zip"],
        dtype={"zip": str},
    ).set_index("user_id")
    return encode_interactions(
        frame,
        rating_scale=MOVIELENS_SCALE,
        source=str(folder),
        user_features=user_features,
        item_features=item_features,
        notes=notes,
        features_list_every_item=True,  # the movie list: every movie, rated or not
    )


def read_movielens_1m(folder: str | os.PathLike[str]) -> Interactions:
    """Read the GroupLens MovieLens 1M folder (``ratings.dat`` with ``movies.dat``, ``users.dat``).

    Parameters
    ----------
    folder : str or PathLike
        The unzipped ``ml-1m`` folder.

    Returns
    -------
    Interactions
        Ratings on the (1, 5) scale with Unix-second timestamps. ``item_features`` has
        ``title``, ``year`` (nullable Int64, from the ``(1995)`` ending the title) and one int8
        ``genre_<name>`` column per genre; ``user_features`` has ``gender``, ``age`` and
        ``occupation`` (the README's codes) and ``zip``.

    Raises
    ------
    DataValidationError
        When a file is missing or malformed, naming that file.
    """
    folder = Path(folder)
    paths = _require_files(folder, ("ratings.dat", "movies.dat", "users.dat"), "MovieLens 1M")
    # "::" as a separator would need the slow Python engine; with ":" every other field is empty.
    raw = read_table(paths["ratings.dat"], sep=":", header=None, usecols=[0, 2, 4, 6])
    raw.columns = list(_ML_COLUMNS)
    frame, notes = _validate_movielens(raw, paths["ratings.dat"])

    # Titles may contain ":", so the small metadata files are split on the full "::".
    movies = read_table(
        paths["movies.dat"],
        sep="::",
        engine="python",
        header=None,
        names=["item_id", "title", "genres"],
        encoding="latin-1",
        quoting=csv.QUOTE_NONE,
    )
    flags = movies["genres"].str.get_dummies(sep="|").astype(np.int8)
    flags.columns = [_genre_column(name) for name in flags.columns]
    year = movies["title"].str.extract(r"\((\d{4})\)\s*$", expand=False)
    item_features = pd.concat(
        [movies[["item_id", "title"]], pd.to_numeric(year).astype("Int64").rename("year"), flags],
        axis=1,
    ).set_index("item_id")

    user_features = read_table(
        paths["users.dat"],
        sep="::",
        engine="python",
        header=None,
        names=["user_id", "gender", "age", "occupation", "zip"],
        dtype={"zip": str},
    ).set_index("user_id")
    return encode_interactions(
        frame,
        rating_scale=MOVIELENS_SCALE,
        source=str(folder),
        user_features=user_features,
        item_features=item_features,
        notes=notes,
        features_list_every_item=True,  # the movie list: every movie, rated or not
    )


def _require_files(folder: Path, names: tuple[str, ...], dataset: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataValidationError("no such folder", file=str(folder), allowed=f"a {dataset} folder")
    paths = {name: folder / name for name in names}
    for path in paths.values():
        if not path.is_file():
            raise DataValidationError(
                f"file not found in the {dataset} folder",
                file=str(path),
                allowed=f"a folder holding {', '.join(names)}",
            )
    return paths


def _validate_movielens(raw: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, tuple[str, ...]]:
    user_col, item_col, rating_col, timestamp_col = _ML_COLUMNS
    return validate_interactions(
        raw,
        file=str(path),
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        timestamp_col=timestamp_col,
        rating_scale=MOVIELENS_SCALE,
    )


def _genre_column(name: str) -> str:
    """``"Children's"`` -> ``genre_childrens``, ``"Film-Noir"`` -> ``genre_film_noir``."""
    slug = re.sub(r"[^0-9a-z]+", "_", name.lower().replace("'", "")).strip("_")
    return f"genre_{slug}"


RATING_FILE_SUFFIXES = (".data", ".base", ".test", ".dat")


def read_movielens_ratings(path: str | os.PathLike[str]) -> Interactions:
    """Read one headerless MovieLens ratings file, such as ML-100K's ``u1.base``/``u1.test``
    (tab-separated) or ML-1M's ``ratings.dat`` (``::``-separated), without side features.

    This is what explicit train/test files of the standard splits look like.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError("no such file", file=str(path), allowed="an existing file")
    if path.suffix == ".dat":
        raw = read_table(path, sep=":", header=None, usecols=[0, 2, 4, 6])
        raw.columns = list(_ML_COLUMNS)
    else:
        raw = read_table(path, sep="\t", header=None, names=list(_ML_COLUMNS))
    frame, notes = _validate_movielens(raw, path)
    return encode_interactions(frame, rating_scale=MOVIELENS_SCALE, source=str(path), notes=notes)
