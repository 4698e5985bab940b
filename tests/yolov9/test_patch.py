"""``python -m mobileone_rs.yolov9 patch``: the model edits on a copy of the installed yolo9 package.

The command runs in-process through ``main()`` except where the ``python -m`` entry point itself is
under test; every import of a patched copy happens in a subprocess, so this file never imports yolo9.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
from mobileone_rs.yolov9 import main

from tests.yolov9 import helpers as h

IMPORT_LINE = "from mobileone_rs import MobileOne, MobileOneBlock, reparameterize_model"


def patch(path: Path, *flags: str) -> SimpleNamespace:
    """``main(["patch", PATH, *FLAGS])`` with its exit status and printed text."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["patch", str(path), *flags])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture()
def copy_dir(tmp_path: Path) -> Path:
    """A copy of the installed yolo9 package (the tests without it use hand-written trees)."""
    if h.installed_yolo9() is None:
        pytest.skip("yolo9 (YOLOv9 from PyPI) is not installed")
    return h.copy_yolo9(tmp_path)


def _files(root: Path) -> dict[str, str]:
    return {name: (root / "models" / name).read_text(encoding="utf-8") for name in ("common.py", "yolo.py")}


def _added_and_removed(diff: str) -> tuple[list[str], list[str]]:
    body = [line for line in diff.splitlines() if not line.startswith(("+++", "---"))]
    return [line[1:] for line in body if line.startswith("+")], [
        line[1:] for line in body if line.startswith("-")
    ]


LAYER = "m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)  # module"


def test_patch_prints_a_diff_of_exactly_the_model_edits(copy_dir: Path):
    """The reference's three edits, and the try/except that names the yaml layer in a ConfigError."""
    before = _files(copy_dir)
    result = h.run_patch(copy_dir, "--model-only")
    assert result.returncode == 0, result.stderr
    assert "--- a/models/common.py" in result.stdout and "+++ b/models/yolo.py" in result.stdout
    added, removed = _added_and_removed(result.stdout)
    assert [line.strip() for line in added] == [
        IMPORT_LINE,
        "if hasattr(m, 'reparameterize'):",
        "m.reparameterize()",
        "ELAN1, RepNCSPELAN4, SPPELAN, MobileOne, MobileOneBlock}:",
        "try:",
        LAYER,
        "except Exception as e:  # mobileone_rs: a MobileOne ConfigError names its yaml layer",
        "from mobileone_rs.yolov9.hints import raise_with_yaml_layer",
        "raise_with_yaml_layer(e, i, m, args, d)",
        "raise",
    ]
    assert [line.strip() for line in removed] == ["ELAN1, RepNCSPELAN4, SPPELAN}:", LAYER]
    after = _files(copy_dir)
    assert after["common.py"] == before["common.py"].replace(
        "from torch.cuda import amp\n\nfrom yolo9.utils import TryExcept\n",
        f"from torch.cuda import amp\n{IMPORT_LINE}\n\nfrom yolo9.utils import TryExcept\n",
        1,
    )


def test_patched_source_has_the_edits_where_yolov9_uses_them(copy_dir: Path):
    patch(copy_dir)
    yolo = ast.parse((copy_dir / "models" / "yolo.py").read_text())
    fuse = next(
        f
        for c in yolo.body
        if isinstance(c, ast.ClassDef) and c.name == "BaseModel"
        for f in c.body
        if isinstance(f, ast.FunctionDef) and f.name == "fuse"
    )
    loop = next(n for n in ast.walk(fuse) if isinstance(n, ast.For))
    assert ast.unparse(loop.body[-1]) == "if hasattr(m, 'reparameterize'):\n    m.reparameterize()"
    parse_model = next(f for f in yolo.body if isinstance(f, ast.FunctionDef) and f.name == "parse_model")
    channel_sets = [
        n.comparators[0]
        for n in ast.walk(parse_model)
        if isinstance(n, ast.Compare)
        and isinstance(n.comparators[0], ast.Set)
        and "MobileOne" in {getattr(e, "id", None) for e in n.comparators[0].elts}
    ]
    assert len(channel_sets) == 1 and "Conv" in {getattr(e, "id", None) for e in channel_sets[0].elts}


def test_second_run_is_a_no_op(copy_dir: Path):
    assert patch(copy_dir).returncode == 0
    patched = _files(copy_dir)
    again = patch(copy_dir)
    assert again.returncode == 0, again.stderr
    assert "already patched" in again.stdout and "+++" not in again.stdout
    assert _files(copy_dir) == patched


