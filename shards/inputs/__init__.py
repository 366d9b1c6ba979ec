"""Inputs for stage one, one module per kind behind one small interface (``base.Input``).

``folder`` (an ImageFolder tree), ``tars`` (WebDataset tars), ``embedded`` (scikit-learn's
digits, plain or ``cluttered``); ``factory`` picks one by the specification's form. Their
common names are importable from here.
"""

from deitpipe.shards.inputs.base import Candidate, Input, Source
from deitpipe.shards.inputs.factory import INPUTS, read_bytes, resolve_source

__all__ = ["INPUTS", "Candidate", "Input", "Source", "read_bytes", "resolve_source"]
