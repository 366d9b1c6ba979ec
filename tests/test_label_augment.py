"""label-teacher with DeiT's augmentation stored per view (schema version 3), end to end: what the
shards hold, the student's replay against the teacher, the launchers, resume, and train-student."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import one_line_error, run_cli, write_digit_folder, write_teacher
from deitpipe.shards.format import schema
from deitpipe.shards.format.augment import MIX_NONE, AugmentSpec, draw_records, key_number, pair_group, records_of
from deitpipe.shards.format.reader import (
    decode_sample,
    expand_urls,
    read_shard,
    sample_schema_version,
    teacher_distribution,
)

ARGS = ["--teacher", "resnet18", "--views", "4", "--topk", "3", "--shard-size", "19", "--batch-size", "64",
        "--device", "cpu", "--no-progress"]  # 38 inputs: two shards, each a mix group of 16 and one of 3
DEIT = ["--rand-augment", "9", "--random-erasing", "0.25", "--mixup", "0.8", "--cutmix", "1.0"]
VIEW = 16  # --view-size of the main set, whose teacher reads 24 px
TINY = ["--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2"]
TRAIN = ["--launcher", "local", "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0",
         "--no-progress", *TINY]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("augment-inputs")
    return {"teacher24": write_teacher(root / "t24.pt", side=24), "teacher16": write_teacher(root / "t16.pt", side=16),
            "data": write_digit_folder(root / "imgs", n=38, size=(22, 18))}


def _label(inputs: dict[str, Path], out: Path, *extra: str, teacher: str = "teacher24", launcher: str = "local"):
    return run_cli("label-teacher", "--data", inputs["data"], "--out", out, "--teacher-weights", inputs[teacher],
                   "--launcher", launcher, *ARGS, *extra)


def _labelled(inputs, out: Path, *extra: str, **kw) -> Path:
    result = _label(inputs, out, *extra, **kw)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def augmented(inputs, tmp_path_factory) -> Path:
    """The full recipe, views cut at 16 px for a teacher that reads 24 px."""
    return _labelled(inputs, tmp_path_factory.mktemp("augmented") / "shards", *DEIT, "--view-size", str(VIEW))


@pytest.fixture(scope="module")
def augmented_at_crop(inputs, tmp_path_factory) -> Path:
    """The full recipe, views cut at the teacher's own 16 px crop."""
    return _labelled(inputs, tmp_path_factory.mktemp("at-crop") / "shards", *DEIT, teacher="teacher16")


def _manifest(out: Path) -> dict:
    return json.loads((out / schema.MANIFEST_NAME).read_text())


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {e["name"]: (out / e["name"]).read_bytes() for e in _manifest(out)["shards"]}


def _shards(out: Path) -> list[list[dict]]:
    """Each shard's raw samples, in tar order."""
    return [read_shard(url) for url in expand_urls(str(out))]


def test_the_deit_recipe_is_stored_whole_in_version_3(augmented):
    manifest = _manifest(augmented)
    spec = AugmentSpec(size=VIEW, rand_augment=9, random_erasing=0.25, mixup=0.8, cutmix=1.0)
    assert manifest["schema_version"] == 3 and manifest["augment"] == spec.to_dict()
    shards = _shards(augmented)
    assert [len(s) for s in shards] == [19, 19]
    every = []
    for raws in shards:
        assert all(sample_schema_version(raw) == 3 for raw in raws)
        samples = [decode_sample(raw) for raw in raws]
        keys = [s["key"] for s in samples]
        stored = [records_of(s) for s in samples]
        # The records are the pure draws, paired in groups of 16 consecutive samples of the shard.
        drawn = [draw_records(spec, seed=0, key=k, num_views=4) for k in keys]
        for start in range(0, len(keys), 16):
            pair_group(keys[start:start + 16], drawn[start:start + 16], seed=0)
        for s, d in zip(stored, drawn):
            np.testing.assert_array_equal(s, d)
        position = {key_number(k): n for n, k in enumerate(keys)}
        for n, rec in enumerate(stored):
            for v in range(1, 5):
                row = rec[v]
                if row["mix_key"] == MIX_NONE:
                    assert row["lam"] == 1 and n >= 16  # only the odd group of 3 leaves a view alone
                    continue
                other = position[int(row["mix_key"])]  # a sample of this very shard
                assert other // 16 == n // 16 and other != n and row["mix_view"] == v
                assert stored[other][v]["mix_key"] == key_number(keys[n])
        for v in range(1, 5):
            assert sum(rec[v]["mix_key"] == MIX_NONE for rec in stored) == 1
        every += [rec[1:] for rec in stored]
    every = np.concatenate(every)
    assert (every["ra_op"] != 255).any() and (every["erase"][:, 2] > 0).any()
    assert (every["cut"][:, 2] > 0).any() and ((every["cut"][:, 2] == 0) & (every["lam"] < 1)).any()


