"""Atomic file output: every file the package writes appears whole or not at all.

A write goes to a temporary name in the target's own folder and is moved into place with
``os.replace`` (atomic on POSIX and Windows within one filesystem); a failure part-way (disk full,
a file-size limit, an interrupt) removes the temporary file and leaves the old file untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ._native import MobileOneError


class WriteError(MobileOneError, OSError):
    """A file could not be written; the message names it and says why."""


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on a clean exit it replaces ``path``.

    Example: ``with replacing(out) as tmp: torch.save(obj, tmp)``. On an exception the temporary
    file is removed and ``path`` keeps its old content (or stays absent). A symbolic link is
    written through: its target file is replaced, the link stays.
    """
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise WriteError(f"cannot write {target}: {err.strerror or err}") from err
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _keep_mode(target, tmp)
        os.replace(tmp, target)
    except WriteError:  # another file's, from a nested replacing(): it names that file
        tmp.unlink(missing_ok=True)
        raise
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {target}: {err.strerror or err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _keep_mode(target: Path, tmp: Path) -> None:
    """The new file gets the old one's permissions (mkstemp makes it 0600), else the umask's."""
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Writes ``text`` to ``path`` atomically (newlines as given, no translation)."""
    write_bytes(path, text.encode(encoding))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically, synced to disk before the move."""
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def check_writable(paths: Iterable[str | os.PathLike]) -> None:
    """Raises ``WriteError`` naming the first path that could not be replaced by a write.

    Run before changing any of several files, so that a batch of edits is not left half done.
    """
    for path in map(Path, paths):
        folder = path.parent
        if not folder.is_dir():
            raise WriteError(f"cannot write {path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise WriteError(f"cannot write {path}: folder {folder} is not writable")
        if path.exists() and not os.access(path, os.W_OK):
            raise WriteError(f"cannot write {path}: the file is read-only")
