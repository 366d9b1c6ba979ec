"""bench/gpu_check.py's code paths, run as the device machine runs it but tiny and on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
ROWS = ("s_memory", "s_gpu_loader", "teacher_alone", "s_online", "ti_memory", "ti_gpu_loader",
        "s_cpu_loader", "ti_cpu_loader")
GOALS = ("s_gpu_over_memory", "ti_gpu_over_memory", "offline_speedup_over_ideal",
         "cpu_loader_no_regression_on_cpu_machines")
RATIOS = ("s_gpu_over_memory", "ti_gpu_over_memory", "s_cpu_over_memory", "ti_cpu_over_memory", "offline_img_s",
          "online_img_s", "offline_speedup", "ideal_speedup", "offline_speedup_over_ideal")


def run_check(tmp_path: Path, *args: str) -> tuple[list[dict], list[dict]]:
    """Run the check; returns the JSON lines of stdout and of $OUT/gpu_check.jsonl."""
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--quick", "--device", "cpu", *args],
                          cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    saved = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    return lines, saved


@pytest.mark.slow
def test_quick_cpu_run_reports_every_row_and_the_goals(tmp_path):
    lines, saved = run_check(tmp_path)
    assert saved == lines, "$OUT/gpu_check.jsonl holds what stdout printed"
    assert lines[0]["header"] is True and lines[0]["quick"] is True
    rows = {line["row"]: line for line in lines if "row" in line}
    assert set(rows) == set(ROWS) and len([line for line in lines if "row" in line]) == len(ROWS)
    for name, row in rows.items():
        assert "error" not in row, f"{name}: {row['error']}"
        if "skipped" in row:
            assert row["skipped"].strip(), f"{name} skipped without a reason"
            continue
        assert row["img_s"] > 0 and row["step_ms"] > 0 and row["steps"] >= 1, name
        if name != "teacher_alone":
            assert {"mfu", "achieved_tflops", "compiled", "bf16", "batch", "warmup_s"} <= set(row), name
    for name in ("s_gpu_loader", "ti_gpu_loader", "s_online"):
        if "img_s" in rows[name]:
            assert rows[name]["loader"] == "gpu"
    for name in ("s_cpu_loader", "ti_cpu_loader"):
        if "img_s" in rows[name]:
            assert rows[name]["loader"] == "cpu"
    if "img_s" in rows["s_online"]:
        assert rows["s_online"]["ray_imported"] is False
        assert rows["s_online"]["teacher_labels"] == "none"  # the live teacher labels each batch

    summary = lines[-1]
    assert summary["summary"] is True
    assert set(RATIOS) <= set(summary["ratios"])
    assert [g["name"] for g in summary["goals"]] == list(GOALS)
    assert {g["goal"] for g in summary["goals"][:3]} == {0.9, 0.8}
    assert summary["conditions_met"] is False  # a quick CPU run is not one the goals speak of
    assert set(summary["skipped"]) | {n for n in ROWS if "img_s" in rows[n]} == set(ROWS)
    if "img_s" in rows["s_gpu_loader"] and "img_s" in rows["s_memory"]:
        assert summary["ratios"]["s_gpu_over_memory"] == pytest.approx(
            rows["s_gpu_loader"]["img_s"] / rows["s_memory"]["img_s"], rel=1e-3)
    if all("img_s" in rows[n] for n in ("s_gpu_loader", "teacher_alone", "s_online")):
        t_s, t_t = rows["s_gpu_loader"]["step_ms"], rows["teacher_alone"]["step_ms"]
        assert summary["ratios"]["ideal_speedup"] == pytest.approx((t_s + t_t) / t_s, rel=1e-3)


@pytest.mark.slow
def test_rows_left_out_are_reported_as_skipped(tmp_path):
    lines, _ = run_check(tmp_path, "--rows", "s_memory", "--steps", "1")
    rows = {line["row"]: line for line in lines if "row" in line}
    assert "img_s" in rows["s_memory"]
    assert all(rows[n]["skipped"] == "not selected (--rows)" for n in ROWS if n != "s_memory")
    assert lines[-1]["summary"] is True and lines[-1]["ratios"]["s_gpu_over_memory"] is None


@pytest.mark.slow
def test_rows_past_the_budget_are_skipped_with_the_reason(tmp_path):
    lines, _ = run_check(tmp_path, "--budget-s", "0")
    rows = {line["row"]: line for line in lines if "row" in line}
    assert set(rows) == set(ROWS)
    assert all("skipped" in row and "img_s" not in row for row in rows.values())
    assert "--budget-s" in rows["s_memory"]["skipped"]
    assert set(lines[-1]["skipped"]) == set(ROWS)
