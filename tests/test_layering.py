"""The package's layers, read from the source with ``ast`` (nothing here imports the modules it
checks): which folder may import which, where Ray is imported, and that the imports a module runs
when it is imported form no cycle.

The house: ``shards/`` and ``common/`` at the bottom, ``teacher/`` and ``student/`` on them and
never on each other, ``pipeline/`` on top; only ``pipeline/`` imports Ray, nothing imports it.
Inside ``shards/``: ``storage/`` under ``format/`` under ``inputs/``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("teacher", "student", "shards", "common", "pipeline")


@dataclass(frozen=True)
class Import:
    """One import statement (or ``importlib.import_module("...")`` call) of a module."""

    module: str  # the importing module, e.g. "deitpipe.teacher.train"
    path: str  # its file, relative to the repository root
    line: int
    target: str  # the imported module, e.g. "deitpipe.common.optim" (absolute)
    top_level: bool  # runs when the module is imported (not inside a function, nor TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    """``teacher/train.py`` -> ``deitpipe.teacher.train``; ``common/__init__.py`` -> ``deitpipe.common``."""
    parts = ["deitpipe", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    files = [ROOT / "__init__.py", ROOT / "__main__.py"]
    for folder in FOLDERS:
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if f.is_file()]


MODULES = {module_name(f) for f in source_files()}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_nodes(body: list[ast.stmt]):
    """The statements that run when the module is imported: the module's body, with the bodies of
    its if/try/with/for blocks and class bodies, but not functions nor ``if TYPE_CHECKING:``."""
    for node in body:
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _top_level_nodes(node.body)
            yield from _top_level_nodes(node.orelse)
        elif isinstance(node, ast.ClassDef):
            yield from _top_level_nodes(node.body)
        else:
            for name in ("body", "orelse", "finalbody"):
                yield from _top_level_nodes(getattr(node, name, []) or [])
            for handler in getattr(node, "handlers", []) or []:
                yield from _top_level_nodes(handler.body)


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The modules ``node`` imports, absolute; ``from pkg import sub`` names the submodule."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolved against the importing module's package
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
        named = [alias.name for alias in node.names if f"{base}.{alias.name}" not in MODULES]
        return subs + ([base] if named or not subs else [])
    if isinstance(node, ast.Call):  # importlib.import_module("deitpipe.x") / __import__("x")
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def imports_of(path: Path) -> list[Import]:
    """Every import in the file at ``path``, marked whether it runs at import time."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module, is_package = module_name(path), path.name == "__init__.py"
    top = {id(node) for stmt in _top_level_nodes(tree.body) for node in _own_nodes(stmt)}
    rel = str(path.relative_to(ROOT))
    return [Import(module, rel, node.lineno, target, id(node) in top)
            for node in ast.walk(tree) for target in _targets(node, module, is_package)]


def _own_nodes(stmt: ast.stmt):
    """The nodes of ``stmt`` itself, not of the blocks nested in it (those are listed on their own)."""
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        yield stmt
    elif isinstance(stmt, (ast.Expr, ast.Assign, ast.AnnAssign)):
        # import_module(...) calls in expressions that run at import time
        yield from (n for n in ast.walk(stmt) if isinstance(n, ast.Call))


IMPORTS = [imp for f in source_files() for imp in imports_of(f)]


def _in(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    """The imports anywhere in ``folder`` (any form, at any depth) of a forbidden package."""
    return [str(i) for i in IMPORTS
            if i.path.startswith(folder + "/") and any(_in(i.target, f) for f in forbidden)]


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("teacher", ("deitpipe.student", "deitpipe.pipeline")),
    ("student", ("deitpipe.teacher", "deitpipe.pipeline")),
    ("shards", ("deitpipe.teacher", "deitpipe.student", "deitpipe.pipeline", "deitpipe.common")),
    ("common", ("deitpipe.teacher", "deitpipe.student", "deitpipe.pipeline")),
])
def test_each_layer_imports_only_the_layers_below_it(folder, forbidden):
    assert violations(folder, forbidden) == []


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("shards/storage", ("deitpipe.shards.format", "deitpipe.shards.inputs")),
    ("shards/format", ("deitpipe.shards.inputs",)),
])
def test_the_shards_rooms_stand_on_each_other_one_way(folder, forbidden):
    # storage knows bytes, the format knows shards, the inputs may use both.
    assert violations(folder, forbidden) == []


@pytest.mark.parametrize("folder", ["teacher", "student", "shards", "common"])
def test_only_pipeline_imports_ray(folder):
    assert violations(folder, ("ray",)) == []


def test_the_checks_see_every_form_of_import():
    # The parser's own cases: relative imports resolve, submodules are named, strings count.
    def targets(code: str, module: str = "deitpipe.teacher.train", is_package: bool = False) -> list[str]:
        return [t for node in ast.walk(ast.parse(code)) for t in _targets(node, module, is_package)]

    assert targets("from ..student import optim") == ["deitpipe.student.optim"]
    assert targets("from ..student.optim import build_optimizer") == ["deitpipe.student.optim"]
    assert targets("from . import predict") == ["deitpipe.teacher.predict"]
    assert targets("from .. import student", module="deitpipe.teacher", is_package=True) == ["deitpipe.student"]
    assert targets("import deitpipe.student.optim as o") == ["deitpipe.student.optim"]
    assert targets("importlib.import_module('deitpipe.student.loss')") == ["deitpipe.student.loss"]
    assert targets("from deitpipe.teacher import build_teacher") == ["deitpipe.teacher"]
    # What runs at import time: module level, not a function's body nor an ``if TYPE_CHECKING:``.
    code = ("import a\nif TYPE_CHECKING:\n    import b\nelse:\n    import c\ntry:\n    import d\n"
            "except ImportError:\n    import e\ndef f():\n    import g\nclass K:\n    import h\n")
    tree = ast.parse(code)
    top = {id(n) for stmt in _top_level_nodes(tree.body) for n in _own_nodes(stmt)}
    assert sorted(t for node in ast.walk(tree) if id(node) in top for t in _targets(node, "m", False)) == [
        "a", "c", "d", "e", "h"]


def module_graph(*, top_level: bool) -> dict[str, set[str]]:
    """``module -> modules of this package it imports`` (only those run at import time if ``top_level``)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        if i.target in MODULES and i.target != i.module and (i.top_level or not top_level):
            graph[i.module].add(i.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_module_level_imports_form_no_cycle():
    assert cycles(module_graph(top_level=True)) == []


def test_the_shards_modules_import_each_other_one_way_even_inside_functions():
    graph = {m: {t for t in targets if _in(t, "deitpipe.shards")}
             for m, targets in module_graph(top_level=False).items() if _in(m, "deitpipe.shards")}
    assert cycles(graph) == []


def test_shared_names_are_the_same_objects_under_both_names():
    # The student's modules keep their names for what moved to common/: one object, two names.
    from deitpipe.common import optim, options, weights
    from deitpipe.student import checkpoint, config
    from deitpipe.student import optim as student_optim

    for name in student_optim.__all__:
        assert getattr(student_optim, name) is getattr(optim, name), name
    assert checkpoint.read_state_dict is weights.read_state_dict
    assert (config.option, config.check_options, config.option_name) == (
        options.option, options.check_options, options.option_name)
