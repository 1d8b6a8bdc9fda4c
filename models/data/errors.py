"""The one exception type for bad input, with a message that names where and what is allowed."""

from __future__ import annotations

from typing import Any


class DataValidationError(ValueError):
    """Raised once, at the boundary, for the first problem found in an input.

    The message is a single line: ``<file>: row <n>, column '<col>': <value> <problem>; allowed: ...``.
    Rows are 1-based data rows (a header line is not counted); in a text file the row's line in
    the file follows (``row 2 (line 3)``), where an editor finds it. A problem with a training setting
    rather than a column (too many clients for the data, an unknown partition) names it as
    ``setting '<name>'``, by its name in the training configuration. Parts that do not apply are
    left out. When other rows of the same column have problems too, their count and the first
    few of them follow (``; 41 more rows of this column are refused too (rows 9, 12, 30, ...)``),
    so that a file is not fixed one row per run.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
        setting: str | None = None,
        value: Any = None,
        allowed: str | None = None,
        line: int | None = None,
        more_rows: tuple[int, ...] = (),
        n_more: int = 0,
    ) -> None:
        self.problem = problem
        self.file = file
        self.row = row
        self.line = line
        self.column = column
        self.setting = setting
        self.value = value
        self.allowed = allowed
        self.more_rows = tuple(more_rows)
        self.n_more = n_more
        at = None if row is None else f"row {row}" + ("" if line is None else f" (line {line})")
        where = [part for part in (file, at) if part]
        if column is not None:
            where.append(f"column {column!r}")
        if setting is not None:
            where.append(f"setting {setting!r}")
        what = problem if value is None else f"value {value!r} {problem}"
        message = f"{', '.join(where)}: {what}" if where else what
        if allowed:
            message += f"; allowed: {allowed}"
        if n_more:
            shown = ", ".join(str(r) for r in more_rows) + (
                ", ..." if n_more > len(more_rows) else ""
            )
            rows, are = ("row", "is") if n_more == 1 else ("rows", "are")
            message += f"; {n_more} more {rows} of this column {are} refused too ({rows} {shown})"
        super().__init__(message)

    def at_line(self, line: int | None, note: str = "") -> DataValidationError:
        """The same error, its row's line in the file named (None: unchanged), and ``note``
        after the problem, in brackets, when given."""
        if line is None and not note:
            return self
        copy = type(self)(
            f"{self.problem} ({note})" if note else self.problem, file=self.file, row=self.row,
            column=self.column, setting=self.setting, value=self.value, allowed=self.allowed,
            line=self.line if line is None else line, more_rows=self.more_rows,
            n_more=self.n_more,
        )  # fmt: skip
        copy.__cause__ = self.__cause__
        return copy


class NoDataRows(DataValidationError):
    """A table with a header and no data row: an error for training data, but a request
    file's way to say that its users have no history yet."""


def reencoding_advice(data: bytes) -> str:
    """What to do with text that is not UTF-8: UTF-16 (a byte-order mark, or a NUL byte beside
    nearly every ASCII one, after it in little-endian text, before it in big-endian) or, most
    often, latin-1."""
    head = data[:4096]
    even, odd = head[0::2], head[1::2]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"  # the mark says which end comes first
    elif len(head) >= 8 and odd.count(0) >= 0.9 * len(odd):
        encoding = "utf-16le"
    elif len(head) >= 8 and even.count(0) >= 0.9 * len(even):
        encoding = "utf-16be"
    else:
        return (
            "UTF-8 text; if the file is latin-1, re-encode it (iconv -f latin-1 -t utf-8 IN > OUT)"
        )
    return f"UTF-8 text; the file is UTF-16, re-encode it (iconv -f {encoding} -t utf-8 IN > OUT)"
