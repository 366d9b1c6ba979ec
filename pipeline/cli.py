"""The ``deitpipe`` command line: each command builds a config and makes one library call.

Each command imports its library call inside its function, when it runs: torch, timm and Ray load
only then, so ``--help`` and option errors answer at once (the configs import nothing heavy).
"""

from __future__ import annotations

import json
import os
import sys

import click

from deitpipe import __version__
from deitpipe.pipeline.config import DemoConfig, LabelConfig
from deitpipe.pipeline.options import config_options
from deitpipe.student.config import MODEL_FIELDS, TrainConfig
from deitpipe.teacher.config import TeacherTrainConfig


# Errors a user causes (bad input, a full disk, a missing file) are shown as they are; anything
# else is named by its type, so an unexpected failure is still recognisable on one line.
_USER_ERRORS = (ValueError, RuntimeError, OSError)
DEBUG_ENV = "DEITPIPE_DEBUG"


def _debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def one_line_error(exc: BaseException) -> str:
    """The message printed after ``Error:`` for ``exc``: its first non-empty line, prefixed with
    the exception type unless it is a ValueError, RuntimeError or OSError."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if isinstance(exc, _USER_ERRORS):
        return text or type(exc).__name__
    name = type(exc).__name__
    return f"{name}{': ' + text if text else ''} (rerun with --debug for the traceback)"


class _OneLineErrors(click.Group):
    """Every error is printed as one line and exits 1, not a traceback, unless --debug is given
    or DEITPIPE_DEBUG=1 is set; click's own exits (--help, usage errors, Ctrl-C) pass through."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):  # Exit, Abort: RuntimeErrors
            raise
        except Exception as exc:  # noqa: BLE001 - the one boundary where every error becomes a line
            if ctx.params.get("debug") or _debug_from_env():
                raise
            raise click.ClickException(one_line_error(exc)) from exc


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deitpipe")
@click.option("--debug", is_flag=True,
              help=f"Show an error's full traceback instead of one line (also: {DEBUG_ENV}=1).")
def main(debug: bool) -> None:
    """Offline DeiT distillation: label a data set once with a convnet teacher, then train
    DeiT students from the stored labels as often as you like."""


@main.command("label-teacher")
@config_options(LabelConfig)
def label_teacher_cmd(**options) -> None:
    """Stage one: a teacher labels every image and its views into WebDataset shards."""
    from deitpipe.pipeline.label import label_teacher

    result = label_teacher(LabelConfig(**options))
    inputs, run = result["inputs"], result["run"]
    click.echo(
        f"{options['out']}: {inputs['labelled']} labelled, {len(inputs['skipped'])} skipped, "
        f"{inputs['ignored']} ignored of {inputs['found']} found; {len(result['shards'])} shards "
        f"({run['shards_written']} written, {run['shards_skipped']} already complete) in {run['seconds']} s"
    )
    for item in inputs["skipped"][:10]:
        click.echo(f"  skipped {item['path']}: {item['reason']}")


