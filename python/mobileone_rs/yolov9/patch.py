"""Patch a YOLOv9 source tree so that its model yaml files can name ``MobileOne`` and its scripts run.

The reference article's three model edits (https://github.com/WongKinYiu/yolov9 layout), made by text so
that a reviewer sees exactly what changed:

1. ``models/common.py`` imports ``MobileOne, MobileOneBlock, reparameterize_model`` from this package,
   so ``from models.common import *`` in ``models/yolo.py`` puts ``MobileOne`` where ``parse_model``
   resolves module names.
2. ``parse_model`` lists ``MobileOne`` and ``MobileOneBlock`` in the set of modules whose first argument
   is the output channel count (``c1, c2 = ch[f], args[0]``), so the input channels are prepended for
   them (``MobileOneBlock`` is the stem layer of the pretrained ``yolov9-c-mobileone-s*.yaml``).
3. ``BaseModel.fuse`` re-parameterizes every module that can: ``m.reparameterize()``.

These alone make the model build, train and fuse. A fourth model edit helps when a yaml row is wrong:

4. ``parse_model`` builds each layer inside ``try``; a ``ConfigError`` from MobileOne is raised again
   naming the yaml layer (index, module, the row's arguments): :mod:`mobileone_rs.yolov9.hints`.

A file that starts with a UTF-8 byte-order mark keeps it. Every file is written whole or not at all,
and none is changed unless all can be (:func:`apply_patch`). Unless ``--model-only`` is given, the runtime edits
of :mod:`mobileone_rs.yolov9.runtime` follow: they make YOLOv9's own scripts (train, val, detect,
export) run under torch 2.13 with today's Pillow, NumPy and albumentations, offline.

Usage::

    python -m mobileone_rs.yolov9 patch PATH [--dry-run | --check] [--model-only]

PATH is a YOLOv9 checkout (the folder holding ``models/``) or an installed copy such as the ``yolo9``
package directory. The edits are located with :mod:`ast`, so they do not depend on whitespace, and
each one is skipped when already present: a second run changes nothing.

This module imports neither torch nor the native extension of its own accord.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .._native import MobileOneError
from ..files import WriteError, check_writable, replacing
from . import runtime as _yolov9_runtime
from .hints import add_yaml_layer_hint
from .source_text import indent_of as _indent_of
from .source_text import insert_after_line as _insert_after_line
from .source_text import lines as _lines
from .source_text import offset as _offset

__all__ = ["FileChange", "NotYolov9Error", "apply_patch", "main", "plan_patch", "summary"]

IMPORT_LINE = "from mobileone_rs import MobileOne, MobileOneBlock, reparameterize_model"
REPARAM_LINES = ("if hasattr(m, 'reparameterize'):", "m.reparameterize()")
# Modules whose first yaml argument is the output width: the stage, and the block (the S yamls' stem).
CHANNEL_SET_NAMES = ("MobileOne", "MobileOneBlock")
COMMON = Path("models") / "common.py"
YOLO = Path("models") / "yolo.py"
# Top-level packages of a YOLOv9 tree: upstream imports ``utils.x``, ``models.x``; PyPI's yolo9 ``yolo9.x``.
PROJECT_PACKAGES = frozenset({"utils", "models", "yolo9", "export"})

YAML_LAYER_HINT = "parse_model yaml-layer hint"
EXIT_OK, EXIT_NEEDS_PATCH, EXIT_REFUSED = 0, 1, 2
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


# ----------------------------------------------------------------------------------------------
# Shared.


def _parse(text: str, relative: Path) -> ast.Module:
    try:
        return ast.parse(text)
    except SyntaxError as exc:
        raise NotYolov9Error(f"{relative} does not parse as Python: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Edit 1: models/common.py imports the package.


def _binds_mobileone_from_package(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.ImportFrom)
        and node.module == "mobileone_rs"
        and any((alias.asname or alias.name) == "MobileOne" for alias in node.names)
    )


def _own_mobileone_definition(tree: ast.Module) -> ast.stmt | None:
    """A top-level ``class MobileOne`` or assignment, e.g. the seed's code pasted in by hand."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "MobileOne":
            return node
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "MobileOne" for t in node.targets
        ):
            return node
    return None


