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
and none is changed unless all can be (:func:`apply_patch`). Unless ``--model-only`` is given, the runtime
edits
of :mod:`mobileone_rs.yolov9.runtime` follow: they make YOLOv9's own scripts (train, val, detect,
export) run under torch 2.13 with today's Pillow, NumPy and albumentations, offline.

Usage::

    python -m mobileone_rs.yolov9 patch PATH [--dry-run | --check] [--model-only]

PATH is a YOLOv9 checkout (the folder holding ``models/``) or an installed copy such as the ``yolo9``
package directory. The edits are located with :mod:`ast`, so they do not depend on whitespace, and
each one is skipped when already present: a second run changes nothing.

The command line is :mod:`mobileone_rs.yolov9.cli`; reading and writing the files (all or none, a
byte-order mark kept) :mod:`mobileone_rs.yolov9.tree`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from . import runtime as _yolov9_runtime
from .hints import add_yaml_layer_hint
from .source_text import end_col_offset as _end_col_offset
from .source_text import end_lineno as _end_lineno
from .source_text import indent_of as _indent_of
from .source_text import insert_after_line as _insert_after_line
from .source_text import lines as _lines
from .source_text import offset as _offset
from .tree import FileChange, NotYolov9Error, apply_patch, read_source

__all__ = ["FileChange", "NotYolov9Error", "apply_patch", "plan_patch"]

IMPORT_LINE = "from mobileone_rs import MobileOne, MobileOneBlock, reparameterize_model"
REPARAM_LINES = ("if hasattr(m, 'reparameterize'):", "m.reparameterize()")
# Modules whose first yaml argument is the output width: the stage, and the block (the S yamls' stem).
CHANNEL_SET_NAMES = ("MobileOne", "MobileOneBlock")
COMMON = Path("models") / "common.py"
YOLO = Path("models") / "yolo.py"
# Top-level packages of a YOLOv9 tree: upstream imports ``utils.x``, ``models.x``; PyPI's yolo9 ``yolo9.x``.
PROJECT_PACKAGES = frozenset({"utils", "models", "yolo9", "export"})

YAML_LAYER_HINT = "parse_model yaml-layer hint"


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
    """A top-level ``class MobileOne`` or assignment, e.g. the reference MobileOne code pasted in by hand."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "MobileOne":
            return node
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "MobileOne" for t in node.targets
        ):
            return node
    return None


def _imports_yolov9_tree(node: ast.Import | ast.ImportFrom) -> bool:
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
            f"{COMMON}:{own.lineno} already defines MobileOne (the reference MobileOne code pasted in "
            "by hand?); remove that definition so the package's MobileOne is the one YOLOv9 uses"
        )
    return _insert_after_line(text, _end_lineno(_import_anchor(tree)), [IMPORT_LINE])


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
    at = _offset(_lines(text), _end_lineno(last), _end_col_offset(last))
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


def _calls_reparameterize(node: ast.AST) -> bool:
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
    return _insert_after_line(text, _end_lineno(loop.body[-1]), new_lines)


# ----------------------------------------------------------------------------------------------
# Planning.


def _read(root: Path, relative: Path) -> tuple[str, bool]:
    path = root / relative
    if not path.is_file():
        hint = " (PATH is the folder that holds models/, not models/ itself)" if root.name == "models" else ""
        raise NotYolov9Error(f"{path} not found: {root} does not look like a YOLOv9 tree{hint}")
    try:
        return read_source(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise NotYolov9Error(f"cannot read {path}: {exc}") from exc


def _change(
    root: Path, relative: Path, source: tuple[str, bool], steps: list[tuple[str, _yolov9_runtime.Edit]]
) -> FileChange | None:
    old, bom = source
    new = old
    edits: list[str] = []
    for name, step in steps:
        edited = step(new)
        if edited != new:
            new, edits = edited, edits + [name]
    return FileChange(root / relative, relative, old, new, tuple(edits), bom) if edits else None


def _check_root(root: Path) -> None:
    if not root.exists():
        raise NotYolov9Error(
            f"{root}: no such directory (PATH is the YOLOv9 checkout, the folder that holds models/)"
        )
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
    unreadable: set[Path] = set()  # runtime-edit files that cannot be read as UTF-8: left alone
    steps: dict[Path, list[tuple[str, _yolov9_runtime.Edit]]] = {
        COMMON: [("import mobileone_rs", add_package_import)],
        YOLO: [
            ("parse_model channel set", add_to_channel_set),
            ("fuse reparameterize", add_reparameterize_to_fuse),
            (YAML_LAYER_HINT, add_yaml_layer_hint),
        ],
    }
    if runtime:
        for relative, name, step in _yolov9_runtime.runtime_steps(root):
            if relative not in texts and relative not in unreadable:
                source = _read_optional(root, relative)
                if source is None:
                    unreadable.add(relative)
                else:
                    texts[relative] = source
            if relative in texts:
                steps.setdefault(relative, []).append((name, step))
    changes = [_change(root, relative, texts[relative], file_steps) for relative, file_steps in steps.items()]
    return [c for c in changes if c is not None]


if __name__ == "__main__":
    from .cli import main

    sys.exit(main())
