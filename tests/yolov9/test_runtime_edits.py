"""The patch command's runtime edits: what they change, where, and that they are idempotent.

The edits themselves run against upstream's text (the upstream-shaped tree) and small hand-written
sources for the shapes upstream does not have (keywords already given, ``**kwargs``, CRLF, comments).
That the patched scripts then run is test_journey.py's job.
"""

from __future__ import annotations

import io
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from mobileone_rs.yolov9 import main, plan_patch
from mobileone_rs.yolov9 import runtime as rt

from tests.yolov9 import helpers as h
from tests.yolov9.upstream_tree import make_upstream_tree


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = main(["patch", *map(str, args)])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    if h.installed_yolo9() is None:
        pytest.skip("yolo9 (YOLOv9 from PyPI) is not installed")
    return make_upstream_tree(tmp_path_factory.mktemp("upstream"))


def _diff_lines(changes) -> dict[str, tuple[list[str], list[str]]]:
    """``{file: (removed lines, added lines)}``, stripped."""
    result = {}
    for change in changes:
        body = [x for x in change.diff().splitlines() if not x.startswith(("+++", "---"))]
        removed = [x[1:].strip() for x in body if x.startswith("-")]
        added = [x[1:].strip() for x in body if x.startswith("+")]
        result[change.relative.as_posix()] = (removed, added)
    return result


def test_upstream_gets_every_runtime_edit_and_nothing_else(upstream):
    changes = {c.relative.as_posix(): c for c in plan_patch(upstream)}
    loads = sorted(f for f, c in changes.items() if rt.WEIGHTS_ONLY in c.edits)
    assert loads == sorted(
        [
            "hubconf.py",
            "train.py",
            "train_dual.py",
            "train_triple.py",
            "models/experimental.py",
            "panoptic/train.py",
            "segment/train.py",
            "segment/train_dual.py",
            "utils/general.py",
            "utils/loggers/__init__.py",
        ]
    )
    diff = _diff_lines(changes.values())
    for file in set(loads) - {"utils/general.py"}:  # each torch.load line gains weights_only=False, only that
        removed, added = diff[file]
        assert removed and [line.replace(", weights_only=False", "") for line in added] == removed, file
    assert diff["utils/plots.py"] == (
        [
            "except URLError:  # not online",
            "w, h = self.font.getsize(label)  # text width, height",
            "w, h = self.font.getsize(text)  # text width, height",
        ],
        [
            "except (URLError, OSError):  # not online",
            "_, _, w, h = self.font.getbbox(label)  # text width, height",
            "_, _, w, h = self.font.getbbox(text)  # text width, height",
        ],
    )
    assert diff["utils/metrics.py"] == (
        ["ap = np.trapz(np.interp(x, mrec, mpre), x)  # integrate"],
        [
            "ap = (np.trapezoid if hasattr(np, 'trapezoid') else np.trapz)(np.interp(x, mrec, mpre), x)  # integrate"
        ],
    )
    assert diff["export.py"] == (
        ["dynamic_axes=dynamic or None)", "dynamic_axes=dynamic_axes)"],
        ["dynamic_axes=dynamic or None, dynamo=False)", "dynamic_axes=dynamic_axes, dynamo=False)"],
    )
    assert diff["requirements.txt"] == (
        ["Pillow>=7.1.2", "albumentations>=1.0.3"],
        [
            "Pillow>=9.2  # ImageFont.getbbox() for every font, the default one included",
            "albumentations>=1.0.3,<2  # albumentations 2 renamed the arguments utils/augmentations.py passes",
            "setuptools<81  # utils/general.py imports pkg_resources, removed in setuptools 81",
        ],
    )
    general = changes["utils/general.py"]
    assert general.edits == (rt.WEIGHTS_ONLY, rt.FONTS, rt.FUSED_WARNING)
    compile(general.new, "general.py", "exec")
    assert (
        "        try:\n            torch.hub.download_url_to_file(url, str(file), progress=progress)\n"
        in general.new
    )
    assert (
        "if not font.exists() and not file.exists() and font.name not in _FONTS_NOT_DOWNLOADED:"
        in general.new
    )
    for change in changes.values():
        if change.relative.suffix == ".py":
            compile(change.new, str(change.relative), "exec")


