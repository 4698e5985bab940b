"""Edits that make a YOLOv9 tree run under the torch this package needs, offline, with today's libraries.

The model itself needs only the three edits of :mod:`mobileone_rs.yolov9`. Upstream YOLOv9 was
written for torch 1.x, Pillow 9 and NumPy 1, and fetches a font from the internet; with torch 2.13 and
the current Pillow, NumPy and albumentations its scripts break in ways that have nothing to do with
MobileOne. Each edit below is located with :mod:`ast` (or by requirement name), is skipped when the
code already does the right thing (so the yolo9 package, which fixed some of these itself, gets only
what it lacks) and is idempotent.

- ``torch.load weights_only=False``: torch >= 2.6 unpickles with ``weights_only=True`` by default, and a
  YOLOv9 checkpoint is a pickled model (every YOLOv9 module class, this package's classes, the training
  options, NumPy scalars): every ``torch.load`` in the tree without a ``weights_only`` argument gets
  ``weights_only=False``, i.e. torch's behaviour before 2.6. Allow-listing classes with
  ``torch.serialization.add_safe_globals`` instead would have to name every class any checkpoint can
  hold, custom modules included, and would break on the first one missed.
- ``fonts offline``: ``check_font`` tries each font download once per process and, when it fails, logs
  one warning instead of raising; ``check_pil_font`` then falls back to Pillow's built-in font.
- ``Pillow 10 text size``: ``font.getsize()`` (removed in Pillow 10) becomes ``font.getbbox()``.
- ``NumPy 2 trapezoid``: ``np.trapz`` (removed in NumPy 2.4) becomes ``np.trapezoid`` where it exists.
- ``ONNX TorchScript exporter``: ``torch.onnx.export(..., dynamo=False)``, the exporter ``export.py`` was
  written for (torch >= 2.9 defaults to the dynamo exporter, which needs onnxscript, ignores
  ``--opset`` and writes an external ``.onnx.data`` file).
- ``requirements pins``: ``requirements.txt`` gets the bounds YOLOv9's code needs (albumentations < 2,
  setuptools < 81, Pillow >= 9.2).
- ``fused-weights warning``: ``intersect_dicts`` (how the training scripts load ``--weights``) warns when
  the checkpoint's MobileOne blocks are fused and the model's are not: those weights cannot transfer
  (:mod:`mobileone_rs.yolov9.transfer`).
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Callable
from pathlib import Path

from .source_text import (
    Located,
    end_col_offset,
    end_lineno,
    end_of,
    indent_of,
    lines,
    newline_of,
    splice,
    start_of,
)
from .transfer import warn_in_intersect_dicts

WEIGHTS_ONLY = "torch.load weights_only=False"
FONTS = "fonts offline"
TEXT_SIZE = "Pillow 10 text size"
TRAPEZOID = "NumPy 2 trapezoid"
ONNX_EXPORTER = "ONNX TorchScript exporter"
REQUIREMENTS = "requirements pins"
FUSED_WARNING = "fused-weights warning"

GENERAL = Path("utils") / "general.py"
PLOTS = Path("utils") / "plots.py"
REQUIREMENTS_TXT = Path("requirements.txt")
FONT_MEMO = "_FONTS_NOT_DOWNLOADED"
FONT_FALLBACK = "plots use Pillow\\'s built-in font"

Edit = Callable[[str], str]

# (distribution, the bound it needs, why): what YOLOv9's code needs from its requirements.txt.
REQUIREMENT_PINS = (
    ("albumentations", "<2", "albumentations 2 renamed the arguments utils/augmentations.py passes"),
    ("setuptools", "<81", "utils/general.py imports pkg_resources, removed in setuptools 81"),
    ("Pillow", ">=9.2", "ImageFont.getbbox() for every font, the default one included"),
)
# After the name: version specifier (spaces allowed), anything else (extras, markers), comment.
_REQUIREMENT_REST = r"(?=[\s<>=!~;#\[]|$)\s*((?:[<>=!~]=?=?\s*[\w.*+-]+\s*,?\s*)*)([^#\r\n]*)(#[^\r\n]*)?"
_SKIPPED_DIRS = frozenset({"__pycache__", "site-packages", "node_modules", "runs"})


def _parse(text: str) -> ast.Module | None:
    try:
        return ast.parse(text)
    except SyntaxError:  # not ours to judge: a file that does not parse is left alone
        return None


def _dotted(node: ast.AST) -> str:
    """``torch.onnx.export`` for the expression ``torch.onnx.export``; "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _dotted(n.func) == name]


