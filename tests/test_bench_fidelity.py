"""bench/fidelity.py's statistics: differences, their standard errors, the markdown table."""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "fidelity.py"


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("bench_fidelity", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs(scores, epochs=3):
    return [{"top1": s, "curve": [s - 2 * (epochs - 1 - e) for e in range(epochs)], "seconds": 1.0} for s in scores]


def test_differences_are_paired_by_seed_and_unpaired(fidelity):
    a, b = [60.0, 62.0, 58.0, 61.0, 59.0], [50.0, 53.0, 47.0, 52.0, 48.0]
    d = fidelity._diff(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    assert d["mean"] == pytest.approx(10.0)
    assert d["se_paired"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(5))
    assert d["se_unpaired"] == pytest.approx(math.sqrt((statistics.variance(a) + statistics.variance(b)) / 5))
    assert d["se_paired"] < d["se_unpaired"]  # seeds move both rows together here


def test_each_row_is_compared_with_its_baseline_and_few_labels_with_the_ceiling(fidelity):
    results = {"no distillation": runs([50, 52, 48]), "stored views, hard": runs([60, 61, 59]),
               "live teacher, hard": runs([62, 60, 61]), "K labels alone": runs([20, 25, 21]),
               "K labels + teacher on the rest, hard": runs([40, 44, 42])}
    table = fidelity.summarise(results)
    assert "vs_baseline" not in table["no distillation"] and "vs_baseline" not in table["K labels alone"]
    assert table["stored views, hard"]["vs_baseline"]["mean"] == pytest.approx(10.0)
    assert table["live teacher, hard"]["vs_baseline"]["row"] == "no distillation"
    few = table["K labels + teacher on the rest, hard"]
    assert few["vs_baseline"]["row"] == "K labels alone" and few["vs_baseline"]["mean"] == pytest.approx(20.0)
    assert few["vs_ceiling"]["mean"] == pytest.approx(-8.0)  # below the student with every label
    assert "vs_ceiling" not in table["stored views, hard"]
    assert table["no distillation"]["curve"] == [46.0, 48.0, 50.0]  # mean over seeds, per epoch
    text = fidelity.markdown(table, [0, 1, 2])
    assert text.count("\n") == len(results) + 1
    assert "| stored views, hard | 60.00 | 61.00 | 59.00 | 60.00 ± 1.00 | +10.00 (" in text


def test_a_row_missing_seeds_gets_no_difference(fidelity):
    table = fidelity.summarise({"no distillation": runs([50, 52]), "stored views, hard": runs([60, 61, 59])})
    assert "vs_baseline" not in table["stored views, hard"]


def test_curves_table_samples_the_mean_curve_up_to_the_last_epoch(fidelity):
    table = fidelity.summarise({"no distillation": runs([50, 52, 48], epochs=20),
                                "stored views, hard": runs([60, 61, 59], epochs=20)})
    lines = fidelity.curves_markdown(table, points=4).splitlines()
    assert lines[0] == "| student | ep 5 | ep 10 | ep 15 | ep 20 |"
    # the mean curve ends at the row's mean and climbs 2 points an epoch
    assert lines[2] == "| no distillation | 20.0 | 30.0 | 40.0 | 50.0 |"
    assert lines[3].endswith("| 60.0 |")


def test_the_stored_augmentation_row_is_read_against_its_baseline_and_the_other_teachers(fidelity):
    results = {"no distillation": runs([50, 52, 48]), "no distillation, DeiT augmentation": runs([20, 22, 18]),
               "stored views, hard": runs([51, 53, 49]), "stored views + augmentation, hard": runs([30, 33, 28])}
    table = fidelity.summarise(results)
    row = table["stored views + augmentation, hard"]
    base = row["vs_baseline"]  # the same inputs without a teacher
    assert base["row"] == "no distillation, DeiT augmentation" and base["mean"] == pytest.approx(10.33, abs=0.01)
    others = {d["row"]: d["mean"] for d in row["vs_others"]}
    assert others == pytest.approx({"stored views, hard": -20.67, "no distillation": -19.67},
                                   abs=0.01)  # the live rows are missing: not compared
    text = fidelity.markdown(table, [0, 1, 2])
    assert "stored views + augmentation, hard − stored views, hard: -20.67 (paired SE" in text
