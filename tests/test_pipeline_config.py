"""TrainConfig: defaults that fit short runs, and one-line errors for bad values."""

from __future__ import annotations

import re

import pytest

from deitpipe.pipeline.config import TrainConfig


@pytest.mark.parametrize(("epochs", "warmup"), [(300, 5.0), (50, 5.0), (20, 2.0), (3, 0.3)])
def test_default_warmup_is_deits_five_or_a_tenth_of_a_short_run(epochs, warmup):
    assert TrainConfig(epochs=epochs).warmup_epochs == pytest.approx(warmup)


def test_an_explicit_warmup_is_kept_and_checked():
    assert TrainConfig(epochs=3, warmup_epochs=1).warmup_epochs == 1
    with pytest.raises(ValueError, match=r"--warmup-epochs must be in \[0, --epochs=3\]"):
        TrainConfig(epochs=3, warmup_epochs=5)


@pytest.mark.parametrize(("kw", "option"), [(dict(rand_augment=11), "--rand-augment"),
                                            (dict(rand_augment_std=-1), "--rand-augment-std"),
                                            (dict(alpha=1.5), "--alpha")])
def test_out_of_range_values_name_their_option(kw, option):
    with pytest.raises(ValueError, match=option) as err:
        TrainConfig(**kw)
    assert "\n" not in str(err.value)


def test_loader_workers_default_to_none_on_cpus_and_all_but_one_cpu_with_a_gpu():
    from deitpipe.student.trainer import default_loader_workers

    assert TrainConfig().loader_workers is None
    assert default_loader_workers("cpu", 8) == 0
    assert default_loader_workers("cuda", 8) == 7
    assert default_loader_workers("cuda", 1) == 1
    with pytest.raises(ValueError, match="--loader-workers must be >= 0"):
        TrainConfig(loader_workers=-1)


@pytest.mark.parametrize(("command", "cls"), [("train-student", "TrainConfig"), ("label-teacher", "LabelConfig"),
                                              ("train-teacher", "TeacherTrainConfig"), ("demo", "DemoConfig")])
def test_each_option_is_its_config_field(command, cls):
    # One declaration: every declared field is an option with the field's default and help, and
    # nothing else is (library-only fields carry no declaration).
    import dataclasses

    from deitpipe.pipeline import config as config_module
    from deitpipe.pipeline.cli import main
    from deitpipe.teacher import config as teacher_config

    config = getattr(config_module, cls, None) or getattr(teacher_config, cls)
    declared = [f for f in dataclasses.fields(config) if f.metadata.get("help")]
    params = {p.name: p for p in main.commands[command].params if p.name != "help"}
    assert set(params) == {f.name for f in declared}
    for f in declared:
        default = (f.default,) if f.metadata.get("multiple") else f.default  # given once or more
        assert params[f.name].default == default, f.name
        assert params[f.name].help == f.metadata["help"], f.name


def test_options_reach_the_config_with_their_conversions():
    from deitpipe.pipeline.cli import main

    ctx = main.commands["train-student"].make_context("train-student", ["--rand-augment", "-1", "--no-progress",
                                                                        "--no-resume", "--launcher", "local"])
    config = TrainConfig(**ctx.params)
    assert (config.rand_augment, config.progress, config.resume, config.launcher) == (None, False, False, "local")
    assert TrainConfig(**main.commands["train-student"].make_context("train-student", []).params) == TrainConfig()


@pytest.mark.parametrize(("kw", "message"), [(dict(drop_path=1.0), "--drop-path must be in [0, 1)"),
                                             (dict(lr=0), "--lr must be > 0"),
                                             (dict(launcher="slurm"), "--launcher must be one of local"),
                                             (dict(progress=True, epochs=0), "--epochs must be >= 1")])
def test_declared_ranges_give_one_line_naming_the_option(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**kw)
