"""The patch command changes all files or none, each one whole, and keeps a UTF-8 byte-order mark.

A write that fails part-way (disk full, a file-size limit) or a file that cannot be written must never
leave a file truncated or the tree half patched, and the error names the file.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
from mobileone_rs.yolov9 import main
from mobileone_rs.yolov9 import tree as patch_module

from tests.yolov9 import helpers as h

BOM = b"\xef\xbb\xbf"


@pytest.fixture()
def copy_dir(tmp_path: Path) -> Path:
    if h.installed_yolo9() is None:
        pytest.skip("yolo9 (YOLOv9 from PyPI) is not installed")
    return h.copy_yolo9(tmp_path)


def patch(path: Path, *flags: str) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["patch", str(path), *flags])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def snapshot(root: Path) -> dict[Path, bytes]:
    """Every file of the tree (temporary files included) and its bytes."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# models/common.py, models/yolo.py and export.py change; export.py goes last and is made the largest.
PADDING = "# padding\n" * 4000


def test_a_write_failing_part_way_changes_no_file(copy_dir: Path, monkeypatch):
    writes = []

    def disk_full_at_the_second_file(path: Path, data: bytes) -> None:
        writes.append(path)
        if len(writes) == 2:
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        path.write_bytes(data)

    monkeypatch.setattr(patch_module, "_write_temporary", disk_full_at_the_second_file)
    before = snapshot(copy_dir)
    result = patch(copy_dir)
    assert len(writes) == 2
    assert result.returncode == 2
    assert result.stderr == (
        f"error: cannot write {copy_dir / 'models' / 'yolo.py'}: No space left on device; "
        "no file was changed\n"
    )
    assert snapshot(copy_dir) == before  # no file changed, no temporary file left


RLIMITED_PATCH = """
import resource, signal, sys
from mobileone_rs.yolov9 import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(["patch", sys.argv[1]]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_file_size_limit_leaves_every_file_whole(copy_dir: Path):
    export = copy_dir / "export.py"
    export.write_text(export.read_text(encoding="utf-8") + PADDING, encoding="utf-8")
    sizes = {name: (copy_dir / name).stat().st_size for name in ("models/common.py", "models/yolo.py")}
    limit = max(sizes.values()) + 4096
    assert export.stat().st_size > limit + 4096  # the two model files fit, export.py (written last) does not
    before = snapshot(copy_dir)
    result = subprocess.run(
        [sys.executable, "-c", RLIMITED_PATCH, str(copy_dir), str(limit)],
        check=False,
        capture_output=True,
        text=True,
        env=h.subprocess_env(copy_dir.parent),
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == f"error: cannot write {export}: File too large; no file was changed\n"
    assert snapshot(copy_dir) == before


def test_a_read_only_file_among_several_stops_the_patch_before_any_write(copy_dir: Path, monkeypatch):
    export = copy_dir / "export.py"
    export.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    if os.geteuid() == 0:  # root writes read-only files: make the check see what a user's process sees
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and Path(p) != export)
    before = snapshot(copy_dir)
    result = patch(copy_dir)
    assert result.returncode == 2
    assert result.stderr == f"error: cannot write {export}: the file is read-only; no file was changed\n"
    assert snapshot(copy_dir) == before


def test_a_patched_file_keeps_its_mode(copy_dir: Path):
    yolo = copy_dir / "models" / "yolo.py"
    yolo.chmod(0o640)
    assert patch(copy_dir).returncode == 0
    assert stat.S_IMODE(yolo.stat().st_mode) == 0o640


def test_files_with_a_byte_order_mark_are_patched_and_keep_it(copy_dir: Path):
    """Python accepts a UTF-8 BOM; ast.parse of the decoded text does not: model and runtime edits."""
    names = ("models/common.py", "models/yolo.py", "export.py")
    for name in names:
        (copy_dir / name).write_bytes(BOM + (copy_dir / name).read_bytes())
    result = patch(copy_dir)
    assert result.returncode == 0, result.stderr
    assert "\ufeff" not in result.stdout  # the diff shows the edits, not the mark
    for name in names:
        data = (copy_dir / name).read_bytes()
        assert data.startswith(BOM) and not data[3:].startswith(BOM), name
        compile(data, name, "exec")
    text = {name: (copy_dir / name).read_text(encoding="utf-8-sig") for name in names}
    assert "from mobileone_rs import MobileOne, MobileOneBlock" in text["models/common.py"]
    assert "SPPELAN, MobileOne, MobileOneBlock}:" in text["models/yolo.py"]
    assert text["export.py"].count("dynamo=False") == 2
    again = patch(copy_dir)
    assert again.returncode == 0 and "already patched" in again.stdout
