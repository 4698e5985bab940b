"""``python -m mobileone_rs.pretrained`` never loses a file: init.pt is written whole or not at all, and
``--write-yamls`` replaces only yamls it wrote itself and nobody edited since (or with ``--force``)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from pathlib import Path

import mobileone_rs
import pytest
import torch
from mobileone_rs.yolov9.pretrained import main
from mobileone_rs.yolov9.yamls import YAML_NAMES, yolov9_yaml

MARKER = re.compile(r"^# mobileone_rs sha256 of this text without this line: ([0-9a-f]{64})\n", re.MULTILINE)


def run(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture()
def detect(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "detect"
    folder.mkdir(parents=True)
    return folder


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_yamls_refuses_to_overwrite_an_edited_yaml(detect: Path):
    assert run("--write-yamls", detect.parents[1])[0] == 0
    edited = detect / YAML_NAMES["s2"]
    edited.write_text(edited.read_text().replace("nc: 80", "nc: 3"))
    (detect / YAML_NAMES["s4"]).unlink()
    before = contents(detect)
    code, _, err = run("--write-yamls", detect.parents[1])
    assert code == 2
    assert err == (
        f"error: not overwriting {edited}: it differs from the yaml mobileone_rs writes (edited?); no yaml "
        "was written. Move the file away or pass --force\n"
    )
    assert contents(detect) == before  # the edit kept, and the missing yaml not written either
    code, out, _ = run("--write-yamls", detect.parents[1], "--force")
    assert code == 0 and f"wrote {edited}" in out
    assert {name: (detect / name).read_text() for name in YAML_NAMES.values()} == {
        name: yolov9_yaml(variant) for variant, name in YAML_NAMES.items()
    }


def _with_marker(text: str) -> str:
    """``text`` with its marker line's hash made right: the sha256 of the text without that line."""
    body = MARKER.sub("", text)
    return MARKER.sub(
        lambda _: (
            f"# mobileone_rs sha256 of this text without this line: "
            f"{hashlib.sha256(body.encode()).hexdigest()}\n"
        ),
        text,
    )


def test_write_yamls_replaces_its_own_unedited_yamls_and_leaves_current_ones(detect: Path):
    current = yolov9_yaml("s0")
    assert MARKER.search(current) and _with_marker(current) == current
    older = _with_marker(current.replace("# YOLOv9-C head", "# YOLOv9-C's head"))  # another release's text
    unmarked = MARKER.sub("", yolov9_yaml("s1"))  # as mobileone_rs 0.1.0 wrote it
    (detect / YAML_NAMES["s0"]).write_text(older)
    (detect / YAML_NAMES["s1"]).write_text(unmarked)
    (detect / YAML_NAMES["s2"]).write_text(yolov9_yaml("s2"))
    inode = (detect / YAML_NAMES["s2"]).stat().st_ino
    code, out, err = run("--write-yamls", detect.parents[1])
    assert code == 0, err
    assert f"wrote {detect / YAML_NAMES['s0']}" in out and f"wrote {detect / YAML_NAMES['s1']}" in out
    assert f"{detect / YAML_NAMES['s2']}: up to date" in out
    assert (detect / YAML_NAMES["s2"]).stat().st_ino == inode
    for variant, name in YAML_NAMES.items():
        assert (detect / name).read_text() == yolov9_yaml(variant)


@pytest.fixture()
def apple_s0(tmp_path: Path) -> Path:
    path = tmp_path / "mobileone_s0_unfused.pth.tar"
    torch.save(mobileone_rs.mobileone("s0").state_dict(), path)
    return path


def test_a_failing_init_write_keeps_the_old_file(apple_s0: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "init.pt"
    out.write_bytes(b"the previous init.pt")
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:  # half written
            handle.truncate(os.path.getsize(f) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    code, _, err = run("--weights", apple_s0, "--cfg", YAML_NAMES["s0"], "--out", out)
    assert code == 2
    assert err == f"error: cannot write {out}: No space left on device\n"
    assert out.read_bytes() == b"the previous init.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([apple_s0.name, "init.pt"])  # no temporary


def test_an_init_checkpoint_that_cannot_be_written_is_refused_before_reading(apple_s0: Path, tmp_path: Path):
    out = tmp_path / "missing-folder" / "init.pt"
    code, stdout, err = run("--weights", apple_s0, "--cfg", YAML_NAMES["s0"], "--out", out)
    assert code == 2 and stdout == ""
    assert err == f"error: cannot write {out}: folder {out.parent} does not exist\n"
