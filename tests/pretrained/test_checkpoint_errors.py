"""Every checkpoint file that cannot be read is one CheckpointError that names the file and what is wrong.

The files are what users end up with: an interrupted download, a saved link or error page, an empty
file, a folder, an archive that is not torch's, a pickle of something that is not a state dict.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import mobileone_rs
import pytest
import torch
from mobileone_rs import CheckpointError, convert_checkpoint
from mobileone_rs.yolov9.yamls import YAML_NAMES

from tests.pretrained.test_cli import ONE_THREAD

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return mobileone_rs.mobileone("s0").state_dict()


def _safetensors(state, path: Path, keep: float) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _torch_zip(state, path: Path, keep: float) -> None:
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _zip_of_text(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")


# (file name, how to make it, what the message says after "NAME: ")
FILES = {
    "truncated-safetensors": (
        "model.safetensors",
        lambda s, p: _safetensors(s, p, 0.5),
        "not a readable .safetensors file",
    ),
    "header-only-safetensors": (
        "model.safetensors",
        lambda s, p: _safetensors(s, p, 0.00001),
        "not a readable .safetensors file",
    ),
    "saved-link": (
        "mobileone_s0_unfused.pth.tar",
        lambda s, p: p.write_text("https://docs-assets.developer.apple.com/s0.pth.tar\n"),
        "a text file starting 'https://docs-assets",
    ),
    "error-page": (
        "pytorch_model.bin",
        lambda s, p: p.write_text("<!DOCTYPE html><html>404</html>"),
        "a text file starting '<!DOCTYPE html>",
    ),
    "empty": ("model.pth", lambda s, p: p.write_bytes(b""), "the file is empty (0 bytes"),
    "folder": ("model.pth", lambda s, p: p.mkdir(), "is a folder, not a checkpoint file"),
    "zip-not-torch": (
        "model.pth",
        lambda s, p: _zip_of_text(p),
        "not a readable torch checkpoint (RuntimeError",
    ),
    "truncated-torch": ("model.pth", lambda s, p: _torch_zip(s, p, 0.5), "not a readable torch checkpoint ("),
    "random-bytes": (
        "model.pth",
        lambda s, p: p.write_bytes(bytes(range(256)) * 4),
        "not a readable torch checkpoint (",
    ),
    "plain-pickle": (
        "model.pkl",
        lambda s, p: p.write_bytes(pickle.dumps({"a": 1})),
        "not a readable torch checkpoint (",
    ),
    "list": (
        "model.pth",
        lambda s, p: torch.save([torch.zeros(1)], p),
        "expected a state dict (a mapping of tensors), got list",
    ),
    "string": (
        "model.pth",
        lambda s, p: torch.save("weights", p),
        "expected a state dict (a mapping of tensors), got str",
    ),
}


@pytest.mark.parametrize("kind", FILES)
def test_an_unreadable_file_is_a_checkpoint_error_naming_it(kind, state, tmp_path):
    name, make, message = FILES[kind]
    path = tmp_path / name
    make(state, path)
    with pytest.raises(CheckpointError) as raised:
        convert_checkpoint(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)
    assert str(path) not in str(raised.value)[len(str(path)) :]  # named once


def test_missing_safetensors_package_names_the_extra(state, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    _safetensors(state, path, 1.0)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError) as raised:
        convert_checkpoint(path)
    assert str(raised.value) == (
        f"{path}: reading .safetensors needs the safetensors package: "
        "pip install 'mobileone-rs[safetensors]' (or pip install safetensors)"
    )


def test_safetensors_is_an_optional_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["safetensors"] == ["safetensors"]
    assert not any(dep.startswith("safetensors") for dep in project["dependencies"])


def test_the_pretrained_command_reports_an_interrupted_download_in_one_line(state, tmp_path):
    path = tmp_path / "model.safetensors"
    _safetensors(state, path, 0.5)
    command = [
        sys.executable,
        "-m",
        "mobileone_rs.pretrained",
        "--weights",
        str(path),
        "--cfg",
        YAML_NAMES["s0"],
        "--out",
        str(tmp_path / "init.pt"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, timeout=300, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {path}: not a readable .safetensors file (")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "init.pt").exists()