def _imports_yolov9_tree(node: ast.stmt) -> bool:
    """``from utils... import``, ``import models...``, ``from yolo9... import``, relative imports."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            return True
        names = [node.module or ""]
    else:
        names = [alias.name for alias in node.names]
    return any(name.split(".")[0] in PROJECT_PACKAGES for name in names)


def _import_anchor(tree: ast.Module) -> ast.stmt:
    """The header import after which the package import goes.

    That is the last third-party import before the first import from the YOLOv9 tree itself. In the
    ``yolo9`` package ``models/common.py`` imports ``export``, which imports ``models/yolo.py``, whose
    ``from ...models.common import *`` then sees only what common.py has bound so far: MobileOne must
    be bound before that cycle starts.
    """
    last = None
    for index, node in enumerate(tree.body):
        is_docstring = index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if _imports_yolov9_tree(node) and last is not None:
                return last
            last = node
        elif not is_docstring:
            break
    if last is None:
        raise NotYolov9Error(f"{COMMON} has no import block at the top")
    return last


def add_package_import(text: str) -> str:
    """Return ``models/common.py`` with the package import among its third-party header imports."""
    tree = _parse(text, COMMON)
    if any(_binds_mobileone_from_package(node) for node in tree.body):
        return text
    own = _own_mobileone_definition(tree)
    if own is not None:
        raise NotYolov9Error(
            f"{COMMON}:{own.lineno} already defines MobileOne (the seed's code pasted in?); "
            "remove that definition so the package's MobileOne is the one YOLOv9 uses"
        )
    return _insert_after_line(text, _import_anchor(tree).end_lineno, [IMPORT_LINE])


# ----------------------------------------------------------------------------------------------
# Edit 2: parse_model's channel set gains MobileOne.


def _top_level_function(tree: ast.Module, name: str, relative: Path) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise NotYolov9Error(f"{relative} has no top-level function {name}()")


def _assigns_c1_c2(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Tuple)
        and [getattr(e, "id", None) for e in node.targets[0].elts] == ["c1", "c2"]
    )


def _channel_set(parse_model: ast.FunctionDef) -> ast.Set | ast.Tuple | ast.List:
    """The literal in ``if m in {Conv, ...}:`` whose body does ``c1, c2 = ch[f], args[0]``."""
    found = []
    for node in ast.walk(parse_model):
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)):
            continue
        test = node.test
        if not (isinstance(test.left, ast.Name) and test.left.id == "m" and isinstance(test.ops[0], ast.In)):
            continue
        literal = test.comparators[0]
        if not isinstance(literal, (ast.Set, ast.Tuple, ast.List)):
            continue
        names = {e.id for e in literal.elts if isinstance(e, ast.Name)}
        if "Conv" in names and any(_assigns_c1_c2(stmt) for stmt in node.body):
            found.append(literal)
    if len(found) != 1:
        raise NotYolov9Error(
            f"{YOLO}: expected one 'if m in {{Conv, ...}}: c1, c2 = ch[f], args[0]' in parse_model(), "
            f"found {len(found)}"
        )
    return found[0]


def add_to_channel_set(text: str) -> str:
    """Return ``models/yolo.py`` with ``MobileOne`` and ``MobileOneBlock`` (the pretrained S yamls' stem
    layer) appended to parse_model's channel set, each unless already there."""
    literal = _channel_set(_top_level_function(_parse(text, YOLO), "parse_model", YOLO))
    present = {e.id for e in literal.elts if isinstance(e, ast.Name)}
    missing = [name for name in CHANNEL_SET_NAMES if name not in present]
    if not missing:
        return text
    last = literal.elts[-1]
    at = _offset(_lines(text), last.end_lineno, last.end_col_offset)
    return text[:at] + "".join(f", {name}" for name in missing) + text[at:]


# ----------------------------------------------------------------------------------------------
# Edit 3: BaseModel.fuse re-parameterizes.


def _fuse_loop(tree: ast.Module) -> ast.For:
    """``for m in self.model.modules():`` inside ``BaseModel.fuse``."""
    base = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BaseModel"), None)
    if base is None:
        raise NotYolov9Error(f"{YOLO} has no class BaseModel")
    fuse = next((n for n in base.body if isinstance(n, ast.FunctionDef) and n.name == "fuse"), None)
    if fuse is None:
        raise NotYolov9Error(f"{YOLO}: BaseModel has no fuse() method")
    loops = [
        node
        for node in ast.walk(fuse)
        if isinstance(node, ast.For)
        and isinstance(node.target, ast.Name)
        and node.target.id == "m"
        and isinstance(node.iter, ast.Call)
        and getattr(node.iter.func, "attr", None) == "modules"
    ]
    if len(loops) != 1:
        raise NotYolov9Error(
            f"{YOLO}: expected one 'for m in self.model.modules():' in fuse(), found {len(loops)}"
        )
    return loops[0]


def _calls_reparameterize(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Call)
        and getattr(node.test.func, "id", None) == "hasattr"
        and len(node.test.args) == 2
        and isinstance(node.test.args[1], ast.Constant)
        and node.test.args[1].value == "reparameterize"
    )


