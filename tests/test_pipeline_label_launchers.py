"""Stage one's launchers: this process or Ray Data, the same shards byte for byte; the local one
with Ray absent; no error-level line from Ray. And train-student's --device."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_digit_folder, write_teacher
from deitpipe.pipeline.cli import main
from deitpipe.pipeline.config import LabelConfig, TrainConfig
from deitpipe.pipeline.label import resolve_launcher
from deitpipe.shards.format import schema

ARGS = ["--teacher", "resnet18", "--views", "2", "--topk", "2", "--shard-size", "4", "--batch-size", "9",
        "--device", "cpu", "--no-progress"]  # 3 images a teacher pass: chunks straddle shards

_NO_RAY = """
import sys
class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoRay())
from deitpipe.pipeline.cli import main
main()
"""


def _shards(out: Path) -> dict[str, bytes]:
    names = [e["name"] for e in json.loads((out / schema.MANIFEST_NAME).read_text())["shards"]]
    return {name: (out / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    return write_teacher(root / "t.pt"), write_digit_folder(root / "imgs", n=14)


@pytest.fixture(scope="module")
def local_shards(inputs, tmp_path_factory):
    weights, data = inputs
    out = tmp_path_factory.mktemp("local") / "shards"
    result = CliRunner().invoke(main, ["label-teacher", "--data", str(data), "--out", str(out),
                                       "--teacher-weights", str(weights), "--launcher", "local", *ARGS])
    assert result.exit_code == 0, result.output
    assert "4 shards (4 written" in result.output
    return _shards(out)


@pytest.mark.ray
def test_the_ray_launcher_writes_the_local_launchers_shards_and_no_error_line(inputs, local_shards, tmp_path, capfd):
    weights, data = inputs
    result = CliRunner().invoke(main, ["label-teacher", "--data", str(data), "--out", str(tmp_path / "ray"),
                                       "--teacher-weights", str(weights), "--launcher", "ray", *ARGS])
    assert result.exit_code == 0, result.output
    assert _shards(tmp_path / "ray") == local_shards
    captured = capfd.readouterr()
    text = captured.out + captured.err + result.output
    # Ray's C++ log lines read "[time E pid tid] file.cc:N: ..."; Python's "ERROR".
    assert not re.search(r"^\[[^\]]* E \d+ \d+\]|\bERROR\b", text, re.M), text[-2000:]


def test_the_local_launcher_labels_where_ray_is_not_installed(inputs, local_shards, tmp_path):
    weights, data = inputs
    proc = subprocess.run([sys.executable, "-c", _NO_RAY, "label-teacher", "--data", str(data), "--out",
                           str(tmp_path / "s"), "--teacher-weights", str(weights), *ARGS],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _shards(tmp_path / "s") == local_shards


def test_the_default_launcher_is_ray_only_with_a_cluster():
    assert resolve_launcher(LabelConfig(device="cpu")) == "local"
    assert resolve_launcher(LabelConfig(ray_address="auto")) == "ray"
    assert resolve_launcher(LabelConfig(ray_address="auto", launcher="local")) == "local"
    line = CliRunner().invoke(main, ["label-teacher", "--launcher", "local", "--ray-address", "auto",
                                     "--no-progress"]).output.strip().splitlines()
    assert len(line) == 1 and "--ray-address" in line[0] and "--launcher local" in line[0]


def test_train_student_device(tmp_path):
    import torch

    assert TrainConfig(use_gpu=True).device == "cuda"  # the alias
    with pytest.raises(ValueError, match="--use-gpu and --device cpu"):
        TrainConfig(use_gpu=True, device="cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from test_integrity import _shards as shard_set

    folder = shard_set(tmp_path / "s")
    result = CliRunner().invoke(main, ["train-student", "--shards", str(folder), "--out", str(tmp_path / "run"),
                                       "--launcher", "local", "--device", "cuda", "--img-size", "16",
                                       "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
                                       "--batch-size", "4", "--no-progress"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "--device cuda" in lines[0], result.output
