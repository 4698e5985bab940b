"""The yaml layer in errors raised while YOLOv9's ``parse_model`` builds a layer.

``MobileOne(...)`` does not know it is being built from a yaml row. The patch command wraps the line
of ``parse_model`` that builds each layer (``m_ = ... m(*args) ...``) so that a ``ConfigError`` coming
out of it is raised again with the yaml layer (index, module, the row's arguments) and, when the layer
got the row's arguments without the input channels prepended, the patch edit that is missing
(:func:`add_yaml_layer_hint` makes that edit, :func:`raise_with_yaml_layer` is what it calls).
"""

from __future__ import annotations

import ast

from .._native import ConfigError
from .source_text import end_lineno, indent_of, lines, replace_lines

PATCH_COMMAND = "python -m mobileone_rs.yolov9 patch PATH"
HINT_FUNCTION = "raise_with_yaml_layer"
# The except clause the edit adds around the layer's construction (the try line and body go before it).
_HANDLER = (
    "except Exception as e:  # mobileone_rs: a MobileOne ConfigError names its yaml layer",
    f"    from mobileone_rs.yolov9.hints import {HINT_FUNCTION}",
    f"    {HINT_FUNCTION}(e, i, m, args, d)",
    "    raise",
)


def _yaml_row(layers, index: int):
    """Row ``index`` of the model dict's backbone + head (``[from, number, module, args]``), or None."""
    try:
        rows = list(layers.get("backbone", [])) + list(layers.get("head", []))
        return rows[index]
    except (AttributeError, IndexError, TypeError):
        return None


def raise_with_yaml_layer(error: BaseException, index, module, passed, model_dict) -> None:
    """Raises a ``ConfigError`` again with the yaml layer it came from; returns for any other error.

    Called by the patched ``parse_model`` (see :func:`add_yaml_layer_hint`) with its loop's row index
    ``i``, module ``m``, the arguments ``args`` the module got and the model dict ``d``.
    """
    if not isinstance(error, ConfigError):
        return
    name = getattr(module, "__name__", str(module))
    row = _yaml_row(model_dict, index)
    yaml_args = row[3] if isinstance(row, (list, tuple)) and len(row) == 4 else None
    where = f"{name} {list(yaml_args)}" if isinstance(yaml_args, (list, tuple)) else name
    message = f"yaml layer {index} ({where}): {error}"
    if isinstance(yaml_args, (list, tuple)) and len(passed) <= len(yaml_args):
        message += (
            f". parse_model called {name}({', '.join(map(repr, passed))}): the yaml row's arguments without "
            f"the input channels in front, so every argument shifted by one. models/yolo.py's parse_model "
            f"lacks {name} in its channel set (model edit 2): run `{PATCH_COMMAND}`"
        )
    raise type(error)(message) from error  # the same class: an ArgumentTypeError stays a TypeError


# ----------------------------------------------------------------------------------------------
# The patch edit.


def _calls(tree: ast.AST, name: str) -> bool:
    return any(
        isinstance(n, ast.Call) and name in (getattr(n.func, "id", None), getattr(n.func, "attr", None))
        for n in ast.walk(tree)
    )


def _builds_layer(node: ast.stmt) -> bool:
    """``m_ = ... m(*args) ...``: the statement of parse_model that builds a layer."""
    return (
        isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and getattr(node.targets[0], "id", None) == "m_"
        and any(
            isinstance(c, ast.Call)
            and getattr(c.func, "id", None) == "m"
            and any(isinstance(a, ast.Starred) and getattr(a.value, "id", None) == "args" for a in c.args)
            for c in ast.walk(node.value)
        )
    )


def _layer_statement(parse_model: ast.FunctionDef) -> ast.Assign | None:
    """The one layer-building statement of a loop over the rows (``i``) of the model dict ``d``."""
    names = {n.id for n in ast.walk(parse_model) if isinstance(n, ast.Name)}
    params = {a.arg for a in parse_model.args.args}
    found = [n for n in ast.walk(parse_model) if isinstance(n, ast.Assign) and _builds_layer(n)]
    if len(found) != 1 or "d" not in params or "i" not in names:
        return None
    return found[0]


def add_yaml_layer_hint(text: str) -> str:
    """Return ``models/yolo.py`` with parse_model's layer construction wrapped so that a ConfigError
    names its yaml layer; unchanged when already so, or when parse_model has no such statement."""
    tree = ast.parse(text)
    parse_model = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "parse_model"), None
    )
    if parse_model is None or _calls(parse_model, HINT_FUNCTION):
        return text
    statement = _layer_statement(parse_model)
    if statement is None:
        return text
    indent = indent_of(text, statement.lineno)
    step = "    " if not indent.startswith("\t") else "\t"
    body = [line.rstrip("\r\n") for line in lines(text)[statement.lineno - 1 : end_lineno(statement)]]
    wrapped = [
        f"{indent}try:",
        *(step + line for line in body),
        *(indent + line.replace("    ", step, 1) for line in _HANDLER),
    ]
    return replace_lines(text, statement.lineno, end_lineno(statement), wrapped)
