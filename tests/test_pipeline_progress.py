"""Progress: status lines off a terminal, and a clock that starts at the first unit of work."""

from __future__ import annotations

import time

from deitpipe.pipeline.progress import Progress


def test_units_before_a_resume_are_shown_but_not_in_the_rate(capsys):
    bar = Progress(100, desc="train-student", unit="step", every_s=3600)
    time.sleep(0.5)  # a slow start-up is not part of the rate either
    bar.begin(40)
    bar.update(10)
    time.sleep(0.1)
    rate = bar.rate()
    assert bar.done == 50
    # 10 steps in about 0.1 s: not 50 steps (500/s), nor 10 steps since construction (17/s)
    assert 40 < rate <= 100
    bar.close()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("train-student: 50/100 step (50%")
