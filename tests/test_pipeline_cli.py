"""The command line: commands listed, one-line errors, inspect's exit code."""

from __future__ import annotations

import json
import tarfile

import pytest
from click.testing import CliRunner

from deitpipe import __version__
from deitpipe.pipeline.cli import main
from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import write_manifest
from deitpipe.shards.format.writer import ShardFileWriter, encode_sample


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


UNEXPECTED = [
    (OSError(28, "No space left on device"), "No space left on device"),
    (MemoryError(), "MemoryError"),
    (KeyError("x"), "KeyError: 'x'"),
    (TypeError("bad"), "TypeError: bad"),
    (StopIteration(), "StopIteration"),
    (tarfile.ReadError("file could not be opened successfully"), "ReadError: file could not be opened"),
]


def _failing_inspect(monkeypatch, exc):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr("deitpipe.pipeline.inspect.inspect_shards", fail)


@pytest.mark.parametrize("exc, text", UNEXPECTED, ids=[type(e).__name__ for e, _ in UNEXPECTED])
def test_any_error_is_one_line(monkeypatch, tmp_path, exc, text):
    monkeypatch.delenv("DEITPIPE_DEBUG", raising=False)
    _failing_inspect(monkeypatch, exc)
    result = _run("inspect", str(tmp_path))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and text in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("exc", [e for e, _ in UNEXPECTED], ids=[type(e).__name__ for e, _ in UNEXPECTED])
def test_debug_flag_and_env_show_the_original_exception(monkeypatch, tmp_path, exc):
    _failing_inspect(monkeypatch, exc)
    monkeypatch.delenv("DEITPIPE_DEBUG", raising=False)
    flagged = _run("--debug", "inspect", str(tmp_path))
    assert flagged.exception is exc and "Error:" not in flagged.output
    from_env = CliRunner().invoke(main, ["inspect", str(tmp_path)], env={"DEITPIPE_DEBUG": "1"})
    assert from_env.exception is exc and "Error:" not in from_env.output
    off = CliRunner().invoke(main, ["inspect", str(tmp_path)], env={"DEITPIPE_DEBUG": "0"})
    assert off.exit_code == 1 and off.output.startswith("Error:")


def test_debug_is_documented():
    assert "--debug" in _run("--help").output and "DEITPIPE_DEBUG" in _run("--help").output


def _shard_set_with_empty_shards(out, sample_maker, counts):
    entries, index = [], 0
    for s, count in enumerate(counts):
        with ShardFileWriter(out, schema.shard_name(s)) as w:
            for _ in range(count):
                w.write(encode_sample(**sample_maker(index)))
                index += 1
        entries.append({**w.record(), "first_index": index - count})
    write_manifest(out, {"num_classes": 10, "views": 2, "topk": 3, "full_softmax": False, "shards": entries,
                         "complete": True, "teacher": {"name": "resnet18"},
                         "inputs": {"found": index, "labelled": index, "skipped": [], "ignored": 0}})


def test_inspect_reads_the_first_shard_that_holds_a_sample(tmp_path, sample_maker):
    out = tmp_path / "shards"
    _shard_set_with_empty_shards(out, sample_maker, [0, 2])
    result = _run("inspect", str(out))
    assert result.exit_code == 0, result.output
    assert "sample s000000000" in result.output and "OK: every shard verifies" in result.output


def test_inspect_without_any_sample_is_not_ok(tmp_path, sample_maker):
    out = tmp_path / "shards"
    _shard_set_with_empty_shards(out, sample_maker, [0, 0])
    result = _run("inspect", str(out), "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert not report["ok"] and report["sample"] is None and "no samples" in report["problems"][0]


def test_the_command_line_starts_without_importing_torch():
    # --help and argument errors answer at once: torch, timm and Ray load only when a command runs.
    import subprocess
    import sys

    code = "import sys, deitpipe.pipeline.cli; print(sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
