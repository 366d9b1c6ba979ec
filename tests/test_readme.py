"""README.md cannot drift from the code: its commands parse, its options exist, its Python runs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deitpipe.pipeline.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def _deitpipe_commands() -> list[list[str]]:
    """Each ``deitpipe ...`` line of the README's bash blocks (continuations joined), as argv."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part.split(" #")[0])
                if argv and argv[0] == "deitpipe":
                    commands.append(argv[1:])
    return commands


def test_readme_commands_parse_with_the_commands_options():
    commands = _deitpipe_commands()
    names = {argv[0] for argv in commands}
    assert {"demo", "label-teacher", "inspect", "train-student", "evaluate", "analyze"} <= names
    for argv in commands:
        command = main.commands.get(argv[0])
        assert command is not None, f"README runs 'deitpipe {argv[0]}', which does not exist"
        command.make_context(argv[0], list(argv[1:]))  # unknown options and bad values raise


def test_every_option_the_readme_names_exists():
    options = {opt for command in [main, *main.commands.values()] for p in command.params for opt in p.opts}
    named = set()
    for code in re.findall(r"`([^`\n]+)`", README.read_text()):
        code = re.split(r"\bdeitpipe\b", code)[-1]  # another program's options (torchrun's) come before it
        named.update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code))
    assert named, "the README names no options"
    missing = sorted(n for n in named if n not in options and n != "--help")
    assert not missing, f"README names options no command has: {missing}"


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    snippets = [b for b in _blocks("python") if "create_student" in b]
    assert len(snippets) == 1
    code = snippets[0]
    # The snippet loads the official DeiT-S file by name; the same layout, made here.
    from deitpipe.student import create_student

    official = re.search(r'load_checkpoint\(model, "([^"]+)"\)', code).group(1)
    torch.manual_seed(0)
    reference = create_student("deit_small_distilled_patch16_224", num_classes=1000)
    monkeypatch.chdir(tmp_path)
    torch.save({"model": reference.state_dict()}, official)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    model, tiny = scope["model"], scope["tiny"]
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    assert not model.training  # the snippet ends in eval mode
    x = torch.randn(2, 3, 32, 32)
    tiny.train()
    cls, dist = tiny(x)
    tiny.eval()
    torch.testing.assert_close(tiny(x), (cls + dist) / 2, rtol=1e-5, atol=1e-5)


def test_installed_entry_point_prints_help():
    exe = shutil.which("deitpipe") or str(Path(sys.executable).with_name("deitpipe"))
    if not Path(exe).exists():
        pytest.skip("the deitpipe script is not installed (pip install -e .)")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "label-teacher" in result.stdout and "train-student" in result.stdout
