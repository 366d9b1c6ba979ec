"""deitpipe: offline DeiT distillation.

Stage one (``deitpipe.teacher`` + ``deitpipe.shards``) runs a convnet teacher once over a data set
and stores its labels per augmented view in WebDataset shards. Stage two (``deitpipe.student``)
trains DeiT students from those shards without the teacher. ``deitpipe.pipeline`` runs both on Ray.
"""

__version__ = "0.1.0"


def lazy_names(package: str, where: dict[str, str]):
    """Module ``__getattr__`` and ``__dir__`` for ``package`` whose public names load on first use
    (PEP 562): ``where`` maps each name to the submodule that defines it. A subpackage's
    configuration then imports without torch, and the command line starts at once."""
    import importlib

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__
