"""``deitpipe inspect --check-teacher N``: replayed views labelled again by the manifest's teacher."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import one_line_error, run_cli, write_digit_folder

SIDE = 48  # the teacher's crop; views are cut at 32, so the check resizes them as labelling did
# ids without "gpu": conftest skips tests whose keywords name it when CUDA is absent, and the
# batched loader runs on the CPU too.
LOADERS, LOADER_IDS = ["cpu", "gpu"], ["worker-loader", "batched-loader"]
AUGMENT = ["--rand-augment", 9, "--random-erasing", 0.5, "--mixup", 0.8, "--cutmix", 1.0]


def spread_teacher(path: Path, images: list[Path], *, seed: int) -> Path:
    """An untrained resnet18 whose head is centred on these images' features, with its sidecar.

    A plain untrained network gives every view the same argmax, which would agree with any label
    set; centring the head on the data spreads its answers over the classes.
    """
    torch.manual_seed(seed)
    model = torchvision.models.get_model("resnet18", num_classes=10).eval()
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((SIDE, SIDE)))).permute(2, 0, 1)
                     for p in images]).float() / 255
    head, model.fc = model.fc, torch.nn.Identity()
    with torch.no_grad():
        features = model((x - 0.5) / 0.25)  # (n, 512)
        weight = 3 * torch.randn(10, features.shape[1]) / features.std(0).clamp_min(1e-6) / features.shape[1] ** 0.5
        head.weight.copy_(weight)
        head.bias.copy_(-weight @ features.mean(0))
    model.fc = head
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(
        {"model": "resnet18", "num_classes": 10, "resize": SIDE, "crop": SIDE, "mean": [0.5] * 3,
         "std": [0.25] * 3, "interpolation": "bilinear"}))
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, Path]:
    """Two label sets of 32 JPEG digits by one teacher: schema version 3 (the DeiT recipe stored)
    and crop-only version 2; and the weights of another teacher."""
    root = tmp_path_factory.mktemp("check-teacher")
    data = write_digit_folder(root / "digits", 32, size=(24, 24), ext="jpg")
    images = sorted(data.rglob("*.jpg"))
    teacher = spread_teacher(root / "teacher.pt", images, seed=0)
    out = {"root": root, "teacher": teacher, "other": spread_teacher(root / "other.pt", images, seed=1)}
    for name, extra in (("v3", AUGMENT), ("v2", [])):
        result = run_cli("label-teacher", "--data", data, "--out", root / name, "--teacher", "resnet18",
                         "--teacher-weights", teacher, "--views", 4, *extra, "--view-size", 32, "--shard-size", 16,
                         "--batch-size", 32, "--device", "cpu", "--launcher", "local", "--no-progress")
        assert result.exit_code == 0, result.output
        out[name] = root / name
    assert json.loads((out["v3"] / "manifest.json").read_text())["schema_version"] == 3
    assert json.loads((out["v2"] / "manifest.json").read_text())["schema_version"] == 2
    return out


def check(out: Path, views: int, *args):
    """``deitpipe inspect OUT --check-teacher VIEWS ARGS`` with the teacher on the CPU, as it labelled."""
    return run_cli("inspect", out, "--check-teacher", views, "--device", "cpu", *args)


def _copy(labelled: dict[str, Path], name: str, edit) -> Path:
    """A copy of a label set whose manifest ``edit`` changes in place."""
    copy = labelled["root"] / f"{name}-{edit.__name__}"
    shutil.copytree(labelled[name], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("loader", LOADERS, ids=LOADER_IDS)
def test_a_stored_augmentation_set_agrees_with_its_teacher(labelled, loader):
    result = check(labelled["v3"], 24, "--loader", loader)
    assert result.exit_code == 0, result.output
    assert result.output == "agreement 100.00 % over 24 views, mean KL 0.0000\n"


@pytest.mark.gpu
def test_the_batched_loader_on_cuda_agrees_with_the_cpu_labels(labelled):
    # nvJPEG decodes with its own IDCT and the teacher runs under bfloat16: close, not bit-equal.
    result = run_cli("inspect", labelled["v3"], "--check-teacher", 32, "--loader", "gpu", "--device", "cuda")
    assert result.exit_code == 0, result.output
    assert float(result.output.split()[1]) >= 99.0


@pytest.mark.parametrize("loader", LOADERS, ids=LOADER_IDS)
def test_a_crop_only_set_is_checked_on_all_its_views_when_asked_for_more(labelled, loader):
    result = check(labelled["v2"], 100, "--loader", loader, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["n"] == 32 and report["available"] == 32 and report["agreement"] == 100.0
    assert report["schema_version"] == 2 and len(report["views"]) == 32 and report["mean_kl"] < 1e-3
    assert len({v["live"] for v in report["views"]}) > 2  # a teacher that answers one class would prove nothing
    assert report["text"].splitlines() == [
        f"{labelled['v2']}: an epoch replays 32 views (one per sample), fewer than the 100 asked; checked them all",
        "agreement 100.00 % over 32 views, mean KL 0.0000"]


def test_other_weights_are_refused_by_their_sha256(labelled):
    result = check(labelled["v3"], 8, "--teacher-weights", labelled["other"])
    assert "labelled by other weights" in one_line_error(result)


def test_labels_of_another_teacher_fail_the_check(labelled):
    def without_sha(manifest):  # as a set whose manifest recorded no digest
        manifest["teacher"].pop("weights_sha256")

    copy = _copy(labelled, "v3", without_sha)
    result = check(copy, 32, "--teacher-weights", labelled["other"])
    assert result.exit_code == 1, result.output
    line, fail = result.output.splitlines()
    match = re.fullmatch(r"agreement (\d+\.\d\d) % over 32 views, mean KL (\d+\.\d{4})", line)
    assert match and float(match[1]) < 80 and float(match[2]) > 0.1, line
    assert fail.startswith("FAIL: ")


def test_weights_that_moved_are_named_by_option(labelled):
    def moved(manifest):
        manifest["config"]["teacher_weights"] = "/nowhere/teacher.pt"

    copy = _copy(labelled, "v2", moved)
    assert "--teacher-weights" in one_line_error(check(copy, 4))
    missing = one_line_error(check(copy, 4, "--teacher-weights", "/nowhere/t.pt"))
    assert missing.startswith("Error: --teacher-weights /nowhere/t.pt: no such file")
    here = shutil.copy(labelled["teacher"], labelled["root"] / "copy.pt")  # no sidecar: the manifest's preprocessing
    result = check(copy, 4, "--teacher-weights", here)
    assert result.exit_code == 0 and result.output.startswith("agreement 100.00 % over 4 views"), result.output
    assert "--check-teacher" in one_line_error(run_cli("inspect", copy, "--loader", "gpu"))
