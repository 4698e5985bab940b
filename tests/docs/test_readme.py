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


def _apple_checkpoints(folder) -> None:
    """The Apple S0 files the pretrained example loads, as a user would have downloaded them: made
    here from our own Apple-named S0 (tests never download), train-time and fused."""
    import mobileone_rs
    import torch

    model = mobileone_rs.mobileone("s0")
    torch.save(model.state_dict(), folder / "mobileone_s0_unfused.pth.tar")
    torch.save(mobileone_rs.reparameterize_model(model).state_dict(), folder / "mobileone_s0.pth.tar")


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"README.md:{b.line}" for b in PYTHON_BLOCKS])
def test_readme_python_block_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays in the test's folder
    if "mobileone_s0_unfused.pth.tar" in block.code:
        _apple_checkpoints(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = compile(block.code, f"README.md:{block.line}", "exec")
        exec(code, {"__name__": "__readme__"})  # noqa: S102 (running the README's own code is the test)
    assert printed.getvalue()  # the example shows its result