def _add_keyword(text: str, function: str, keyword: str, value: str) -> str:
    """Every call of ``function`` without ``keyword`` (and without ``**kwargs``) gets ``keyword=value``."""
    tree = _parse(text) if function in text else None
    if tree is None:
        return text
    inserts = []
    for call in _calls(tree, function):
        if any(k.arg in (None, keyword) for k in call.keywords) or not (call.args or call.keywords):
            continue
        arguments: list[Located] = [*call.args, *call.keywords]
        last = max(arguments, key=lambda n: (end_lineno(n), end_col_offset(n)))
        at = end_of(text, last)
        inserts.append((at, at, f", {keyword}={value}"))
    return splice(text, inserts)


def load_trusted_checkpoints(text: str) -> str:
    """``torch.load(...)`` without ``weights_only`` gets ``weights_only=False``."""
    return _add_keyword(text, "torch.load", "weights_only", "False")


def export_onnx_with_torchscript(text: str) -> str:
    """``torch.onnx.export(...)`` without ``dynamo`` gets ``dynamo=False``."""
    return _add_keyword(text, "torch.onnx.export", "dynamo", "False")


def trapezoid_for_numpy2(text: str) -> str:
    """``np.trapz(...)`` calls ``np.trapezoid`` where NumPy has it (NumPy 2.4 removed ``trapz``)."""
    tree = _parse(text) if "np.trapz" in text else None
    if tree is None:
        return text
    spans = [(start_of(text, c.func), end_of(text, c.func)) for c in _calls(tree, "np.trapz")]
    return splice(
        text, [(a, b, "(np.trapezoid if hasattr(np, 'trapezoid') else np.trapz)") for a, b in spans]
    )


def text_size_from_getbbox(text: str) -> str:
    """``w, h = <...>font.getsize(s)`` becomes ``_, _, w, h = <...>font.getbbox(s)`` (same numbers)."""
    tree = _parse(text) if "getsize(" in text else None
    if tree is None:
        return text
    replacements = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        func, target = node.value.func, node.targets[0]
        if not (isinstance(func, ast.Attribute) and func.attr == "getsize" and "font" in _dotted(func.value)):
            continue
        if not (isinstance(target, ast.Tuple) and len(target.elts) == 2):
            continue
        at, end = start_of(text, target), end_of(text, func)
        replacements += [(at, at, "_, _, "), (end - len("getsize"), end, "getbbox")]
    return splice(text, replacements)


# ----------------------------------------------------------------------------------------------
# Fonts.


