"""A YOLOv9 tree laid out as a clone of github.com/WongKinYiu/yolov9 is, made from the installed ``yolo9``.

Tests never download, and PyPI's ``yolo9`` (pinned, 1.0.18) is WongKinYiu/yolov9 packaged: the same
files, imported as ``yolo9.x`` instead of upstream's top-level ``models.x`` / ``utils.x``, with a few
fixes of its own. :func:`make_upstream_tree` copies it and undoes both, so the tree is what a newcomer
clones: scripts at the root, top-level imports, and upstream's text at every place the patch command's
runtime edits touch (``torch.load`` without ``weights_only``, the font download, ``font.getsize``,
``np.trapz``, NMS on a dual head's output, ``requirements.txt``). Every replacement must match the
package's text exactly once, so a different yolo9 release fails here rather than testing something
else.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.yolov9 import helpers as h

# upstream's check_font (utils/general.py), which yolo9 rewrote to survive a failed download.
UPSTREAM_CHECK_FONT = """def check_font(font=FONT, progress=False):
    # Download font to CONFIG_DIR if necessary
    font = Path(font)
    file = CONFIG_DIR / font.name
    if not font.exists() and not file.exists():
        url = f'https://ultralytics.com/assets/{font.name}'
        LOGGER.info(f'Downloading {url} to {file}...')
        torch.hub.download_url_to_file(url, str(file), progress=progress)
"""

# upstream's requirements.txt, the lines pip reads (its comments and commented-out extras left out).
UPSTREAM_REQUIREMENTS = """# requirements
# Usage: pip install -r requirements.txt

gitpython
ipython
matplotlib>=3.2.2
numpy>=1.18.5
opencv-python>=4.1.1
Pillow>=7.1.2
psutil
PyYAML>=5.3.1
requests>=2.23.0
scipy>=1.4.1
thop>=0.1.1
torch>=1.7.0
torchvision>=0.8.1
tqdm>=4.64.0
tensorboard>=2.4.1
pandas>=1.1.4
seaborn>=0.11.0
albumentations>=1.0.3
pycocotools>=2.0
"""

# (file, yolo9's text, upstream's text): yolo9's own fixes and moved imports, undone.
REVERSALS = [
    # Imports that yolo9 hoisted to module level, back inside the functions (upstream avoids the cycle
    # common -> export -> experimental -> yolo -> common that way).
    (
        "models/common.py",
        "from utils.downloads import is_url\nfrom export import export_formats\n",
        "",
    ),
    (
        "models/common.py",
        "        # types = [pt, jit, onnx, xml, engine, coreml, saved_model, pb, tflite, edgetpu, tfjs, paddle]\n",
        (
            "        # types = [pt, jit, onnx, xml, engine, coreml, saved_model, pb, tflite, edgetpu, tfjs, paddle]\n"
            "        from export import export_formats\n        from utils.downloads import is_url\n"
        ),
    ),
    ("models/experimental.py", "from models.yolo import Detect, Model\n", ""),
    (
        "models/experimental.py",
        "    # Loads an ensemble of models weights=[a,b,c] or a single model weights=[a] or weights=a\n",
        (
            "    # Loads an ensemble of models weights=[a,b,c] or a single model weights=[a] or weights=a\n"
            "    from models.yolo import Detect, Model\n\n"
        ),
    ),
    # What the runtime edits fix, as upstream has it.
    (
        "utils/plots.py",
        "except (URLError, OSError):  # not online, or the font could not be downloaded",
        "except URLError:  # not online",
    ),
    (
        "utils/plots.py",
        "_, _, w, h = self.font.getbbox(label)  # text width, height (== removed getsize())",
        "w, h = self.font.getsize(label)  # text width, height",
    ),
    (
        "utils/plots.py",
        "_, _, w, h = self.font.getbbox(text)  # text width, height (== removed getsize())",
        "w, h = self.font.getsize(text)  # text width, height",
    ),
    (
        "utils/metrics.py",
        (
            "        trapezoid = getattr(np, 'trapezoid', None) or np.trapz  # numpy>=2.0 / <2.0\n"
            "        ap = trapezoid(np.interp(x, mrec, mpre), x)  # integrate\n"
        ),
        "        ap = np.trapz(np.interp(x, mrec, mpre), x)  # integrate\n",
    ),
    # Upstream's non_max_suppression takes a single head's (pred, train_out): detect.py fails on
    # dual-head models, detect_dual.py is their script.
    (
        "utils/general.py",
        "prediction = prediction[0][0]  # select only inference output",
        "prediction = prediction[0]  # select only inference output",
    ),
]
_YOLO9_CHECK_FONT = re.compile(
    r"_FONT_DOWNLOAD_FAILED = set\(\).*?\n\n\ndef check_font\(.*?plots will use the default font'\)\n",
    re.DOTALL,
)


def _replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{path.name}: expected yolo9==1.0.18's text once: {old!r}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def _absolute_imports(text: str, package: list[str]) -> str:
    """``yolo9.x`` imports become upstream's ``x``; relative ones absolute from the tree's root."""
    text = re.sub(r"^(\s*)(from|import) yolo9\.", r"\1\2 ", text, flags=re.MULTILINE)

    def absolute(match: re.Match) -> str:
        indent, dots, rest = match.groups()
        base = package[: len(package) - (len(dots) - 1)]
        module = ".".join([*base, rest] if rest else base)
        return f"{indent}from {module} import"

    return re.sub(r"^(\s*)from (\.+)([\w.]*) import", absolute, text, flags=re.MULTILINE)


def make_upstream_tree(destination: Path) -> Path:
    """``destination/yolov9``: the installed yolo9 package, laid out and worded as upstream's clone."""
    root = destination / "yolov9"
    h.copy_yolo9(destination).rename(root)
    (root / "__init__.py").unlink()  # yolo9's YOLO9 wrapper class; upstream's root is no package
    for path in root.rglob("*.py"):
        package = list(path.relative_to(root).parent.parts)
        text = _absolute_imports(path.read_text(encoding="utf-8"), package)
        path.write_text(text.replace(", weights_only=False", ""), encoding="utf-8")
    for relative, old, new in REVERSALS:
        _replace_once(root / relative, old, new)
    general = root / "utils" / "general.py"
    text, count = _YOLO9_CHECK_FONT.subn(UPSTREAM_CHECK_FONT, general.read_text(encoding="utf-8"))
    assert count == 1, "utils/general.py: yolo9==1.0.18's check_font not found"
    general.write_text(text, encoding="utf-8")
    (root / "requirements.txt").write_text(UPSTREAM_REQUIREMENTS, encoding="utf-8")
    return root
