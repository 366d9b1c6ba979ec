"""The ``deitpipe`` command line: each command builds a config and makes one library call."""

from __future__ import annotations

import json
import sys

import click

from deitpipe import __version__


class _OneLineErrors(click.Group):
    """Errors a user can cause are printed as one line, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            if isinstance(exc, click.ClickException):
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise click.ClickException(message) from exc


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deitpipe")
def main() -> None:
    """Offline DeiT distillation: label a data set once with a convnet teacher, then train
    DeiT students from the stored labels as often as you like."""


@main.command("label-teacher")
@click.option("--data", default="digits", show_default=True,
              help="Input: 'digits' (embedded), 'digits:train', an ImageFolder directory, or "
                   "WebDataset tars as a brace pattern (local, pipe: or s3://).")
@click.option("--out", default="shards-out", show_default=True, help="Output directory for shards and manifest.json.")
@click.option("--teacher", default="regnet_y_16gf", show_default=True, help="torchvision classification model name.")
@click.option("--teacher-weights", default=None, help="Local weights file (state dict or checkpoint); "
              "default: torchvision's weights from the torch hub cache.")
@click.option("--num-classes", type=int, default=None, help="Teacher head size (default: from the weights).")
@click.option("--views", type=int, default=8, show_default=True,
              help="Random RandomResizedCrop views per image, stored besides the global view; 0 = global only.")
@click.option("--topk", type=int, default=10, show_default=True, help="Stored top-k of each view's softmax.")
@click.option("--full-softmax", is_flag=True, help="Also store each view's full softmax (float16).")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Samples per shard.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Views per teacher forward pass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the view boxes.")
@click.option("--image-size", type=int, default=32, show_default=True, help="Size digits are scaled to.")
@click.option("--resize", type=int, default=None, help="Override the teacher's resize (short side).")
@click.option("--crop", type=int, default=None, help="Override the teacher's input (crop) size.")
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]), default=None,
              help="Override the teacher's interpolation.")
@click.option("--ray-address", default=None, help="Join this Ray cluster ('auto' or host:port); default: a local Ray.")
@click.option("--num-actors", type=int, default=None, help="Teacher actors (default: one per GPU, or one).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Where the teacher runs.")
@click.option("--strict", is_flag=True, help="Fail on the first undecodable input instead of skipping it.")
@click.option("--overwrite", is_flag=True, help="Replace an output made with other arguments.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def label_teacher_cmd(no_progress: bool, **options) -> None:
    """Stage one: a teacher labels every image and its views into WebDataset shards."""
    from deitpipe.pipeline.config import LabelConfig
    from deitpipe.pipeline.label import label_teacher

    result = label_teacher(LabelConfig(progress=not no_progress, **options))
    inputs, run = result["inputs"], result["run"]
    click.echo(
        f"{options['out']}: {inputs['labelled']} labelled, {len(inputs['skipped'])} skipped, "
        f"{inputs['ignored']} ignored of {inputs['found']} found; {len(result['shards'])} shards "
        f"({run['shards_written']} written, {run['shards_skipped']} already complete) in {run['seconds']} s"
    )
    for item in inputs["skipped"][:10]:
        click.echo(f"  skipped {item['path']}: {item['reason']}")


@main.command("inspect")
@click.argument("out")
@click.option("--deep", is_flag=True, help="Also decode every sample and check per-view shapes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_cmd(out: str, deep: bool, as_json: bool) -> None:
    """Summarise a shard directory, verify every shard, and show one sample's labels."""
    from deitpipe.pipeline.inspect import inspect_shards

    report = inspect_shards(out, deep=deep)
    click.echo(json.dumps(report, indent=2) if as_json else report["text"])
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
