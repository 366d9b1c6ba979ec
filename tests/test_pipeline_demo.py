"""The demo's settings per data set, its guard against mixing data sets in one output, its table."""

import json

import pytest

from deitpipe.pipeline.config import DEMO_DEFAULTS, DemoConfig
from deitpipe.pipeline.demo import _check_same_data, format_results, rows, student_config
from deitpipe.shards.inputs.embedded import digits_image_folder


def test_demo_runs_on_cluttered_digits_by_default_with_its_settings():
    config = DemoConfig()
    assert config.data == "cluttered-digits"
    for name, value in DEMO_DEFAULTS["cluttered-digits"].items():
        assert getattr(config, name) == value


def test_plain_digits_stay_available_with_their_own_settings_and_overrides_win():
    config = DemoConfig(data="digits", student_epochs=3)
    assert config.student_epochs == 3
    assert config.teacher_epochs == DEMO_DEFAULTS["digits"]["teacher_epochs"]
    assert config.patch_size == DEMO_DEFAULTS["digits"]["patch_size"]
    with pytest.raises(ValueError, match="--data must be one of"):
        DemoConfig(data="mnist")


def test_student_follows_the_data_sets_patch_and_input_size(tmp_path):
    for data in DEMO_DEFAULTS:
        cfg = student_config(DemoConfig(data=data), shards=tmp_path, out=tmp_path, val=tmp_path, distillation="hard")
        assert cfg.patch_size == DEMO_DEFAULTS[data]["patch_size"] and cfg.teacher_labels == "views"
        # label-teacher cuts the views at the student's size, so a stored view is its input
        assert cfg.img_size == DEMO_DEFAULTS[data]["student_size"] and cfg.img_size % cfg.patch_size == 0
        assert cfg.epochs == DEMO_DEFAULTS[data]["student_epochs"]


def test_rows_compare_each_distilled_student_with_its_baseline_at_equal_steps():
    table = {r.key: r for r in rows(DemoConfig())}
    assert table["distilled"].baseline == "none" and table["few_teacher"].baseline == "few"
    assert table["distilled"].distillation == "soft"  # the same-data row the fidelity table establishes
    few, both = table["few"], table["few_teacher"]
    assert few.shards == both.shards[:1] and few.distillation == "none" and both.distillation == "hard"
    assert 20 * few.epoch_repeats == 1200  # K=2: 20 images passed 60 times an epoch, as many steps as 1,200
    assert [r.key for r in rows(DemoConfig(labels_per_class=0))] == ["none", "distilled"]


def test_an_output_of_one_data_set_is_not_resumed_as_another(tmp_path):
    digits_image_folder(tmp_path / "data", image_size=8, kind="digits")
    _check_same_data(tmp_path, "digits")  # the same data set: resumes
    with pytest.raises(ValueError, match="holds a demo run on digits"):
        _check_same_data(tmp_path, "cluttered-digits")
    _check_same_data(tmp_path / "fresh", "cluttered-digits")  # nothing there yet


def test_table_names_the_data_set_and_each_rows_gain():
    evals = {name: {"top1_avg": top1, "top1_cls": 49.0, "top1_dist": 51.0, "n": 597}
             for name, top1 in (("none", 40.0), ("distilled", 42.5), ("few", 20.0), ("few_teacher", 38.0))}
    names = {"none": "every label, no distillation", "distilled": "every label + stored views (hard)",
             "few": "10 labels a class alone", "few_teacher": "10 labels a class + teacher on the rest"}
    base = {"distilled": "none", "few_teacher": "few"}
    table = [{"name": names[k], "top1": e["top1_avg"], "baseline": names.get(base.get(k)), "seconds": 1.0}
             for k, e in evals.items()]
    text = format_results({"teacher_top1": 90.0, "students": evals, "rows": table, "held_out_images": 597,
                           "seconds": 1.0, "stage_seconds": {},
                           "config": json.loads(json.dumps({"data": "cluttered-digits"}))})
    assert "597 images of cluttered-digits" in text
    line = next(x for x in text.splitlines() if "teacher on the rest" in x)
    assert "+18.00" in line and line.rstrip().endswith("10 labels a class alone")
    assert "+2.50" in next(x for x in text.splitlines() if "stored views" in x)
