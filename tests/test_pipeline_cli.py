"""The command line: commands listed, one-line errors, inspect's exit code."""

from __future__ import annotations

import json

from click.testing import CliRunner

from deitpipe import __version__
from deitpipe.pipeline.cli import main
from deitpipe.shards import schema


def _run(*args):
    return CliRunner().invoke(main, list(args))


def test_version_and_commands():
    assert _run("--version").output.strip().endswith(__version__)
    out = _run("--help").output
    for command in ("label-teacher", "train-student", "evaluate", "inspect", "train-teacher", "demo", "analyze"):
        assert command in out


def test_every_command_help_exits_zero():
    for name in main.commands:
        result = _run(name, "--help")
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output and "Error" not in result.output


def test_every_option_has_help():
    for name, command in main.commands.items():
        for param in command.params:
            if param.param_type_name == "option" and param.name not in ("help",):
                assert param.help, f"{name} {param.opts} has no help text"


def test_user_errors_are_one_line(tmp_path):
    result = _run("label-teacher", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope" in lines[0] and lines[0].startswith("Error:")
    result = _run("label-teacher", "--views", "-1")
    assert result.exit_code != 0 and "--views must be >= 0" in result.output
    result = _run("train-student", "--shards", str(tmp_path), "--out", str(tmp_path / "s"))
    assert result.exit_code == 1 and "manifest" in result.output.lower()
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_inspect_verifies_and_fails_on_corruption(tmp_path, shard_set_writer):
    out = tmp_path / "shards"
    shard_set_writer(out, num_samples=5, shard_size=3)
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    manifest.update(complete=True, teacher={"name": "resnet18"}, class_names=[str(i) for i in range(10)],
                    inputs={"found": 5, "labelled": 5, "skipped": [], "ignored": 0})
    (out / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    ok = _run("inspect", str(out))
    assert ok.exit_code == 0, ok.output
    assert "OK: every shard verifies" in ok.output and "s000000000" in ok.output
    data = bytearray((out / "shard-000001.tar").read_bytes())
    data[700] ^= 0xFF
    (out / "shard-000001.tar").write_bytes(bytes(data))
    bad = _run("inspect", str(out))
    assert bad.exit_code == 1 and "sha256" in bad.output