def _stored_views(out: Path, classes: int) -> dict[bytes, list[tuple[int, np.ndarray, bool]]]:
    """Each stored random view by its teacher distribution: (hard label, class-head label, whether
    it is mixed), a list in case two views share a distribution."""
    samples = [decode_sample(raw) for raws in _shards(out) for raw in raws]
    label_of = {key_number(s["key"]): s["label"] for s in samples}
    eye = np.eye(classes, dtype=np.float32)
    views: dict[bytes, list] = {}
    for s in samples:
        rec = records_of(s)
        for v in range(1, len(s["box"])):
            lam, partner = float(rec[v]["lam"]), int(rec[v]["mix_key"])
            label = eye[s["label"]]
            if partner != MIX_NONE:
                label = lam * label + (1 - lam) * eye[label_of[partner]]
            views.setdefault(teacher_distribution(s, v, classes).tobytes(), []).append(
                (int(s["hard"][v]), label, partner != MIX_NONE and lam < 1))
    return views


def _replay_agreement(out: Path, weights: Path) -> tuple[float, int, set[int]]:
    """Replay ``out`` with its stored augmentation and run the teacher on what the student sees;
    checks each example's class-head label on the way. Returns (agreement, examples, classes)."""
    from deitpipe.student.data import Augment, ShardReplay
    from deitpipe.teacher.predict import TeacherPredictor

    manifest = _manifest(out)
    spec, classes = manifest["augment"], manifest["num_classes"]
    teacher = TeacherPredictor(name="resnet18", weights_path=weights, device="cpu", topk=3)
    crop = teacher.info.preprocessing.crop
    mean = torch.tensor(spec["mean"])[None, :, None, None]
    std = torch.tensor(spec["std"])[None, :, None, None]
    stored = _stored_views(out, classes)
    agree = total = mixed = 0
    answers: set[int] = set()
    for epoch in range(4):
        ds = ShardReplay(urls=expand_urls(str(out)), num_classes=classes, num_views=4, teacher_labels="views",
                         img_size=spec["size"], batch_size=19, steps=2, stored_augment=spec,
                         augment=Augment(rand_augment=None, random_erasing=0.0))
        ds.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(ds, batch_size=19):
            unit = batch["image"] * std + mean  # as ViewTeacher hands the rendered view to the teacher
            if unit.shape[-1] != crop:
                unit = torch.nn.functional.interpolate(unit, size=(crop, crop), mode="bilinear", align_corners=False)
            pred = teacher.probs(unit).argmax(1)
            agree += int((pred == batch["teacher_hard"]).sum())
            total += len(pred)
            answers.update(batch["teacher_hard"].tolist())
            for target, hard, label in zip(batch["teacher"], batch["teacher_hard"], batch["label"]):
                match = [view for view in stored[target.numpy().tobytes()]
                         if view[0] == int(hard) and np.allclose(view[1], label.numpy(), atol=1e-6)]
                assert match, (label, stored[target.numpy().tobytes()])
                mixed += match[0][2]
    assert mixed > total // 2
    return agree / total, total, answers


@pytest.mark.parametrize("which, weights", [("augmented", "teacher24"), ("augmented_at_crop", "teacher16")])
def test_the_replayed_view_carries_the_teachers_label(which, weights, inputs, request):
    """The student's loader renders each stored record; the teacher on those pixels gives the
    stored label, whether the teacher reads the views larger or at their size."""
    agreement, total, answers = _replay_agreement(request.getfixturevalue(which), inputs[weights])
    assert total == 4 * 38 and agreement >= 0.995
    assert len(answers) > 1  # the teacher tells views apart: agreement is not one constant answer


