"""The ``deitpipe`` command line: each command builds a config and makes one library call."""

from __future__ import annotations

import click

from deitpipe import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deitpipe")
def main() -> None:
    """Offline DeiT distillation: label a data set once with a convnet teacher, then train
    DeiT students from the stored labels as often as you like."""


if __name__ == "__main__":
    main()