def add_reparameterize_to_fuse(text: str) -> str:
    """Return ``models/yolo.py`` with ``m.reparameterize()`` at the end of fuse()'s module loop."""
    loop = _fuse_loop(_parse(text, YOLO))
    if any(_calls_reparameterize(node) for node in ast.walk(loop)):
        return text
    outer, body = _indent_of(text, loop.lineno), _indent_of(text, loop.body[0].lineno)
    step = body[len(outer) :] or "    "
    new_lines = [body + REPARAM_LINES[0], body + step + REPARAM_LINES[1]]
    return _insert_after_line(text, loop.body[-1].end_lineno, new_lines)


# ----------------------------------------------------------------------------------------------
# Planning, applying, command line.


def read_source(path: Path) -> tuple[str, bool]:
    """A source file's text (line endings kept) without its UTF-8 byte-order mark, and whether it had one."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    return (text[1:], True) if text.startswith(BOM) else (text, False)


def _read(root: Path, relative: Path) -> tuple[str, bool]:
    path = root / relative
    if not path.is_file():
        hint = " (PATH is the folder that holds models/, not models/ itself)" if root.name == "models" else ""
        raise NotYolov9Error(f"{path} not found: {root} does not look like a YOLOv9 tree{hint}")
    try:
        return read_source(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise NotYolov9Error(f"cannot read {path}: {exc}") from exc


def _change(root: Path, relative: Path, source: tuple[str, bool], steps) -> FileChange | None:
    old, bom = source
    new, edits = old, []
    for name, step in steps:
        edited = step(new)
        if edited != new:
            new, edits = edited, edits + [name]
    return FileChange(root / relative, relative, old, new, tuple(edits), bom) if edits else None


def _check_root(root: Path) -> None:
    if not root.exists():
        raise NotYolov9Error(f"{root}: no such directory (PATH is the YOLOv9 checkout, the folder that holds models/)")
    if not root.is_dir():
        raise NotYolov9Error(f"{root} is a file: PATH is the YOLOv9 checkout, the folder that holds models/")


def _read_optional(root: Path, relative: Path) -> tuple[str, bool] | None:
    """A file a runtime edit looks at (as :func:`read_source`), or None when it cannot be read as UTF-8."""
    try:
        return read_source(root / relative)
    except (OSError, UnicodeDecodeError):
        return None


def plan_patch(root: str | Path, runtime: bool = True) -> list[FileChange]:
    """The changes that would patch ``root``; empty when it is already patched.

    Args:
        root: the YOLOv9 checkout (the folder that holds ``models/``) or an installed copy.
        runtime: also the edits that make YOLOv9's scripts run under torch 2.13 with today's
            Pillow, NumPy and albumentations, offline (:mod:`mobileone_rs.yolov9.runtime`); the
            model itself needs only the three model edits.

    Raises:
        NotYolov9Error: PATH or a model file is missing, or parse_model / fuse do not have the expected shape.
    """
    root = Path(root)
    _check_root(root)
    # Check both model files before changing anything, so a refusal never leaves a half-patched tree.
    texts = {COMMON: _read(root, COMMON), YOLO: _read(root, YOLO)}
    steps: dict[Path, list] = {
        COMMON: [("import mobileone_rs", add_package_import)],
        YOLO: [
            ("parse_model channel set", add_to_channel_set),
            ("fuse reparameterize", add_reparameterize_to_fuse),
            (YAML_LAYER_HINT, add_yaml_layer_hint),
        ],
    }
    if runtime:
        for relative, name, step in _yolov9_runtime.runtime_steps(root):
            if relative not in texts:
                texts[relative] = _read_optional(root, relative)
            if texts[relative] is not None:
                steps.setdefault(relative, []).append((name, step))
    changes = [_change(root, relative, texts[relative], file_steps) for relative, file_steps in steps.items()]
    return [c for c in changes if c is not None]


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


def summary(changes: list[FileChange]) -> str:
    """One ``edit (files)`` item per edit, in the order the edits are made."""
    files: dict[str, list[str]] = {}
    for change in changes:
        for edit in change.edits:
            files.setdefault(edit, []).append(change.relative.as_posix())
    return "; ".join(
        f"{edit} ({', '.join(where) if len(where) <= 2 else f'{len(where)} files'})" for edit, where in files.items()
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
        "patch", help="patch a YOLOv9 tree (prints the diff; idempotent)", description=DESCRIPTION, epilog=PATCH_EPILOG
    )
    patch.add_argument("path", type=Path, help="the YOLOv9 checkout (the folder that holds models/) or the yolo9 package")
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


if __name__ == "__main__":
    sys.exit(main())
