"""Text files as the data readers take them: UTF-8, with or without a byte-order mark (Excel and
Notepad write one), and a one-line error naming the file and line when a file is not UTF-8."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

from mlxft.errors import UserError


def not_utf8(path: Path, number: int, byte: int, column: int) -> UserError:
    return UserError(f"{path}:{number}: not UTF-8 text (byte 0x{byte:02x} at column {column}); save the file as UTF-8")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its "\\n") for each line, streamed. Only "\\n" ends a line, so a
    stray "\\r" inside a field does not split a row; a "\\r\\n" ending loses its "\\r"."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(path, number, raw[e.start], e.start + 1) from None
            yield number, line.removesuffix("\n").removesuffix("\r")


def read_text(path: Path) -> str:
    """A whole file, decoded; a decoding error names the line it is on."""
    raw = Path(path).read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise not_utf8(path, raw.count(b"\n", 0, e.start) + 1, raw[e.start], e.start - line_start + 1) from None