def test_dry_run_and_check_write_nothing(copy_dir: Path):
    before = _files(copy_dir)
    dry = patch(copy_dir, "--dry-run")
    assert dry.returncode == 0 and "+++ b/models/yolo.py" in dry.stdout
    check = patch(copy_dir, "--check")
    assert check.returncode == 1 and "needs patching" in check.stdout
    assert _files(copy_dir) == before
    patch(copy_dir)
    assert patch(copy_dir, "--check").returncode == 0


def test_half_patched_tree_gets_the_missing_edits_only(copy_dir: Path):
    common = copy_dir / "models" / "common.py"
    common.write_text(common.read_text() + f"\n{IMPORT_LINE}\n")
    result = patch(copy_dir)
    assert result.returncode == 0, result.stderr
    assert "models/common.py" not in result.stdout and "+++ b/models/yolo.py" in result.stdout
    assert common.read_text().count("from mobileone_rs import") == 1


def test_patched_copy_imports_and_resolves_mobileone(copy_dir: Path):
    patch(copy_dir)
    probe = textwrap.dedent(
        """
        import mobileone_rs, yolo9.models.yolo as yolo
        assert yolo.__file__.startswith(COPY), yolo.__file__
        assert yolo.MobileOne is mobileone_rs.MobileOne
        model, _ = yolo.parse_model(
            {'nc': 1, 'depth_multiple': 1.0, 'width_multiple': 1.0, 'anchors': 3, 'head': [],
             'backbone': [[-1, 1, 'Conv', [16, 3, 2]], [-1, 1, 'MobileOne', [32, 2, 2, True, 1]]]},
            ch=[3])
        stage = model[1]
        assert isinstance(stage, mobileone_rs.MobileOne)
        assert sum(p.numel() for p in stage.parameters()) == stage.np
        print('ok', type(stage).__name__)
        """
    ).replace("COPY", repr(str(copy_dir)))
    result = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        capture_output=True,
        text=True,
        env=h.subprocess_env(copy_dir.parent),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ok MobileOne" in result.stdout


def _write_tree(root: Path, common: str | None, yolo: str | None) -> None:
    if common is None:
        return
    (root / "models").mkdir()
    (root / "models" / "common.py").write_text(common)
    if yolo is not None:
        (root / "models" / "yolo.py").write_text(yolo)


