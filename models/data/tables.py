"""``pd.read_csv`` helpers shared by ``readers.py`` and ``movielens.py``.

Parse failures become one ``DataValidationError`` line naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from models.data.errors import DataValidationError


def read_table(path: Path, **options: object) -> pd.DataFrame:
    """``pd.read_csv`` whose parse failures become one-line errors naming the file."""
    try:
        return pd.read_csv(path, **options)  # type: ignore[call-overload]
    except pd.errors.EmptyDataError as err:
        raise DataValidationError("is empty", file=str(path), allowed="data rows") from err
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise parse_error(str(path), err, header_lines=0) from err


def parse_error(file: str, err: Exception, *, header_lines: int) -> DataValidationError:
    """The parser's complaint as one line; a ragged row is named by its data row."""
    reason = " ".join(str(err).split())
    ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", reason)
    if ragged is None:
        return DataValidationError(f"cannot be parsed ({reason})", file=file)
    expected, line, seen = (int(number) for number in ragged.groups())
    return DataValidationError(
        f"has {seen} fields (line {line} of the file)",
        file=file,
        row=line - header_lines,
        allowed=f"{expected} fields, as in the first row",
    )
