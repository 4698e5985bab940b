"""mobileone_rs.files: a write appears whole or not at all, keeps the file's mode and writes through
symbolic links."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from mobileone_rs import MobileOneError, files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_write_keeps_the_mode_and_writes_through_a_link(tmp_path: Path):
    real = tmp_path / "real.txt"
    real.write_text("a")
    real.chmod(0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    files.write_text(link, "b")
    assert link.is_symlink() and real.read_text() == "b"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640


def test_an_unwritable_folder_is_named(tmp_path: Path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(files.WriteError, match="ro") as raised:
            files.write_text(folder / "x.txt", "x")
        assert isinstance(raised.value, MobileOneError) and isinstance(raised.value, OSError)
    finally:
        folder.chmod(0o700)


def test_a_missing_folder_is_named_before_anything_is_written(tmp_path: Path):
    with pytest.raises(files.WriteError, match="missing.*does not exist"):
        files.check_writable([tmp_path / "ok.txt", tmp_path / "missing" / "x.txt"])
    with pytest.raises(files.WriteError, match="missing"):
        files.write_text(tmp_path / "missing" / "x.txt", "x")