def _function(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def _font_download(check_font: ast.FunctionDef) -> tuple[ast.If, ast.stmt] | None:
    """``torch.hub.download_url_to_file(...)`` directly in an ``if`` of check_font, with that ``if``."""
    for node in ast.walk(check_font):
        if not isinstance(node, ast.If):
            continue
        for stmt in node.body:
            value = getattr(stmt, "value", None)
            if isinstance(value, ast.Call) and _dotted(value.func).endswith("download_url_to_file"):
                return node, stmt
    return None


def try_font_download_once(text: str) -> str:
    """``check_font``: a failed download logs one warning per font and process instead of raising."""
    tree = _parse(text) if "def check_font" in text else None
    check_font = _function(tree, "check_font") if tree else None
    found = _font_download(check_font) if check_font else None
    # No bare download (already guarded, or not upstream's check_font):
    if check_font is None or found is None:
        return text
    branch, download = found
    text_lines = lines(text)
    newline = newline_of(text_lines[check_font.lineno - 1])
    indent = indent_of(text, download.lineno)
    step = indent[len(indent_of(text, branch.lineno)) :] or "    "
    guarded = [
        f"{indent}try:",
        *(step + line.rstrip("\r\n") for line in text_lines[download.lineno - 1 : end_lineno(download)]),
        f"{indent}except Exception as e:  # offline: warn once, plots use Pillow's font",
        f"{indent}{step}{FONT_MEMO}.add(font.name)",
        f"{indent}{step}LOGGER.warning(f'WARNING ⚠️ {{font.name}} not downloaded ({{e}}), {FONT_FALLBACK}')",
    ]
    first = start_of(text, download) - len(indent)
    last_line = text_lines[end_lineno(download) - 1]  # to its end: a trailing comment moves with the call
    last = sum(len(x) for x in text_lines[: end_lineno(download) - 1]) + len(last_line.rstrip("\r\n"))
    test_end = end_of(text, branch.test)
    def_line = start_of(text, check_font.decorator_list[0] if check_font.decorator_list else check_font)
    memo = f"{FONT_MEMO} = set()  # fonts whose download failed in this process{newline * 3}"
    return splice(
        text,
        [
            (first, last, newline.join(guarded)),
            (test_end, test_end, f" and font.name not in {FONT_MEMO}"),
            (def_line, def_line, memo),
        ],
    )


def _returns_default_font(handler: ast.ExceptHandler) -> bool:
    return any(
        isinstance(stmt, ast.Return)
        and isinstance(stmt.value, ast.Call)
        and _dotted(stmt.value.func).endswith("load_default")
        for stmt in handler.body
    )


def _catches_oserror(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(_dotted(t) in {"OSError", "Exception", "BaseException"} for t in types)


def default_font_when_missing(text: str) -> str:
    """``check_pil_font``: the handler that returns Pillow's default font also catches ``OSError``.

    With the download guarded, ``ImageFont.truetype`` of the missing file raises ``OSError`` (it used to
    be the download's ``URLError``, an ``OSError`` subclass that this handler caught).
    """
    tree = _parse(text) if "def check_pil_font" in text else None
    function = _function(tree, "check_pil_font") if tree else None
    if function is None:
        return text
    handlers = [
        n for n in ast.walk(function) if isinstance(n, ast.ExceptHandler) and _returns_default_font(n)
    ]
    spans = [
        (start_of(text, h.type), end_of(text, h.type))
        for h in handlers
        if h.type is not None and not _catches_oserror(h)
    ]
    return splice(text, [(a, b, f"({text[a:b]}, OSError)") for a, b in spans])


# ----------------------------------------------------------------------------------------------
# requirements.txt.


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _pinned(spec: str, bound: str) -> str:
    """``spec`` (e.g. ``>=1.0.3``) narrowed by ``bound`` (``<2`` or ``>=9.2``), unchanged if already so."""
    op = "<" if bound.startswith("<") else ">="
    present = re.search(rf"{re.escape(op)}\s*([\w.]+)", spec)
    if op == "<":
        return spec if "<" in spec else f"{spec},{bound}".lstrip(",")
    if present and _version(present.group(1)) >= _version(bound):
        return spec
    without = re.sub(r">=?\s*[\w.]+,?", "", spec).strip(",")
    return ",".join(x for x in (bound, without) if x)


def pin_requirements(text: str) -> str:
    """Each of :data:`REQUIREMENT_PINS` narrowed in place, or appended when the file lacks it."""
    text_lines = lines(text)
    newline = newline_of(text_lines[0]) if text_lines else "\n"
    for name, bound, why in REQUIREMENT_PINS:
        pattern = re.compile(rf"^(\s*{re.escape(name)}){_REQUIREMENT_REST}", re.IGNORECASE)
        index = next((i for i, line in enumerate(text_lines) if pattern.match(line)), None)
        if index is None:
            if text_lines and not text_lines[-1].endswith(("\n", "\r")):
                text_lines[-1] += newline
            text_lines.append(f"{name}{bound}  # {why}{newline}")
            continue
        line = text_lines[index]
        match = pattern.match(line)
        if match is None:  # ``index`` is the first line that matches
            raise AssertionError(f"requirement line no longer matches: {line!r}")
        spec = re.sub(r"\s+", "", match.group(2)).rstrip(",")
        pinned = _pinned(spec, bound)
        if pinned != spec:
            rest, comment = match.group(3).strip(), match.group(4) or f"# {why}"
            ending = line[len(line.rstrip("\r\n")) :]
            text_lines[index] = f"{match.group(1)}{pinned}{' ' + rest if rest else ''}  {comment}{ending}"
    return "".join(text_lines)


# ----------------------------------------------------------------------------------------------
# Which files each edit looks at.


def python_files(root: Path) -> list[Path]:
    """The tree's ``.py`` files, relative to ``root``: no hidden folders, virtual environments, runs."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and d not in _SKIPPED_DIRS
            and not (Path(folder, d, "pyvenv.cfg")).exists()
        )
        found += [Path(folder, f).relative_to(root) for f in sorted(files) if f.endswith(".py")]
    return found


def runtime_steps(root: Path) -> list[tuple[Path, str, Edit]]:
    """``(file, edit name, edit)`` for every runtime edit that applies to a file of ``root``."""
    steps: list[tuple[Path, str, Edit]] = []
    for relative in python_files(root):
        steps.append((relative, WEIGHTS_ONLY, load_trusted_checkpoints))
        if relative == GENERAL:
            steps.append((relative, FONTS, try_font_download_once))
            steps.append((relative, FUSED_WARNING, warn_in_intersect_dicts))
        if relative == PLOTS:
            steps.append((relative, FONTS, default_font_when_missing))
        steps.append((relative, TEXT_SIZE, text_size_from_getbbox))
        steps.append((relative, TRAPEZOID, trapezoid_for_numpy2))
        steps.append((relative, ONNX_EXPORTER, export_onnx_with_torchscript))
    if (root / REQUIREMENTS_TXT).is_file():
        steps.append((REQUIREMENTS_TXT, REQUIREMENTS, pin_requirements))
    return steps
