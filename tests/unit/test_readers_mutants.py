"""``models.data.readers`` where a changed operator would still read good files: the column a
byte that is not UTF-8 is named in, when the line before it ends with a delimiter; the line of a
row; which of the re-ranker's user columns a file gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.data.errors import DataValidationError
from models.data.readers import line_of_row, load_dataset, read_interactions, read_item_list


@pytest.mark.parametrize("previous", ["1,Heat,", "1,Heat,4"], ids=["empty-last-field", "full"])
def test_a_byte_that_is_not_utf8_is_named_by_the_column_of_its_own_line(tmp_path, previous):
    path = tmp_path / "ratings.csv"
    bad_line = "2,Mis\xe9rables,3"
    path.write_bytes(f"user_id,item_id,rating\n{previous}\n{bad_line}\n".encode("latin-1"))
    header = ["user_id", "item_id", "rating"]
    # the oracle: the field of the bad byte is the number of delimiters before it on its line
    column = header[bad_line[: bad_line.index("\xe9")].count(",")]
    with pytest.raises(DataValidationError) as refused:
        read_interactions(path)
    assert refused.value.column == column == "item_id"
    assert refused.value.row == 2
    assert "(line 3) is not valid UTF-8" in str(refused.value)


def _refused(path: Path, text: str | bytes) -> DataValidationError:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataValidationError) as refused:
        read_interactions(path)
    return refused.value


def test_a_non_utf8_byte_after_an_empty_first_field_is_in_the_second_column(tmp_path):
    error = _refused(
        tmp_path / "r.csv", "user_id,item_id,rating\n,Mis\xe9rables,3\n".encode("latin-1")
    )
    assert error.column == "item_id" and error.row == 1


def test_a_non_utf8_byte_in_the_header_or_past_its_columns_names_no_column(tmp_path):
    in_header = _refused(tmp_path / "h.csv", "user_id,it\xe9m,rating\n1,a,4\n".encode("latin-1"))
    assert in_header.column is None and in_header.row is None
    past = _refused(tmp_path / "p.csv", "user_id,item_id,rating\n1,a,4,\xe9\n".encode("latin-1"))
    assert past.column is None and past.row == 1
    assert "(line 2) is not valid UTF-8" in str(past)


@pytest.mark.parametrize(
    "text", ["user_id,item_id,rating\n1,a,4\n,,\n2,b,5\n", "user_id,item_id\n1,a\n,\n2,b\n"]
)
def test_a_row_of_empty_fields_is_a_row_and_its_line_is_named(tmp_path, text):
    error = _refused(tmp_path / "e.csv", text)
    assert error.row == 2 and error.line == 3 and error.column == "user_id"


def test_the_line_of_a_row_follows_quoted_line_breaks_with_the_headers_delimiter(tmp_path):
    # the rows hold more '|' than ',': only the header says the delimiter is ','
    text = ('user_id,item_id,rating\n1,"a|b|c|d|e|f|g|h|i|j",4\n2,"two\nlines",5\n'
            "3,c,9\n")  # fmt: skip
    error = _refused(tmp_path / "q.csv", text)
    assert error.row == 3 and error.column == "rating"
    assert error.line == text.split("\n").index("3,c,9") + 1


def test_a_movielens_ratings_file_is_read_as_one_and_a_csv_file_by_its_header(tmp_path):
    base = tmp_path / "u1.base"
    base.write_text("1\t10\t4\t881250949\n2\t10\t5\t881250950\n3\t20\t1\t881250951\n")
    ml = load_dataset(str(base))
    assert ml.n_users == 3 and ml.rating_scale == (1.0, 5.0)
    assert sorted(ml.frame["rating"].tolist()) == [1.0, 4.0, 5.0]
    csv = tmp_path / "r.csv"
    csv.write_text("user_id,item_id,rating\nu1,a,2\nu2,b,3\n")
    data = load_dataset(str(csv), rating_scale=(1.0, 3.0))
    assert data.user_ids.tolist() == ["u1", "u2"] and data.rating_scale == (1.0, 3.0)
    assert load_dataset(str(csv)).item_ids.tolist() == ["a", "b"]
    # options are read_interactions' own: a MovieLens ratings file is no table it reads
    with pytest.raises(DataValidationError, match=r"unsupported file type '\.base'"):
        load_dataset(str(base), rating_scale=(1.0, 5.0))


def test_a_header_of_two_columns_names_its_delimiter(tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("user_id;item_id\nu1;a\nu2;b\n")
    data = read_interactions(path)
    assert data.user_ids.tolist() == ["u1", "u2"] and data.item_ids.tolist() == ["a", "b"]


def test_the_line_of_a_non_utf8_byte_counts_a_blank_first_line(tmp_path):
    text = b"\nuser_id,item_id,rating\n1,\xe9,4\n"
    error = _refused(tmp_path / "b.csv", text)
    line = text[: text.index(b"\xe9")].count(b"\n") + 1
    assert f"(line {line}) is not valid UTF-8" in str(error) and line == 3


def test_an_empty_id_of_an_item_list_is_named_by_its_row(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title\na,Alpha\n ,Beta\nb,Gamma\n")
    with pytest.raises(DataValidationError) as refused:
        read_item_list(path)
    assert refused.value.row == 2 and refused.value.column == "item_id"


def test_a_one_column_tsv_item_list_keeps_commas_in_its_ids(tmp_path):
    # a header without any delimiter takes the file type's default, here a tab
    path = tmp_path / "items.tsv"
    ids = ["foo,bar", "baz"]
    path.write_text("item_id\n" + "\n".join(ids) + "\n")
    assert list(read_item_list(path)) == ids


def test_the_line_of_a_row_skips_blank_lines_and_follows_a_quoted_line_break(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('user_id,item_id,rating\n\n1,a,4\n"2\nx",b,5\n\n3,c,2\n')

    assert [line_of_row(path, row) for row in (1, 2, 3, 4)] == [3, 4, 7, None]


def test_a_short_first_row_is_said_to_have_fewer_fields_than_the_header(tmp_path):
    error = _refused(tmp_path / "short.csv", "user_id,item_id,rating\n1,a\n2,b,5\n")

    assert error.row == 1 and error.line == 2 and error.column == "rating"
    assert "(its line has 2 of the header's 3 fields)" in str(error)


def test_the_rankers_user_columns_are_those_the_file_has_and_no_other_role_takes(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text(
        "user_id,item_id,rating,age,gender,region\n"
        "u1,a,4,30,M,north\nu2,b,5,,,south\nu1,c,3,,,north\nu3,d,2,,f,west\n"
    )

    data = read_interactions(
        path, side_columns=("age", "gender", "occupation", "region"), user_columns=("region",)
    )

    assert list(data.user_features.columns) == ["region", "age", "gender"]
    assert data.user_features["gender"].tolist()[::2] == ["M", "F"]
    assert (
        data.notes[-1]
        == "user features for the re-ranker: age, gender (2 of 3 users with one or more)"
    )