@main.command("train-student")
@config_options(TrainConfig)
def train_student_cmd(**options) -> None:
    """Stage two: train a DeiT student from the shards, with no teacher in the loop."""
    from deitpipe.pipeline.train import train_student

    ctx = click.get_current_context()
    given = {name for name in options if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    result = train_student(TrainConfig(**options), given=given)
    last = result["last"]
    val = "  ".join(f"{k[4:]} {last[k]:.2f}" for k in ("val_top1_cls", "val_top1_dist", "val_top1_avg") if k in last)
    click.echo(f"{result['out']}: {result['epochs_done']} epochs; loss {last.get('loss', float('nan')):.4f}"
               f"{'  val ' + val if val else ''}; weights {result['student']}")


@main.command("evaluate")
@click.option("--checkpoint", required=True, help="student.pt, a run directory, or a DeiT checkpoint file (local or s3://).")
@click.option("--data", default="digits:val", show_default=True,
              help="ImageFolder, label-teacher shards, 'digits:val' or 'cluttered-digits:val'.")
@config_options(TrainConfig, only=MODEL_FIELDS, defaults={"model": None}, helps={
    "model": "Student variant: deit_{tiny,small,base}[_distilled]_patch16_{224,384} (default: the run's "
             "config.json, else deit_tiny_distilled_patch16_224)."})
@click.option("--num-classes", type=int, default=None, help="Head size (default: from the run's config or the weights).")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Batch size.")
@click.option("--strict", is_flag=True,
              help="Stop at the first image that does not decode instead of skipping and listing it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate_cmd(as_json: bool, **options) -> None:
    """Top-1/top-5 of the class head, distillation head and their average."""
    from deitpipe.pipeline.evaluate import evaluate_student, format_table

    result = evaluate_student(**options)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@main.command("analyze")
@click.option("--run", "run_dir", required=True, help="A train-student run directory.")
@click.option("--data", default="digits:val", show_default=True,
              help="Held-out data; label-teacher shards also give agreement with the teacher.")
@click.option("--out", default=None, help="Where analysis.json and the plots go (default: the run directory).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def analyze_cmd(run_dir: str, data: str, out: str | None, as_json: bool) -> None:
    """Token similarity per layer, head agreement with teacher and truth, training curves."""
    from deitpipe.pipeline.analyze import analyze_student, format_report

    report = analyze_student(run=run_dir, data=data, out=out)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@main.command("train-teacher")
@config_options(TeacherTrainConfig)
def train_teacher_cmd(**options) -> None:
    """Train or fine-tune a torchvision teacher; label-teacher --teacher-weights loads the result."""
    from deitpipe.teacher.train import train_teacher

    result = train_teacher(TeacherTrainConfig(**options))
    val = result.get("val_top1")
    click.echo(f"{result['weights']}: train top-1 {result['train_top1']:.2f}"
               f"{f', held-out top-1 {val:.2f}' if val is not None else ''}; sidecar {result['sidecar']}")


@main.command("demo")
@config_options(DemoConfig)
def demo_cmd(**options) -> None:
    """The whole pipeline on embedded digits (cluttered by default): teacher, labels, two students, table."""
    from deitpipe.pipeline.demo import format_results, run_demo

    results = run_demo(DemoConfig(**options))
    click.echo(format_results(results))
    click.echo(f"results: {options['out']}/results.json, plots: {', '.join(results['plots'])}")


@main.command("inspect")
@click.argument("out")
@click.option("--deep", is_flag=True, help="Also decode every sample and check per-view shapes.")
@click.option("--check-teacher", "check_views", type=click.IntRange(min=1), default=None, metavar="N",
              help="Instead of the summary: replay N stored views as train-student's loader does, run the "
                   "manifest's teacher on them and print its agreement with the stored labels; exit 1 below "
                   "99 %.")
@click.option("--teacher-weights", default=None,
              help="With --check-teacher: the teacher's weights file (default: the one label-teacher was given).")
@click.option("--loader", type=click.Choice(["cpu", "gpu"]), default=None,
              help="With --check-teacher: replay with train-student's worker loader (cpu, the default) or its "
                   "batched one (gpu, on --device).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="With --check-teacher: where the teacher and the gpu loader run (default: auto, CUDA when "
                   "there is one).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_cmd(out: str, deep: bool, check_views: int | None, teacher_weights: str | None, loader: str | None,
                device: str | None, as_json: bool) -> None:
    """Summarise a shard directory, verify every shard, and show one sample's labels; or check that the
    stored labels are the teacher's answer on the views train-student replays."""
    from deitpipe.pipeline.inspect import inspect_shards

    if check_views is None:
        given = [name for name, value in (("--teacher-weights", teacher_weights), ("--loader", loader),
                                          ("--device", device)) if value]
        if given:
            raise click.ClickException(f"{given[0]} applies to --check-teacher N; add it or drop {given[0]}")
        report = inspect_shards(out, deep=deep)
    else:
        if deep:
            raise click.ClickException("--deep and --check-teacher are separate checks; run one at a time")
        report = _checked(out, check_views, teacher_weights, loader or "cpu", device or "auto")
    click.echo(json.dumps(report, indent=2) if as_json else report["text"])
    sys.exit(0 if report["ok"] else 1)


def _checked(out: str, views: int, teacher_weights: str | None, loader: str, device: str) -> dict:
    """``check_teacher`` with a progress bar on a terminal."""
    from deitpipe.pipeline.inspect import check_teacher
    from deitpipe.pipeline.progress import Progress

    bar = Progress(views, desc="check-teacher", unit="view", enabled=sys.stderr.isatty())
    try:
        return check_teacher(out, views=views, teacher_weights=teacher_weights, loader=loader, device=device,
                             progress=lambda n: bar.update(n))
    finally:
        bar.close()


if __name__ == "__main__":
    main()
