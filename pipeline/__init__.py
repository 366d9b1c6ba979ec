"""Orchestration of both stages on Ray, configuration, and the ``deitpipe`` command line."""
