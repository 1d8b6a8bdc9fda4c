"""``models.data.readers`` where a changed operator would still read good files: the column a
byte that is not UTF-8 is named in, when the line before it ends with a delimiter."""

from __future__ import annotations

import pytest

from models.data.errors import DataValidationError
from models.data.readers import read_interactions


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
