"""``python -m mobileone_rs.yolov9 patch PATH [--dry-run | --check] [--model-only]``: the command line.

Prints the diff of every edit, then one line naming them; see :mod:`mobileone_rs.yolov9.patch`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..files import WriteError
from .patch import plan_patch
from .tree import FileChange, NotYolov9Error, apply_patch

__all__ = ["main", "summary"]

EXIT_OK, EXIT_NEEDS_PATCH, EXIT_REFUSED = 0, 1, 2


def summary(changes: list[FileChange]) -> str:
    """One ``edit (files)`` item per edit, in the order the edits are made."""
    files: dict[str, list[str]] = {}
    for change in changes:
        for edit in change.edits:
            files.setdefault(edit, []).append(change.relative.as_posix())
    return "; ".join(
        f"{edit} ({', '.join(where) if len(where) <= 2 else f'{len(where)} files'})"
        for edit, where in files.items()
    )


DESCRIPTION = (
    "Patch a YOLOv9 source tree: its model yaml files can name MobileOne (edits to models/), and "
    "its scripts run under torch 2.13 with today's Pillow, NumPy and albumentations, offline."
)
PATCH_EPILOG = (
    "model edits: import mobileone_rs (models/common.py), parse_model channel set, fuse reparameterize and "
    "parse_model yaml-layer hint (models/yolo.py). Runtime edits (skipped with --model-only): torch.load "
    "weights_only=False, fonts offline, Pillow 10 text size, NumPy 2 trapezoid, ONNX TorchScript exporter, "
    "requirements pins, fused-weights warning. "
    "Exit status: 0 done (or nothing to do), 1 --check found edits to make, 2 PATH refused or a file "
    "could not be written (then no file was changed)."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mobileone_rs.yolov9", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    patch = sub.add_parser(
        "patch",
        help="patch a YOLOv9 tree (prints the diff; idempotent)",
        description=DESCRIPTION,
        epilog=PATCH_EPILOG,
    )
    patch.add_argument(
        "path", type=Path, help="the YOLOv9 checkout (the folder that holds models/) or the yolo9 package"
    )
    mode = patch.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    mode.add_argument("--check", action="store_true", help="exit 1 if the tree needs patching, write nothing")
    patch.add_argument("--model-only", action="store_true", help="only the model edits, no runtime edits")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        changes = plan_patch(args.path, runtime=not args.model_only)
    except NotYolov9Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if not changes:
        print(f"{args.path}: already patched, nothing to change")
        return EXIT_OK
    if args.check:
        print(f"{args.path}: needs patching: {summary(changes)}")
        return EXIT_NEEDS_PATCH
    print("".join(c.diff() for c in changes), end="")
    if args.dry_run:
        print(f"{args.path}: dry run, would patch: {summary(changes)}")
        return EXIT_OK
    try:
        apply_patch(changes)
    except WriteError as exc:
        print(f"error: {exc}; no file was changed", file=sys.stderr)
        return EXIT_REFUSED
    print(f"{args.path}: patched: {summary(changes)}")
    return EXIT_OK
