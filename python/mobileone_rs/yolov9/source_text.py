"""Text positions in Python source, for edits located with :mod:`ast` and made by text.

:mod:`ast` counts lines as Python does (only ``\\n``, ``\\r\\n`` and ``\\r`` end one; ``str.splitlines``
would also split at form feeds and the like), and its columns are UTF-8 byte offsets within a line.
Edits made through these helpers keep every other byte of a file as it was, line endings included.
"""

from __future__ import annotations

import ast
import re

# The nodes that carry a source position (``ast.AST`` itself declares none).
Located = ast.expr | ast.stmt | ast.keyword | ast.arg

_LINE = re.compile(r"[^\r\n]*(?:\r\n|\n|\r)|[^\r\n]+$")


def lines(text: str) -> list[str]:
    """The lines of ``text`` with their endings, numbered as :mod:`ast` numbers them."""
    return _LINE.findall(text)


def offset(text_lines: list[str], lineno: int, col_bytes: int) -> int:
    """Character offset into the joined text of 1-based ``lineno`` and a UTF-8 byte column."""
    line = text_lines[lineno - 1]
    col = len(line.encode("utf-8")[:col_bytes].decode("utf-8"))
    return sum(len(x) for x in text_lines[: lineno - 1]) + col


def end_lineno(node: Located) -> int:
    """The 1-based last line of ``node``; an error for a node built by hand rather than parsed."""
    if node.end_lineno is None:
        raise ValueError(f"{type(node).__name__} node has no end position")
    return node.end_lineno


def end_col_offset(node: Located) -> int:
    """The UTF-8 byte column just past ``node``; an error for a node built by hand rather than parsed."""
    if node.end_col_offset is None:
        raise ValueError(f"{type(node).__name__} node has no end position")
    return node.end_col_offset


def start_of(text: str, node: Located) -> int:
    """Character offset of the first character of ``node``."""
    return offset(lines(text), node.lineno, node.col_offset)


def end_of(text: str, node: Located) -> int:
    """Character offset just past the last character of ``node``."""
    return offset(lines(text), end_lineno(node), end_col_offset(node))


def newline_of(line: str) -> str:
    """The line ending of ``line`` (``\\n`` when it has none)."""
    for ending in ("\r\n", "\n", "\r"):
        if line.endswith(ending):
            return ending
    return "\n"


def insert_after_line(text: str, lineno: int, new_lines: list[str]) -> str:
    """Insert whole lines after 1-based ``lineno``, matching that line's line ending."""
    text_lines = lines(text)
    newline = newline_of(text_lines[lineno - 1])
    if not text_lines[lineno - 1].endswith(("\n", "\r")):
        text_lines[lineno - 1] += newline
    text_lines[lineno:lineno] = [line + newline for line in new_lines]
    return "".join(text_lines)


def replace_lines(text: str, first: int, last: int, new_lines: list[str]) -> str:
    """Replace 1-based lines ``first..last`` (inclusive) by ``new_lines``, in ``first``'s line ending."""
    text_lines = lines(text)
    newline = newline_of(text_lines[last - 1])
    text_lines[first - 1 : last] = [line + newline for line in new_lines]
    return "".join(text_lines)


def indent_of(text: str, lineno: int) -> str:
    """The leading spaces and tabs of 1-based ``lineno``."""
    indent = re.match(r"[ \t]*", lines(text)[lineno - 1])
    assert indent is not None  # the pattern matches the empty string
    return indent.group()


def splice(text: str, replacements: list[tuple[int, int, str]]) -> str:
    """``text`` with each ``(start, end, new)`` character span replaced; spans must not overlap."""
    for start, end, new in sorted(replacements, reverse=True):
        text = text[:start] + new + text[end:]
    return text
