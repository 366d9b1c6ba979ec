"""Command-line options made from the config dataclasses, so each option is declared once.

A config field declared with ``student.config.option`` (default, help, allowed values) becomes
one click option: ``--field-name`` with the field's type and default, a flag for a bool, a
choice for declared choices; the dataclass's own checks then validate what the user gave.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Callable

import click


def config_options(cls: type, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
                   defaults: dict[str, Any] | None = None,
                   helps: dict[str, str] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of the config dataclass ``cls``.

    Args:
        cls: the config dataclass (fields declared with ``student.config.option``).
        only: just these fields, in this order; default every field in declaration order.
        skip: fields left out.
        defaults, helps: per-field replacements of the declared default or help text.
    """
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    # Fields declared without ``option`` (library-only settings) get no command-line option.
    names = [n for n in (only or by_name) if n not in skip and by_name[n].metadata.get("help")]

    def decorate(command: Callable) -> Callable:
        for name in reversed(names):
            f = by_name[name]
            default = (defaults or {}).get(name, f.default if f.default is not MISSING else None)
            command = _option(f, hints[name], default, (helps or {}).get(name, f.metadata.get("help", "")))(command)
        return command

    return decorate


def _option(f, hint: Any, default: Any, help: str) -> Callable:
    meta, base = f.metadata, _base_type(hint)
    flag = meta.get("flag")
    if base is bool:
        if flag and "/" in flag:
            return click.option(flag, f.name, default=default, show_default=True, help=help)
        if flag:  # a flag that turns a default-on field off, e.g. --no-progress
            return click.option(flag, f.name, is_flag=True, flag_value=not default, default=default, help=help)
        return click.option("--" + f.name.replace("_", "-"), f.name, is_flag=True, default=default, help=help)
    if meta.get("multiple"):
        return click.option(flag or "--" + f.name.replace("_", "-"), f.name, type=base, multiple=True,
                            default=(default,) if default is not None else (), show_default=default is not None,
                            help=help, callback=lambda ctx, param, value: value[0] if len(value) == 1 else tuple(value))
    kind = click.Choice([str(c) for c in meta["choices"]]) if meta.get("choices") else base
    off = meta.get("off")
    callback = (lambda ctx, param, value: None if value == off else value) if off is not None else None
    return click.option(flag or "--" + f.name.replace("_", "-"), f.name, type=kind, default=default,
                        show_default=default is not None, help=help, callback=callback)


def _base_type(hint: Any) -> type:
    """``int`` for ``int | None`` and the like."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint
