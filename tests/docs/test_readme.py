"""README.md's Python blocks, executed as written: the documented API cannot drift from the code."""

from __future__ import annotations

import contextlib
import io

import pytest

from tests.docs.blocks import REPO, code_blocks

README = REPO / "README.md"
PYTHON_BLOCKS = [b for b in code_blocks(README) if b.language == "python"]


def test_the_readme_has_python_examples():
    assert PYTHON_BLOCKS, "README.md lost its Python example"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"README.md:{b.line}" for b in PYTHON_BLOCKS])
def test_readme_python_block_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays in the test's folder
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = compile(block.code, f"README.md:{block.line}", "exec")
        exec(code, {"__name__": "__readme__"})  # noqa: S102 (running the README's own code is the test)
    assert printed.getvalue()  # the example shows its result
