"""Progress for long stages: a tqdm bar for people, JSON lines for machines."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class Progress:
    """A counter with rate and ETA, shown as a bar on a terminal and as log lines otherwise.

    Args:
        total: units of work (images, steps).
        desc: bar label.
        unit: what a unit is called.
        enabled: show anything at all.
    """

    def __init__(self, total: int, *, desc: str, unit: str = "img", enabled: bool = True) -> None:
        self.start = time.perf_counter()
        self.done = 0
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0, smoothing=0.1)

    def update(self, n: int, **postfix: Any) -> None:
        self.done += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        self.bar.close()


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed and fsynced, so a killed run keeps what it logged)."""
    import os

    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
