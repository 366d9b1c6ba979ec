"""evaluate and analyze on real folders: bad checkpoints are one line, undecodable images are skipped."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from deitpipe.pipeline.cli import main
from deitpipe.shards.format.image import ImageDecodeError
from deitpipe.student import create_student, read_state_dict
from deitpipe.student.heldout import EvalImages, eval_items

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
TINY_ARGS = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2"]


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def _digit_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((16, 16)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def digit_folder(tmp_path: Path) -> Path:
    """Six digit PNGs in three classes, plus a truncated JPEG and a zero-byte .jpg."""
    digits = load_digits()
    root = tmp_path / "digits"
    for label in range(3):
        (root / str(label)).mkdir(parents=True)
        for j, index in enumerate(np.flatnonzero(digits.target == label)[:2]):
            (root / str(label) / f"d{j}.png").write_bytes(_digit_png(digits.images[index]))
    buf = io.BytesIO()
    Image.fromarray((digits.images[0] * 15).astype(np.uint8)).resize((64, 64)).convert("RGB").save(buf, "JPEG")
    (root / "0" / "bad.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "1" / "empty.jpg").write_bytes(b"")
    return root


@pytest.fixture()
def student_pt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "run" / "student.pt"
    path.parent.mkdir()
    torch.save(create_student("deit_tiny_distilled_patch16_224", num_classes=10, **TINY).state_dict(), path)
    return path


def test_evaluate_skips_undecodable_images_and_lists_them(digit_folder, student_pt):
    result = _run("evaluate", "--checkpoint", str(student_pt), "--data", str(digit_folder), "--json", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["n"] == 6
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["bad.jpg", "empty.jpg"]
    assert {s["reason"].split(":")[0] for s in report["skipped"]} == {"truncated", "zero bytes"}
    table = _run("evaluate", "--checkpoint", str(student_pt), "--data", str(digit_folder), *TINY_ARGS)
    assert table.exit_code == 0, table.output
    assert "(6 images, 2 skipped)" in table.output and "empty.jpg: zero bytes" in table.output


def test_evaluate_strict_stops_at_the_first_undecodable_image(digit_folder, student_pt):
    result = _run("evaluate", "--checkpoint", str(student_pt), "--data", str(digit_folder), "--strict", *TINY_ARGS)
    assert result.exit_code == 1
    lines = _lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("Error:") and "bad.jpg" in lines[0], result.output


def test_eval_images_decode_each_image_once_and_drop_the_bad_ones(digit_folder):
    items, _ = eval_items(str(digit_folder))
    calls = []
    counted = [((lambda load=load, p=p: calls.append(p) or load()), label, hard, p) for load, label, hard, p in items]
    dataset = EvalImages(counted, img_size=16, crop_pct=1.0, skip_undecodable=True)
    skipped: list[dict] = []
    batches = list(dataset.decodable(DataLoader(dataset, batch_size=3), skipped))
    assert sorted(calls) == sorted(p for *_, p in items)  # one read per image
    assert sum(b["image"].shape[0] for b in batches) == 6
    assert all(set(b) == {"image", "label"} and b["image"].abs().sum(dim=(1, 2, 3)).gt(0).all() for b in batches)
    assert [Path(s["path"]).name for s in skipped] == ["bad.jpg", "empty.jpg"]
    with pytest.raises(ImageDecodeError, match="bad.jpg: truncated"):
        list(DataLoader(EvalImages(items, img_size=16, crop_pct=1.0), batch_size=3))


def test_analyze_skips_undecodable_images(digit_folder, student_pt, tmp_path):
    (student_pt.parent / "config.json").write_text(json.dumps({"model": "deit_tiny_distilled_patch16_224", **TINY}))
    result = _run("analyze", "--run", str(student_pt.parent), "--data", str(digit_folder),
                  "--out", str(tmp_path / "a"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == 6 and len(report["skipped"]) == 2 and len(report["token_similarity"]) == 2


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint path, text the error must contain)."""
    tensor, listed, headless = tmp_path / "tensor.pt", tmp_path / "list.pt", tmp_path / "headless.pt"
    torch.save(torch.zeros(3), tensor)
    torch.save([torch.zeros(1), torch.zeros(2)], listed)
    state = create_student("deit_tiny_distilled_patch16_224", num_classes=10, **TINY).state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, headless)
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    (tmp_path / "emptyrun").mkdir()
    return {
        "tensor": (tensor, "is not a state dict (got Tensor)"),
        "list": (listed, "is not a state dict (got list)"),
        "headless": (headless, "holds no 'head.weight'"),
        "missing": (tmp_path / "nope.pt", "does not exist; pass the path of a weights file"),
        "not torch": (text, "it must be a torch.save file"),
        "run without weights": (tmp_path / "emptyrun", "holds no student.pt"),
    }


@pytest.mark.parametrize("name", ["tensor", "list", "headless", "missing", "not torch", "run without weights"])
def test_evaluate_bad_checkpoint_is_one_line(tmp_path, name):
    path, want = _bad_checkpoints(tmp_path)[name]
    result = _run("evaluate", "--checkpoint", str(path), *TINY_ARGS)
    assert result.exit_code == 1, result.output
    lines = _lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert want in lines[0] and path.name in lines[0], lines[0]
    if name == "headless":
        assert "--num-classes" in lines[0]


def test_read_state_dict_raises_value_error_for_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.pt does not exist"):
        read_state_dict(tmp_path / "nope.pt")


def test_checkpoint_of_another_width_is_one_line(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(create_student("deit_tiny_distilled_patch16_224", num_classes=10,
                              **{**TINY, "embed_dim": 64}).state_dict(), path)
    result = _run("evaluate", "--checkpoint", str(path), *TINY_ARGS)
    lines = _lines(result.output)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "does not fit the model: cls_token (1, 1, 64) in the file vs (1, 1, 32)" in lines[0], lines[0]


def test_evaluate_takes_the_variant_from_the_runs_config(digit_folder, tmp_path):
    run = tmp_path / "plain"
    run.mkdir()
    torch.save(create_student("deit_tiny_patch16_224", num_classes=10, **TINY).state_dict(), run / "student.pt")
    (run / "config.json").write_text(json.dumps({"model": "deit_tiny_patch16_224", **TINY}))
    result = _run("evaluate", "--checkpoint", str(run), "--data", str(digit_folder), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert "top1" in report and "top1_cls" not in report and report["n"] == 6