def test_without_augmentation_options_the_set_stays_version_2(inputs, augmented, tmp_path):
    plain = _labelled(inputs, tmp_path / "plain", "--view-size", str(VIEW))
    off = _labelled(inputs, tmp_path / "off", "--view-size", str(VIEW), "--rand-augment", "-1", "--mixup", "0",
                    "--cutmix", "0", "--random-erasing", "0")
    for out in (plain, off):
        manifest = _manifest(out)
        assert manifest["schema_version"] == 2 and "augment" not in manifest
    assert _shard_bytes(plain) == _shard_bytes(off)
    raws = [raw for shard in _shards(plain) for raw in shard]
    assert all(sample_schema_version(raw) == 2 for raw in raws)
    rows = np.load(io.BytesIO(raws[0][schema.VIEWS]), allow_pickle=False)
    assert rows.dtype.names == schema.VIEW_FIELDS
    # The record rides beside the views; it does not move them.
    boxes = {s["key"]: (s["box"], s["flip"]) for s in map(decode_sample, raws)}
    for s in (decode_sample(raw) for shard in _shards(augmented) for raw in shard):
        np.testing.assert_array_equal(s["box"], boxes[s["key"]][0])
        np.testing.assert_array_equal(s["flip"], boxes[s["key"]][1])
    # A manifest written before the options existed resumes as it is.
    manifest = _manifest(plain)
    for key in ("rand_augment", "rand_augment_std", "random_erasing", "mixup", "cutmix", "mixup_switch"):
        del manifest["config"][key]
    (plain / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    before = _shard_bytes(plain)
    result = _label(inputs, plain, "--view-size", str(VIEW))
    assert result.exit_code == 0 and "(0 written, 2 already complete)" in result.output, result.output
    assert _shard_bytes(plain) == before


def test_other_augmentation_options_are_refused_without_overwrite(inputs, augmented, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(augmented, out)
    before = _shard_bytes(out)
    line = one_line_error(_label(inputs, out, "--random-erasing", "0.25", "--mixup", "0.5", "--cutmix", "1.0",
                                 "--view-size", str(VIEW)))
    assert "--rand-augment" in line and "--mixup" in line and "--overwrite" in line
    assert "--cutmix" not in line and "--random-erasing" not in line
    assert _shard_bytes(out) == before
    result = _label(inputs, out, *DEIT, "--view-size", str(VIEW))
    assert result.exit_code == 0 and "(0 written, 2 already complete)" in result.output, result.output


@pytest.mark.ray
def test_the_ray_launcher_writes_the_local_launchers_version_3_shards(inputs, augmented, tmp_path):
    pytest.importorskip("ray")
    out = _labelled(inputs, tmp_path / "ray", *DEIT, "--view-size", str(VIEW), launcher="ray")
    assert _manifest(out)["schema_version"] == 3
    assert _shard_bytes(out) == _shard_bytes(augmented)


def _train(augmented: Path, out: Path, *extra: str):
    return run_cli("train-student", "--shards", augmented, "--out", out, *TRAIN, *extra)


def test_train_student_takes_the_recipe_from_the_stored_views(augmented, tmp_path):
    recipe = ("rand_augment", "random_erasing", "mixup", "cutmix")
    result = _train(augmented, tmp_path / "default", "--img-size", str(VIEW))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert [config[k] for k in recipe] == [None, 0, 0, 0]
    assert (tmp_path / "default" / "student.pt").is_file()
    result = _train(augmented, tmp_path / "mixup", "--img-size", str(VIEW), "--mixup", "0.8")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "mixup" / "config.json").read_text())
    assert [config[k] for k in recipe] == [None, 0, 0.8, 0]


def test_train_student_at_another_size_than_the_stored_views_is_one_line(augmented, tmp_path):
    line = one_line_error(_train(augmented, tmp_path / "run", "--img-size", "32"))
    assert f"--img-size {VIEW}" in line and "--view-size 32" in line


def test_settings_of_an_augmentation_that_is_off_do_not_refuse_a_rerun(inputs, tmp_path):
    """--mixup-switch means nothing without both mixup and CutMix, --rand-augment-std nothing
    without RandAugment: changing them reruns as complete; changing one that is on refuses."""
    out = _labelled(inputs, tmp_path / "mixup-only", "--mixup", "0.8", "--view-size", str(VIEW))
    result = _label(inputs, out, "--mixup", "0.8", "--mixup-switch", "0.9", "--rand-augment-std", "2",
                    "--view-size", str(VIEW))
    assert result.exit_code == 0 and "(0 written, 2 already complete)" in result.output, result.output
    line = one_line_error(_label(inputs, out, "--mixup", "0.5", "--view-size", str(VIEW)))
    assert "--mixup" in line and "--mixup-switch" not in line


def test_a_bicubic_teachers_views_are_cut_again_bicubic(inputs, tmp_path):
    """The crop is cut with the teacher's interpolation; the stored spec says so and the
    replay cuts with it, so the teacher still finds its labels on the replayed pixels."""
    sidecar = json.loads(inputs["teacher24"].with_suffix(".json").read_text())
    weights = tmp_path / "bicubic.pt"
    shutil.copy(inputs["teacher24"], weights)
    weights.with_suffix(".json").write_text(json.dumps({**sidecar, "interpolation": "bicubic"}))
    out = _labelled({**inputs, "bicubic": weights}, tmp_path / "shards", *DEIT, "--view-size", str(VIEW),
                    teacher="bicubic")
    assert _manifest(out)["augment"]["cut_interpolation"] == "bicubic"
    agreement, total, _ = _replay_agreement(out, weights)
    assert total == 4 * 38 and agreement >= 0.995


def test_inspect_shows_what_a_version_3_set_stores(augmented):
    from deitpipe.pipeline.inspect import inspect_shards

    report = inspect_shards(augmented)
    assert report["ok"] and report["summary"]["augment"]["mixup"] == 0.8
    assert "stored augmentation: RandAugment m9 mstd0.5, erasing 0.25, mixup 0.8, cutmix 1, switch 0.5" in report["text"]
    views = report["sample"]["views"]
    assert "rand_augment" not in views[0] or views[0]["mix"] is None  # the global view changes nothing
    assert any(v["mix"] is not None for v in views[1:])
    assert " mix with " in report["text"]
