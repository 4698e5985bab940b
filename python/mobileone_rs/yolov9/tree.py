"""A YOLOv9 tree's source files: read (a UTF-8 byte-order mark kept aside), changed, written all or none.

:func:`apply_patch` writes every change or none, each file whole: every file is checked writable
first, each new text goes to a temporary file beside its target (:mod:`mobileone_rs.files`), and the
temporary files replace their targets only once all of them are written.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from .._native import MobileOneError
from ..files import check_writable, replacing
from .source_text import lines as _lines

__all__ = ["BOM", "FileChange", "NotYolov9Error", "apply_patch", "read_source"]

BOM = "\ufeff"  # a UTF-8 byte-order mark: valid at the start of a Python file, refused by ast.parse(str)


class NotYolov9Error(MobileOneError):
    """The files under PATH are not a YOLOv9 tree this tool knows how to patch."""


@dataclass(frozen=True)
class FileChange:
    """One file's text before and after, with the names of the edits applied to it.

    ``old`` and ``new`` are the text after any UTF-8 byte-order mark; ``bom`` says the file starts
    with one, and the new file keeps it.
    """

    path: Path
    relative: Path
    old: str
    new: str
    edits: tuple[str, ...]
    bom: bool = False

    def new_bytes(self) -> bytes:
        """The bytes to write: the new text in UTF-8, behind the byte-order mark when the file had one."""
        return (BOM if self.bom else "").encode("utf-8") + self.new.encode("utf-8")

    def diff(self) -> str:
        """A unified diff in ``git diff`` form, paths relative to PATH."""
        lines = difflib.unified_diff(
            _lines(self.old),
            _lines(self.new),
            fromfile=f"a/{self.relative.as_posix()}",
            tofile=f"b/{self.relative.as_posix()}",
        )
        return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def read_source(path: Path) -> tuple[str, bool]:
    """A source file's text (line endings kept) without its UTF-8 byte-order mark, and whether it had one."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    return (text[1:], True) if text.startswith(BOM) else (text, False)


def _write_temporary(path: Path, data: bytes) -> None:
    """Writes ``data`` to the temporary file ``path`` and syncs it to disk."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def apply_patch(changes: list[FileChange]) -> None:
    """Writes every change's new text: all files or none, each one whole.

    Every file is checked writable first; then each new text goes to a temporary file beside its
    target, and only when all of them are written are they moved into place (``os.replace``). A
    failure part-way (disk full, a file-size limit) removes the temporary files and changes nothing.

    Raises:
        WriteError: naming the file that could not be written; no file was changed.
    """
    check_writable(change.path for change in changes)
    with contextlib.ExitStack() as stack:
        for change in changes:
            _write_temporary(stack.enter_context(replacing(change.path)), change.new_bytes())
