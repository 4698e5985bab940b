"""Reading checkpoint files: every file that cannot be read is one ``CheckpointError`` naming it.

``.safetensors`` files are read with the optional ``safetensors`` package (``mobileone-rs[safetensors]``),
anything else with ``torch.load``. An interrupted download, a saved link or error page instead of the
file, an empty file, a folder, a zip archive that is not a torch checkpoint: each gets a message
that names the file and says what is wrong, never the reader's own exception.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import torch

from ._native import MobileOneError

__all__ = ["SAFETENSORS_INSTALL", "CheckpointError", "load_checkpoint", "naming_the_file"]

SAFETENSORS_INSTALL = "pip install 'mobileone-rs[safetensors]' (or pip install safetensors)"


class CheckpointError(MobileOneError, ValueError):
    """A checkpoint that cannot be read or mapped onto Apple's names exactly."""


@contextlib.contextmanager
def naming_the_file(path: str | os.PathLike) -> Iterator[None]:
    """A ``CheckpointError`` raised in the block names ``path`` at its start."""
    name = os.fspath(path)
    try:
        yield
    except CheckpointError as err:
        if str(err).startswith(f"{name}:"):
            raise
        raise CheckpointError(f"{name}: {err}") from err


def _text_start(path: str) -> str | None:
    """The file's first line when the file starts as printable text (a link, an HTML page), else None."""
    with open(path, "rb") as f:
        head = f.read(200)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:80] if line and line.isprintable() else None


def _what_is_wrong(err: Exception) -> str:
    """Why a file could not be read, in the reader's own words (the first line of them)."""
    words = str(err).split("WeightsUnpickler error:", 1)[-1]
    detail = next((line.strip() for line in words.splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {detail}" if detail else type(err).__name__


def _check_file(path: str) -> None:
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes; an interrupted download?)")
    try:
        text = _text_start(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    if text is not None:  # checkpoints (zip, pickle, safetensors) start with non-printable bytes
        raise CheckpointError(
            f"{path}: a text file starting {text!r}, not a checkpoint (a saved link or error page instead of "
            "the file?)"
        )


def _load_safetensors(path: str) -> Mapping:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise CheckpointError(
            f"{path}: reading .safetensors needs the safetensors package: {SAFETENSORS_INSTALL}"
        ) from exc
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({_what_is_wrong(exc)}; an interrupted download?)"
        ) from exc


def load_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> Mapping:
    """Read a checkpoint file: ``.safetensors`` through safetensors, anything else with ``torch.load``.

    ``weights_only=True`` (the default) unpickles tensors and plain containers only; pass False only
    for a file you trust (it can run code).

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    _check_file(path)
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # torch.load raises anything the bytes provoke: KeyError, EOFError, ...
        # torch reports every weights_only failure as one long text; only "Unsupported global" means
        # pickled objects that a trusted load would read.
        if weights_only and "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: torch.load(weights_only=True) refused it ({_what_is_wrong(exc)}). If you trust "
                "the file, load it yourself with torch.load(path, weights_only=False) and pass the dict (or "
                "--trust-pickle on the command line)"
            ) from exc
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_what_is_wrong(exc)})") from exc
