"""The rows of a CSV file a user hands fedssl (FER2013 faces, a device trace).

Such a file may be anything: not text, a field past the csv module's size limit, a
quote never closed. Each of these ends as a `UserError` naming the file and line,
whichever reader asked for the rows.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from fedssl.errors import UserError


def csv_rows(path: Path, what: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (line, fields) for each row of `path`, the header included.

    Args:
        path: the CSV file, UTF-8 (a byte-order mark, as Excel writes, is dropped).
        what: what the file should be, for the error line ("the FER2013 CSV").

    Yields:
        The row's last physical line (as an editor numbers it) and its fields.

    Raises:
        UserError: the file is not UTF-8 text, or not CSV (a field larger than the
            csv module's limit, a NUL byte, ...).
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            for row in reader:
                yield reader.line_num, row
    except UnicodeDecodeError as error:
        where = first_undecodable_line(path)
        raise UserError(f"{path}{f', line {where}' if where else ''}: not UTF-8 text "
                        f"(byte {error.object[error.start:error.start + 1]!r}); expected {what}") from None
    except csv.Error as error:
        # line_num counts the lines the reader took, the one it failed on included.
        raise UserError(f"{path}, line {reader.line_num}: malformed CSV ({error}); expected {what}") from None


def first_undecodable_line(path: Path) -> int | None:
    """The number of the first line of `path` that is not UTF-8, if any.

    The text reader decodes in chunks, so the error it raises cannot say which line
    the byte is on; a UTF-8 character never spans a line break, so each line decodes alone.
    """
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def brief(text: str, limit: int = 32) -> str:
    """`text` quoted, cut to `limit` characters: a field may hold a whole image's
    pixels, which an error line must not print."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"
