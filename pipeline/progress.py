"""Progress for long stages: a tqdm bar on a terminal, periodic status lines elsewhere.

Lines, not a bar, where stderr is no terminal, as in a log file. Ray Train workers post their
progress to the driver (``pipeline.launch.follow``), which shows it here.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm


class Progress:
    """A counter with rate and ETA.

    Args:
        total: units of work (images, steps).
        desc: label.
        unit: what a unit is called.
        enabled: show anything at all.
        every_s: seconds between status lines when stderr is no terminal.
    """

    def __init__(self, total: int, *, desc: str, unit: str = "img", enabled: bool = True,
                 every_s: float = 15.0) -> None:
        self.start = self.last = time.perf_counter()
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done, self.skipped, self.postfix, self.enabled = 0, 0, "", enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                            mininterval=1.0, smoothing=0.1)

    def update(self, n: int, **postfix: Any) -> None:
        self.done += n
        if postfix:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.enabled and time.perf_counter() - self.last >= self.every_s:
            self._line()

    def begin(self, done_before: int = 0) -> None:
        """Start the clock now (after a slow start-up), with ``done_before`` units already done by
        an earlier session (a resume): shown, but not counted in the rate."""
        self.start = self.last = time.perf_counter()
        self.done += done_before
        self.skipped += done_before
        if self.bar is not None:
            self.bar.n += done_before
            self.bar.initial += done_before
            self.bar.last_print_n += done_before
            self.bar.start_t = self.bar.last_print_t = time.time()  # tqdm's clock
            self.bar.refresh()

    def rate(self) -> float:
        return (self.done - self.skipped) / max(time.perf_counter() - self.start, 1e-9)

    def _line(self) -> None:
        self.last = time.perf_counter()
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%, "
              f"{rate:.1f} {self.unit}/s, ETA {eta:.0f} s){', ' + self.postfix if self.postfix else ''}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()


class Feed:
    """Moves a :class:`Progress` from (first step of this run, step, info) reports, as the
    training core and Ray's progress board give them."""

    def __init__(self, bar: Progress) -> None:
        self.bar, self.shown = bar, None

    def __call__(self, start: int, step: int, info: dict[str, Any]) -> None:
        if self.shown is None:
            if step <= start:
                return
            self.bar.begin(start)  # the clock starts at the first step; steps before a resume are not this run's rate
            self.shown = start
        if step > self.shown:
            self.bar.update(step - self.shown, **info)
            self.shown = step