def test_runtime_edits_are_idempotent_and_checked(upstream, tmp_path):
    upstream = make_upstream_tree(tmp_path)  # a tree of its own: this test patches it
    code, out = cli(upstream, "--model-only")
    assert code == 0 and "torch.load" not in out
    code, out = cli(upstream, "--check")  # the model edits are in: --check still sees the runtime ones
    assert code == 1 and "needs patching: ONNX" in out and "torch.load weights_only=False (10 files)" in out
    assert cli(upstream, "--check", "--model-only") == (
        0,
        f"{upstream}: already patched, nothing to change\n",
    )
    assert cli(upstream)[0] == 0
    assert plan_patch(upstream) == []
    assert cli(upstream, "--check")[0] == 0


@pytest.mark.parametrize(
    "source, expected",
    [
        ("x = torch.load(f)\n", "x = torch.load(f, weights_only=False)\n"),
        ("x = torch.load(f, weights_only=True)\n", None),
        ("x = torch.load(f, **kw)\n", None),
        (
            "x = torch.load(\r\n    f,\r\n    map_location='cpu',\r\n)\r\n",
            "x = torch.load(\r\n    f,\r\n    map_location='cpu', weights_only=False,\r\n)\r\n",
        ),
        (
            "y = torch.load(a)['m']  # é\nz = torch.jit.load(b)\n",
            "y = torch.load(a, weights_only=False)['m']  # é\nz = torch.jit.load(b)\n",
        ),
        ("def f(:\n    torch.load(x)\n", None),
    ],
    ids=["plain", "given", "kwargs", "crlf-multiline-trailing-comma", "utf8-and-jit", "syntax-error"],
)
def test_weights_only(source, expected):
    assert rt.load_trusted_checkpoints(source) == (source if expected is None else expected)


def test_font_download_guard_keeps_a_trailing_comment_and_is_idempotent():
    source = textwrap.dedent(
        """\
        def check_font(font=FONT, progress=False):
            font = Path(font)
            file = CONFIG_DIR / font.name
            if not font.exists() and not file.exists():
                torch.hub.download_url_to_file(url, str(file),
                                               progress=progress)  # fetch
        """
    )
    once = rt.try_font_download_once(source)
    assert once.startswith(
        "_FONTS_NOT_DOWNLOADED = set()  # fonts whose download failed in this process\n\n\n"
    )
    assert (
        "        try:\n"
        "            torch.hub.download_url_to_file(url, str(file),\n"
        "                                           progress=progress)  # fetch\n"
        "        except Exception as e:"
    ) in once
    compile(once, "general.py", "exec")
    assert rt.try_font_download_once(once) == once


def test_requirement_pins():
    text = "torch>=1.7\nPillow>=10.1  # newer already\nALBUMENTATIONS >= 1.0.3 ; python_version > '3'\nsetuptools\n"
    pinned = rt.pin_requirements(text)
    assert pinned.splitlines() == [
        "torch>=1.7",
        "Pillow>=10.1  # newer already",
        (
            "ALBUMENTATIONS>=1.0.3,<2 ; python_version > '3'  # albumentations 2 renamed the arguments "
            "utils/augmentations.py passes"
        ),
        "setuptools<81  # utils/general.py imports pkg_resources, removed in setuptools 81",
    ]
    assert rt.pin_requirements(pinned) == pinned
    assert rt.pin_requirements("pillow-simd\n").splitlines()[1].startswith("albumentations<2")


def test_python_files_skip_virtual_environments_and_hidden_folders(tmp_path):
    for relative in (
        "a.py",
        "utils/b.py",
        ".git/c.py",
        "venv/lib/d.py",
        "runs/e.py",
        "utils/__pycache__/f.py",
    ):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("")
    assert rt.python_files(tmp_path) == [Path("a.py"), Path("utils/b.py")]