@pytest.mark.parametrize(
    "common, yolo, message",
    [
        (None, None, "models/common.py not found"),
        ("import os\n", None, "models/yolo.py not found"),
        ("import os\n", "def parse_model(d, ch):\n    pass\n", "in parse_model(), found 0"),
        ("import os\n", "def fuse():\n    pass\n", "no top-level function parse_model"),
        ("import os\n", "def parse_model(:\n", "does not parse as Python"),
    ],
    ids=["empty-dir", "no-yolo-py", "no-channel-set", "no-parse-model", "syntax-error"],
)
def test_refuses_a_tree_that_is_not_yolov9(tmp_path: Path, common, yolo, message):
    _write_tree(tmp_path, common, yolo)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.py")}
    result = patch(tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "error:" in result.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.py")} == before


def test_refuses_yolo_without_fuse_and_leaves_both_files_alone(copy_dir: Path):
    yolo = copy_dir / "models" / "yolo.py"
    yolo.write_text(yolo.read_text().replace("def fuse(self)", "def fuse_disabled(self)"))
    before = _files(copy_dir)
    result = patch(copy_dir)
    assert result.returncode == 2 and "no fuse() method" in result.stderr
    assert _files(copy_dir) == before


def test_refuses_when_common_already_defines_mobileone(copy_dir: Path):
    common = copy_dir / "models" / "common.py"
    common.write_text(common.read_text() + "\n\nclass MobileOne:\n    pass\n")
    result = patch(copy_dir)
    assert result.returncode == 2 and "already defines MobileOne" in result.stderr


def test_models_dir_given_instead_of_root_gets_a_hint(copy_dir: Path):
    result = h.run_patch(copy_dir / "models")  # the real command line: exit status 2
    assert result.returncode == 2 and "not models/ itself" in result.stderr


def test_upstream_layout_crlf_and_form_feed(tmp_path: Path):
    """Upstream's layout (``from models.common import *``), saved with CRLF, with a form feed in a
    comment (Python does not end a line there, ``str.splitlines`` does)."""
    (tmp_path / "models").mkdir()
    common = (
        '"""Common modules."""\nimport torch\nfrom utils.general import LOGGER\n\n\nclass Conv:\n    pass\n'
    )
    yolo = textwrap.dedent(
        """\
        from models.common import *
        # models FORMFEED section


        class BaseModel:
            def fuse(self):
                for m in self.model.modules():
                    if hasattr(m, 'bn'):
                        pass
                return self


        def parse_model(d, ch):
            for m in d:
                if m in {
                        Conv, ADown,
                        SPPELAN, }:
                    c1, c2 = ch[f], args[0]
            return m
        """
    )
    common, yolo = common.replace("\n", "\r\n"), yolo.replace("\n", "\r\n").replace("FORMFEED", "\x0c")
    (tmp_path / "models" / "common.py").write_bytes(common.encode())
    (tmp_path / "models" / "yolo.py").write_bytes(yolo.encode())
    result = h.run_patch(tmp_path)  # the real command line
    assert result.returncode == 0, result.stderr
    new_common = (tmp_path / "models" / "common.py").read_bytes().decode()
    new_yolo = (tmp_path / "models" / "yolo.py").read_bytes().decode()
    assert f"import torch\r\n{IMPORT_LINE}\r\nfrom utils.general import LOGGER\r\n" in new_common
    assert "SPPELAN, MobileOne, MobileOneBlock, }:" in new_yolo
    assert (
        "            if hasattr(m, 'bn'):\r\n                pass\r\n"
        "            if hasattr(m, 'reparameterize'):\r\n"
        "                m.reparameterize()\r\n"
        "        return self"
    ) in new_yolo
    assert "\n" not in new_yolo.replace("\r\n", "")
    compile(new_yolo, "yolo.py", "exec")


def test_refuses_a_file_that_is_not_utf8(copy_dir: Path):
    (copy_dir / "models" / "yolo.py").write_bytes(b"# \xff\xfe not utf-8\n")
    result = patch(copy_dir)
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_a_hand_made_reparameterize_call_anywhere_in_the_loop_counts(tmp_path: Path):
    yolo = textwrap.dedent(
        """\
        class BaseModel:
            def fuse(self):
                for m in self.model.modules():
                    if isinstance(m, Conv):
                        pass
                    elif hasattr(m, 'reparameterize'):
                        m.reparameterize()
                return self


        def parse_model(d, ch):
            if m in {Conv, MobileOne, MobileOneBlock}:
                c1, c2 = ch[f], args[0]
        """
    )
    _write_tree(tmp_path, f"import torch\n{IMPORT_LINE}\n", yolo)
    result = patch(tmp_path)
    assert result.returncode == 0 and "already patched" in result.stdout


def test_a_path_that_does_not_exist_is_named_as_such(tmp_path: Path):
    result = patch(tmp_path / "yolov9")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"error: {tmp_path / 'yolov9'}: no such directory" in result.stderr
    (tmp_path / "file.py").write_text("")
    result = patch(tmp_path / "file.py")
    assert result.returncode == 2 and "is a file" in result.stderr


def test_help_is_plain_text_and_lists_every_edit():
    result = subprocess.run(
        [sys.executable, "-m", "mobileone_rs.yolov9", "patch", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "``" not in result.stdout
    assert result.stdout.startswith("usage: python -m mobileone_rs.yolov9 patch")
    text = " ".join(result.stdout.split())
    for edit in (
        "import mobileone_rs",
        "parse_model channel set",
        "fuse reparameterize",
        "parse_model yaml-layer hint",
        "torch.load weights_only=False",
        "fonts offline",
        "Pillow 10 text size",
        "NumPy 2 trapezoid",
        "ONNX TorchScript exporter",
        "requirements pins",
        "fused-weights warning",
        "--model-only",
        "--check",
        "--dry-run",
    ):
        assert edit in text, edit


def test_the_yolo9_package_gets_only_what_it_lacks(copy_dir: Path):
    """yolo9 fixed torch.load, fonts, getsize and trapz itself: model edits, ONNX, the fused warning."""
    result = patch(copy_dir)
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary == (
        f"{copy_dir}: patched: import mobileone_rs (models/common.py); parse_model channel set "
        "(models/yolo.py); fuse reparameterize (models/yolo.py); parse_model yaml-layer hint "
        "(models/yolo.py); "
        "ONNX TorchScript exporter (export.py); fused-weights warning (utils/general.py)"
    )
