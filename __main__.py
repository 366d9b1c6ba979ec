"""``python -m deitpipe``: the command line, as torchrun starts it (``torchrun ... -m deitpipe``)."""

from deitpipe.pipeline.cli import main

main(prog_name="deitpipe")
