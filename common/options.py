"""Config fields declared once: default, help text and allowed values in one place.

Both stages' configs (``deitpipe.student.config.TrainConfig``, ``deitpipe.teacher.config.
TeacherTrainConfig``) and the pipeline's declare their fields with :func:`option`; the command
line's options are made from these declarations (``pipeline/options.py``), and
:func:`check_options` validates them for every caller alike. Imports nothing heavy, so a config
loads without torch.
"""

from __future__ import annotations

import math
from dataclasses import field, fields
from typing import Any


def option(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, open_low: bool = False, open_high: bool = False,
           flag: str | None = None, off: Any = None, multiple: bool = False) -> Any:
    """A config field with what its command-line option needs.

    Args:
        default: the field's default (also the option's).
        help: the option's help text.
        choices: the allowed values (None is always allowed where the default is None).
        low, high: the allowed range; ``open_low``/``open_high`` exclude the bound itself.
        flag: the option's declaration when it is not ``--field-name`` (e.g.
            ``"--resume/--no-resume"``, or ``"--no-progress"`` for a field that a flag turns off).
        off: a command-line value that stands for None (e.g. -1 for "switched off").
        multiple: the option may be given more than once; one value stays a plain value, several
            become a tuple.
    """
    meta = {"help": help, "choices": choices, "low": low, "high": high, "open_low": open_low,
            "open_high": open_high, "flag": flag, "off": off, "multiple": multiple}
    return field(default=default, metadata=meta)


def option_name(f) -> str:
    """The command-line option of a config field, for messages."""
    flag = f.metadata.get("flag")
    return flag.split("/")[0] if flag else "--" + f.name.replace("_", "-")


def check_options(config: Any) -> None:
    """Check every field of ``config`` against its declaration; raise one line naming the option."""
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None or not meta:
            continue
        name = option_name(f)
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ValueError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        low, high = meta.get("low"), meta.get("high")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (low is not None or high is not None):
            below = low is not None and (value <= low if meta["open_low"] else value < low)
            above = high is not None and (value >= high if meta["open_high"] else value > high)
            if below or above or (isinstance(value, float) and math.isnan(value)):
                raise ValueError(f"{name} must be {_range_text(meta)}, got {value}")


def _range_text(meta: dict) -> str:
    low, high = meta["low"], meta["high"]
    if high is None:
        return f"{'>' if meta['open_low'] else '>='} {low:g}"
    if low is None:
        return f"{'<' if meta['open_high'] else '<='} {high:g}"
    return f"in {'(' if meta['open_low'] else '['}{low:g}, {high:g}{')' if meta['open_high'] else ']'}"


__all__ = ["check_options", "option", "option_name"]
