"""Teacher training: options, head replacement, atomic saving, refusals before any work, and a
round trip through build_teacher with the sidecar."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from deitpipe.common.optim import param_groups
from deitpipe.shards.inputs import resolve_source
from deitpipe.shards.inputs.embedded import _digits, digits_split, render_digit
from deitpipe.teacher import build_teacher, read_sidecar, sidecar_path, train as train_mod
from deitpipe.teacher.data import SourceImages, eval_transform
from deitpipe.teacher.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from deitpipe.teacher.train import (
    OPTIMIZER_DEFAULTS,
    TeacherTrainConfig,
    build_start_model,
    build_teacher_optimizer,
    evaluate_teacher,
    replace_head,
    save_teacher,
    train_teacher,
)

ARCH = "regnet_y_400mf"
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The steps are small: a second OpenMP thread gains little, and on a shared machine a busy
    # core stalls every parallel region, which makes timings swing tenfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digit_folder(root: Path, *, classes: tuple[int, ...], per_class: int) -> Path:
    """An ImageFolder of the first ``per_class`` training digits of each class in ``classes``."""
    _, target = _digits()
    train, _ = digits_split()
    for c in classes:
        (root / f"d{c}").mkdir(parents=True)
        for i in [i for i in train if target[i] == c][:per_class]:
            (root / f"d{c}" / f"{i:04d}.png").write_bytes(render_digit(int(i), image_size=32))
    return root


@pytest.fixture(scope="module")
def folder3(tmp_path_factory) -> Path:
    """Three classes (digits 0, 1, 2), 10 images each, plus one file that is not an image."""
    root = digit_folder(tmp_path_factory.mktemp("digits3"), classes=(0, 1, 2), per_class=10)
    (root / "d1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def quick(tmp_path: Path, **kw) -> TeacherTrainConfig:
    options = dict(teacher=ARCH, epochs=1, batch_size=16, out=str(tmp_path / "t.pt"), device="cpu")
    return TeacherTrainConfig(**{**options, **kw})


@pytest.mark.parametrize(
    ("kw", "option"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": -1.0}, "--lr"),
        ({"optimizer": "adam"}, "--optimizer"),
        ({"weight_decay": -0.1}, "--weight-decay"),
        ({"label_smoothing": 1.0}, "--label-smoothing"),
        ({"img_size": 4}, "--img-size"),
        ({"img_size": 64, "resize": 32}, "--resize"),
        ({"mean": (0.5, 0.5)}, "--mean"),
        ({"std": (0.2, 0.0, 0.2)}, "--std"),
        ({"interpolation": "lanczos"}, "--interpolation"),
        ({"min_scale": 0.0}, "--min-scale"),
        ({"num_classes": 1}, "--num-classes"),
        ({"num_workers": -1}, "--num-workers"),
        ({"seed": -3}, "--seed"),
        ({"out": "teacher.json"}, "--out"),
        ({"teacher_weights": "/nonexistent/teacher.pt"}, "--teacher-weights"),
        ({"teacher": "regnet_y_400"}, "regnet_y_400mf"),
    ],
)
def test_bad_options_give_one_line_errors(kw, option):
    with pytest.raises(ValueError) as error:
        TeacherTrainConfig(**kw)
    assert option in str(error.value) and "\n" not in str(error.value)


def test_defaults_follow_input_size_and_optimizer():
    small, large = TeacherTrainConfig(), TeacherTrainConfig(img_size=224)
    assert (small.preprocessing.resize, small.crop_scale) == (32, (0.25, 1.0))
    assert (large.preprocessing.resize, large.crop_scale) == (256, (0.08, 1.0))
    assert small.lr is None and small.resolved().lr == 0.03 == OPTIMIZER_DEFAULTS["sgd"]["lr"]
    assert OPTIMIZER_DEFAULTS["adamw"] == {"lr": 1e-3, "weight_decay": 0.05}
    assert TeacherTrainConfig(optimizer="adamw").resolved().weight_decay == 0.05
    resolved = TeacherTrainConfig(mean=[0.1, 0.2, 0.3], lr=0.5).resolved()
    assert resolved.mean == (0.1, 0.2, 0.3) and resolved.lr == 0.5
    assert (resolved.resize, resolved.min_scale) == (32, 0.25)


@pytest.mark.parametrize(("arch", "head"), [(ARCH, "fc"), ("squeezenet1_1", "classifier.1")])
def test_replace_head_changes_only_the_classifier(arch, head):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert replace_head(model, 3) == head
    after = model.state_dict()
    assert after[f"{head}.weight"].shape[0] == 3
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(f"{head}."))


def test_finetune_start_keeps_every_weight_but_the_head(tmp_path):
    torch.manual_seed(0)
    ten = torchvision.models.get_model(ARCH, num_classes=10)
    torch.save(ten.state_dict(), tmp_path / "ten.pt")  # no sidecar: the class count is inferred
    prep = Preprocessing(resize=32, crop=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    three = build_start_model(ARCH, num_classes=3, prep=prep, weights_path=str(tmp_path / "ten.pt"))
    old, new = ten.state_dict(), three.state_dict()
    assert new["fc.weight"].shape == (3, old["fc.weight"].shape[1])
    assert three.training
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith("fc."))
    same = build_start_model(ARCH, num_classes=10, prep=prep, weights_path=str(tmp_path / "ten.pt"))
    assert all(torch.equal(old[k], v) for k, v in same.state_dict().items())


def test_round_trip_through_build_teacher(tmp_path, folder3):
    torch.manual_seed(1)
    torch.save(torchvision.models.get_model(ARCH, num_classes=10).state_dict(), tmp_path / "ten.pt")
    config = quick(tmp_path, data=str(folder3), val=str(folder3), mean=MEAN, std=STD, epochs=2,
                   teacher_weights=str(tmp_path / "ten.pt"), progress=True)
    result = train_teacher(config)
    assert result["weights"] == config.out and result["sidecar"] == str(sidecar_path(config.out))
    assert [p for p, _ in result["skipped"]] == ["d1/broken.png"]
    assert [h["epoch"] for h in result["history"]] == [1, 2] and result["epochs"] == 2
    assert 0 <= result["train_top1"] <= 1
    assert result["val_top1"] == result["history"][-1]["val_top1"]
    # Nothing but the weights and the sidecar is left: no temporary files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.pt", "ten.pt"]
    model, info = build_teacher(ARCH, weights_path=config.out)
    assert info.num_classes == 3 and info.class_names == ("d0", "d1", "d2")
    assert info.preprocessing == Preprocessing(resize=32, crop=32, mean=MEAN, std=STD)
    assert read_sidecar(config.out)["train"]["config"]["lr"] == 0.03
    saved = torch.load(config.out, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # The reloaded teacher scores the held-out data exactly as training measured it.
    top1 = evaluate_teacher(model, resolve_source(str(folder3)), info.preprocessing, batch_size=16)
    assert top1 == pytest.approx(result["val_top1"])


def test_training_is_deterministic_for_a_seed(tmp_path, folder3):
    states = []
    for run in ("a", "b"):
        config = quick(tmp_path / run, data=str(folder3), seed=3, optimizer="adamw")
        train_teacher(config)
        states.append(torch.load(config.out, weights_only=True))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_mismatched_data_is_rejected_before_training(tmp_path, folder3):
    with pytest.raises(ValueError, match="--val"):
        train_teacher(quick(tmp_path, data=str(folder3), val="digits:val"))
    with pytest.raises(ValueError, match="--num-classes 2 is too small"):
        train_teacher(quick(tmp_path, data=str(folder3), num_classes=2))
    assert not (tmp_path / "t.pt").exists()


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "t.pt"
    path.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train_mod, "write_sidecar", fail)
    with pytest.raises(OSError, match="disk full"):
        save_teacher(nn.Linear(3, 2), path, {"model": "x"})
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]
    monkeypatch.undo()
    save_teacher(nn.Linear(3, 2), path, {"model": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.pt"]
    assert torch.load(path, weights_only=True)["weight"].shape == (2, 3)


def test_failed_torch_save_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "t.pt"
    save_teacher(nn.Linear(3, 2), path, {"model": "old"})
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_teacher(nn.Linear(3, 2), path, {"model": "new"})
    assert path.read_bytes() == before and read_sidecar(path) == {"model": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.pt"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_teacher_optimizer_decays_no_norm_or_bias(optimizer):
    torch.manual_seed(0)
    model = torchvision.models.get_model(ARCH, num_classes=3)
    config = TeacherTrainConfig(teacher=ARCH, optimizer=optimizer).resolved()
    opt, _ = build_teacher_optimizer(model, config, steps_per_epoch=4)
    decay, no_decay = opt.param_groups
    assert [g["names"] for g in opt.param_groups] == [
        g["names"] for g in param_groups(model, weight_decay=config.weight_decay)
    ]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (config.weight_decay, 0.0)
    norms = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
             for p in ("weight", "bias")}
    assert norms and norms | {"fc.bias"} <= set(no_decay["names"])
    assert {"fc.weight", "stem.0.weight"} <= set(decay["names"])
    assert len(decay["names"]) + len(no_decay["names"]) == len(list(model.parameters()))
    if optimizer == "sgd":
        assert isinstance(opt, torch.optim.SGD) and decay["nesterov"] and decay["momentum"] == 0.9
    else:
        assert isinstance(opt, torch.optim.AdamW)


def _teacher_lrs(epochs: int, steps: int, lr: float = 0.03) -> list[float]:
    config = TeacherTrainConfig(teacher=ARCH, epochs=epochs, lr=lr).resolved()
    opt, sched = build_teacher_optimizer(nn.Linear(2, 2), config, steps_per_epoch=steps)
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs + [opt.param_groups[0]["lr"]]  # after the last step


def test_teacher_schedule_is_one_warmup_epoch_then_cosine_to_zero():
    lrs = _teacher_lrs(epochs=3, steps=4)
    # Linear warmup from lr/steps to lr over one epoch: torch's LinearLR(start_factor=1/steps).
    assert lrs[:5] == pytest.approx([0.0075, 0.013125, 0.01875, 0.024375, 0.03])
    assert lrs[8] == pytest.approx(0.015)  # halfway down the cosine
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert _teacher_lrs(epochs=1, steps=4)[:2] == pytest.approx([0.03, 0.03 * (2 + 2**0.5) / 4])


def test_undecodable_inputs_are_skipped_and_listed(folder3):
    prep = TeacherTrainConfig().preprocessing
    data = SourceImages(resolve_source(str(folder3)), eval_transform(prep))
    assert len(data) == 30 and data.skipped[0][0] == "d1/broken.png"
    image, label = data[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


def test_training_learns_well_above_chance(tmp_path):
    # 3 classes x 30 digits, 8 short epochs: 0.73-0.87 training top-1 over seeds 0-4 (chance
    # 0.33). Weak augmentation and no decay so that a few dozen steps are enough.
    folder = digit_folder(tmp_path / "digits", classes=(0, 1, 2), per_class=30)
    config = quick(tmp_path, data=str(folder), epochs=8, min_scale=1.0, label_smoothing=0.0,
                   weight_decay=0.0, lr=0.01)
    result = train_teacher(config)
    assert result["train_top1"] > 0.6
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]


def _refuse_data(config):
    raise AssertionError("the data was read before the refusal")


def test_foreign_sidecar_is_refused_before_training_and_kept(tmp_path, monkeypatch):
    foreign = tmp_path / "model.json"
    foreign.write_bytes(b'{"name": "another tool", "labels": [1, 2]}\n')
    before = foreign.read_bytes()
    monkeypatch.setattr(train_mod, "_load_data", _refuse_data)
    with pytest.raises(ValueError) as error:
        train_teacher(quick(tmp_path, out=str(tmp_path / "model.pt")))
    message = str(error.value)
    assert "\n" not in message and str(foreign) in message and "not written by deitpipe" in message
    assert "choose another --out" in message
    assert foreign.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]
    # save_teacher checks too, before it writes the weights.
    with pytest.raises(ValueError, match="not written by deitpipe"):
        save_teacher(nn.Linear(3, 2), tmp_path / "model.pt", {"model": "x"})
    assert foreign.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]


def test_foreign_sidecar_is_refused_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from deitpipe.pipeline.cli import main

    foreign = tmp_path / "model.json"
    foreign.write_text("{}")
    result = CliRunner().invoke(main, ["train-teacher", "--out", str(tmp_path / "model.pt"), "--epochs", "1",
                                       "--no-progress"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert str(foreign) in lines[0] and foreign.read_text() == "{}"
    assert not (tmp_path / "model.pt").exists()


def test_own_sidecar_is_replaced(tmp_path):
    path = tmp_path / "model.pt"
    save_teacher(nn.Linear(3, 2), path, {"model": "old"})
    marker = json.loads(sidecar_path(path).read_text())["written_by"]
    assert marker.startswith("deitpipe train-teacher ") and read_sidecar(path) == {"model": "old"}
    save_teacher(nn.Linear(3, 2), path, {"model": "new"})
    assert read_sidecar(path) == {"model": "new"}
    # A sidecar written before the marker, with exactly train-teacher's keys, is deitpipe's too.
    unmarked = {"model": ARCH, "num_classes": 3, "class_names": None, "resize": 32, "crop": 32,
                "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear", "train": {}}
    sidecar_path(path).write_text(json.dumps(unmarked))
    save_teacher(nn.Linear(3, 2), path, {"model": "newer"})
    assert read_sidecar(path) == {"model": "newer"}
    # One key more or less, or another tool's marker, and it is not.
    for foreign in ({**unmarked, "extra": 1}, {k: v for k, v in unmarked.items() if k != "train"},
                    {**unmarked, "written_by": "another tool 1.0"}, [unmarked]):
        sidecar_path(path).write_text(json.dumps(foreign))
        with pytest.raises(ValueError, match="not written by deitpipe"):
            save_teacher(nn.Linear(3, 2), path, {"model": "x"})


@pytest.mark.parametrize("link", ["weights", "sidecar"])
def test_links_and_directories_are_refused_before_training(tmp_path, monkeypatch, link):
    monkeypatch.setattr(train_mod, "_load_data", _refuse_data)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"kept")
    path = tmp_path / "model.pt"
    (path if link == "weights" else sidecar_path(path)).symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link") as error:
        train_teacher(quick(tmp_path, out=str(path)))
    assert "\n" not in str(error.value) and "choose another --out" in str(error.value)
    assert target.read_bytes() == b"kept" and os.path.islink(path if link == "weights" else sidecar_path(path))
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"--out .*models is a directory; name the weights file"):
        train_teacher(quick(tmp_path, out=str(folder)))
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_cuda_without_a_gpu_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "_load_data", _refuse_data)
    with pytest.raises(ValueError, match=r"--device cuda asked for CUDA but none is available") as error:
        train_teacher(quick(tmp_path, device="cuda"))
    assert "\n" not in str(error.value) and list(tmp_path.iterdir()) == []
    from click.testing import CliRunner

    from deitpipe.pipeline.cli import main

    result = CliRunner().invoke(main, ["train-teacher", "--device", "cuda", "--out", str(tmp_path / "t.pt")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and lines == ["Error: --device cuda asked for CUDA but none is available; "
                                               "use auto or cpu"], result.output
