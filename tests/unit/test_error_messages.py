"""models.data.errors: the one line of a refusal, its row's line and note added after the fact,
and the advice for text that is not UTF-8, told apart by where the NUL bytes sit."""

from __future__ import annotations

import pytest

from models.data.errors import DataValidationError, reencoding_advice


def test_the_line_names_file_row_column_value_and_what_is_allowed():
    err = DataValidationError("is not a number", file="r.csv", row=4, column="rating",
                              value="x", allowed="1-5", more_rows=(7, 9), n_more=3)  # fmt: skip
    assert str(err) == (
        "r.csv, row 4, column 'rating': value 'x' is not a number; allowed: 1-5; "
        "3 more rows of this column are refused too (rows 7, 9, ...)"
    )


def test_a_note_is_added_without_a_line_and_a_line_without_a_note():
    err = DataValidationError("is too short", file="r.csv", row=2, column="rating")

    noted = err.at_line(None, "the row has 2 cells")
    assert str(noted) == "r.csv, row 2, column 'rating': is too short (the row has 2 cells)"
    assert str(err.at_line(3)) == "r.csv, row 2 (line 3), column 'rating': is too short"
    assert err.at_line(None) is err


def _advice(encoding: str) -> str:
    return f"the file is UTF-16, re-encode it (iconv -f {encoding} -t utf-8 IN > OUT)"


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("user_id,item_id\n".encode("utf-16"), "utf-16"),  # a byte-order mark
        ("user_id,item_id\n".encode("utf-16-le"), "utf-16le"),
        ("user_id,item_id\n".encode("utf-16-be"), "utf-16be"),
        ("abcd".encode("utf-16-le"), "utf-16le"),  # the shortest text told apart: 8 bytes
        ("abcd".encode("utf-16-be"), "utf-16be"),
        # one character in ten off the ASCII range: 90% of the NULs still where they belong
        ("abcdefghi\u20ac".encode("utf-16-le"), "utf-16le"),
        ("abcdefghi\u20ac".encode("utf-16-be"), "utf-16be"),
    ],
)
def test_utf16_is_told_apart_by_its_byte_order(text, encoding):
    assert reencoding_advice(text).endswith(_advice(encoding))


@pytest.mark.parametrize(
    "data",
    [
        "abc".encode("utf-16-le"),  # 6 bytes: too short to tell
        "abcdefgh\u20ac\u20ac".encode("utf-16-le"),  # 80% of the NULs: not UTF-16
        "abcdefgh\u20ac\u20ac".encode("utf-16-be"),
        "caf\xe9 cr\xe8me".encode("latin-1"),
    ],
)
def test_other_text_is_advised_as_latin1(data):
    assert "iconv -f latin-1 -t utf-8" in reencoding_advice(data)
