"""Stage two, orchestrated: check the shards and the options on the driver, prepare the run
directory, and hand the run to a launcher (``pipeline/launch.py``: this process, torchrun or Ray
Train), which runs the training core (``student.trainer``) on every worker.

``OUT`` holds ``student.pt`` (a plain state dict timm loads), ``config.json``, ``metrics.jsonl``
and the checkpoints (``OUT/checkpoints`` for the local and torchrun launchers, ``OUT/ray`` for
Ray Train); rerunning the same command resumes from the newest, whichever launcher wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from typing import Any


from deitpipe import __version__
from deitpipe.pipeline.config import TrainConfig
from deitpipe.pipeline.launch import TrainError, launch
from deitpipe.pipeline.outdir import Marker, remove_files, remove_ray_storage, temp_leftovers
from deitpipe.shards import storage
from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import read_manifest_digest, write_json_atomic
from deitpipe.shards.format.reader import expand_urls, is_object_dir, is_remote, shard_name
from deitpipe.student import create_student, load_checkpoint
from deitpipe.student.heldout import eval_items
from deitpipe.student.runfiles import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    checkpoint_files,
    heads_differ,
    load_state,
    ray_checkpoint_files,
    read_metrics,
)

__all__ = ["TrainError", "shard_info", "shard_sets_info", "teacher_labels_mode", "train_student", "check_inputs"]


def shard_info(spec: str, manifest: str | None = None) -> dict[str, Any]:
    """Read and check the manifest of ``spec`` (a directory, or a pattern inside one).

    Args:
        spec: shard directory, or brace pattern (local, ``s3://``, ``http(s)://``, ``pipe:``).
        manifest: the manifest's path or URL; default: ``manifest.json`` beside the shards
            (required for ``pipe:`` commands, whose files deitpipe cannot locate).

    Returns:
        ``{"urls", "num_classes", "class_names", "views", "samples", "teacher", "manifest",
        "manifest_sha256", "sha256"}``; "sha256" maps each URL to the digest its reader checks.
    """
    where = manifest or _manifest_beside(spec)
    data, digest = read_manifest_digest(where)  # one line on a missing manifest or another schema version
    if not data.get("complete", False):
        inputs = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
        if inputs.get("labelled") == 0 and inputs.get("found"):
            first = (inputs.get("skipped") or [{}])[0]
            why = f" (first: {first.get('path')}: {first.get('reason')})" if first.get("path") else ""
            raise TrainError(f"{where}: label-teacher could label none of its {inputs['found']} inputs{why}; "
                             "fix or replace the inputs and relabel")
        raise TrainError(f"{where}: label-teacher has not finished; rerun it with the same arguments first")
    if not data.get("teacher", {}).get("name"):
        raise TrainError(f"{where}: the manifest records no teacher")
    listed = {s["name"]: s["samples"] for s in data["shards"]}
    digests = {s["name"]: s["sha256"] for s in data["shards"] if s.get("sha256")}
    urls = expand_urls(spec)
    unknown = [u for u in urls if shard_name(u) not in listed]
    if unknown:
        raise TrainError(f"{unknown[0]} is not listed in {where}")
    samples = sum(listed[shard_name(u)] for u in urls)
    if samples == 0:
        raise TrainError(f"{where}: the shards hold no samples; relabel with inputs that decode")
    unlabeled = {s["name"]: s.get("unlabeled", 0) for s in data["shards"]}
    return {"urls": urls, "num_classes": int(data["num_classes"]), "class_names": data["class_names"],
            "views": int(data["views"]), "teacher": data["teacher"], "samples": samples, "manifest": where,
            "manifest_sha256": digest, "schema_version": data.get("schema_version"), "augment": data.get("augment"),
            "unlabeled": sum(unlabeled[shard_name(u)] for u in urls),
            "sha256": {u: digests[shard_name(u)] for u in urls if shard_name(u) in digests}}


def shard_sets_info(specs: tuple[str, ...], manifest: str | None = None) -> dict[str, Any]:
    """:func:`shard_info` of one or more shard sets, merged into one: their shards together, in
    each set's order; refused in one line unless the sets agree on the classes and the teacher.

    Returns:
        :func:`shard_info`'s keys; "manifest" and "manifest_sha256" name every set (the digest of
        several is the sha256 of theirs, in order), and "views" is the fewest a set stores.
    """
    infos = [shard_info(spec, manifest) for spec in specs]
    if len(infos) == 1:
        return infos[0]
    first = infos[0]
    for other in infos[1:]:
        for key, what in (("num_classes", "class count"), ("class_names", "class names"),
                          ("schema_version", "schema version"), ("augment", "stored augmentation")):
            if other[key] != first[key]:
                raise TrainError(f"--shards {other['manifest']} and {first['manifest']} differ in their {what}; "
                                 "train on sets labelled for the same classes")
        teacher = ("name", "weights_sha256", "preprocessing")
        if any(other["teacher"].get(k) != first["teacher"].get(k) for k in teacher):
            raise TrainError(f"--shards {other['manifest']} and {first['manifest']} were labelled by different "
                             "teachers; label every set with the same teacher and weights")
    urls = [u for info in infos for u in info["urls"]]
    if len(set(urls)) != len(urls):
        raise TrainError("--shards names one shard set more than once; give each set once")
    joined = hashlib.sha256("".join(info["manifest_sha256"] for info in infos).encode()).hexdigest()
    return {**first, "urls": urls, "samples": sum(i["samples"] for i in infos),
            "views": min(i["views"] for i in infos), "unlabeled": sum(i["unlabeled"] for i in infos),
            "manifest": " + ".join(i["manifest"] for i in infos), "manifest_sha256": joined,
            "sha256": {u: d for i in infos for u, d in i["sha256"].items()}}


def _manifest_beside(spec: str) -> str:
    if os.path.isdir(spec) or is_object_dir(spec):
        return spec
    if spec.startswith("pipe:"):
        raise TrainError(f"--shards {spec}: a pipe: command has no place beside it; pass --manifest PATH "
                         f"(the {schema.MANIFEST_NAME} label-teacher wrote)")
    head = spec.split("{")[0]
    folder = head.rsplit("/", 1)[0] if "/" in head else "."
    return f"{folder}/{schema.MANIFEST_NAME}" if is_remote(spec) else folder


RECIPE_AUGMENT = {"rand_augment": None, "random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0}  # field -> off


def stored_augment_defaults(config: TrainConfig, given: set[str], *, stored: dict[str, Any] | None) -> TrainConfig:
    """On shards that store each view's augmentation, the student's own RandAugment, erasing,
    mixup and CutMix are off unless ``given`` (named on the command line): the stored views
    already carry DeiT's recipe, and more of it on top would no longer be what the teacher saw.

    Args:
        config: train-student's configuration, as the command line built it.
        given: the fields the user set.
        stored: the shard sets' "augment" (``shard_sets_info``), None where they store none.
    Returns:
        ``config``, with the recipe's fields not in ``given`` switched off where the shards are
        replayed with their stored augmentation.
    """
    off = {k: v for k, v in RECIPE_AUGMENT.items() if k not in given}
    if not stored or not off or config.distillation == "none" or config.online_teacher \
            or config.teacher_labels == "global":
        return config
    return replace(config, **off)


def teacher_labels_mode(config: TrainConfig, views: int) -> str:
    """The loader's label mode: stored views, global labels (fixed teacher), or none."""
    if config.distillation == "none" or config.online_teacher:
        return "none"
    mode = config.teacher_labels or ("views" if views > 0 else "global")
    if mode == "views" and views == 0:
        raise TrainError("--teacher-labels views: the shards hold no views (label-teacher --views 0); "
                         "use --teacher-labels global or relabel with --views N")
    return mode


def train_student(config: TrainConfig, *, given: set[str] | None = None) -> dict[str, Any]:
    """Train a student as ``config`` says; returns the last epoch's metrics and the run's paths.

    ``given``: the fields the command line set; the others of DeiT's recipe are switched off on
    shards that store their augmentation (:func:`stored_augment_defaults`). None: ``config`` as is.
    """
    config = config.resolved()  # workers do not share the driver's working directory
    info = shard_sets_info(config.shard_sets(), config.manifest)
    if given is not None:
        config = stored_augment_defaults(config, given, stored=info.get("augment"))
    mode = teacher_labels_mode(config, info["views"])
    if info["unlabeled"] and config.distillation == "none":
        raise TrainError(f"--shards hold {info['unlabeled']} samples without a true label, which only the teacher's "
                         "label can train: pass --distillation hard or soft, or leave those shards out")
    if info["unlabeled"] and config.online_teacher:
        raise TrainError("--online-teacher trains on true labels; the --shards hold samples without one: train "
                         "from the stored teacher labels instead")
    _check_batch(config, samples=info["samples"])
    check_inputs(config, num_classes=info["num_classes"])
    out = config.out  # a local directory or an s3:// prefix
    MARKER.check(out)
    launch(config, info=info, mode=mode, out=out,
           prepare=lambda: _prepare_out(out, config, num_classes=info["num_classes"], manifest=info["manifest"],
                                        manifest_sha256=info["manifest_sha256"]))
    metrics = read_metrics(storage.join(out, "metrics.jsonl"))
    return {"out": out, "student": storage.join(out, "student.pt"), "epochs_done": len(metrics),
            "last": metrics[-1] if metrics else {}}


def _check_batch(config: TrainConfig, *, samples: int) -> None:
    """A global batch larger than the label set (times --epoch-repeats) would repeat samples
    within every step without being asked to."""
    world = {"local": 1, "ray": config.num_workers}.get(config.launcher) or int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size * world > samples * config.epoch_repeats:
        workers = f" x {world} workers" if world > 1 else ""
        raise TrainError(f"--batch-size {config.batch_size}{workers} is larger than the {samples} samples of --shards; "
                         f"an epoch would repeat samples: pass --batch-size {max(1, samples // world)} or less "
                         "(or ask for the repeats with --epoch-repeats)")


def check_inputs(config: TrainConfig, *, num_classes: int) -> None:
    """What the workers will load, checked on the driver first: a mistake is one line here, not
    three retried worker failures.

    Builds the student and loads ``--finetune`` into it, lists ``--val``, and builds
    ``--online-teacher`` with its weights.
    """
    model = create_student(config.model, num_classes=num_classes, **config.model_overrides())
    if config.finetune:
        if not is_remote(config.finetune) and not os.path.isfile(config.finetune):
            raise TrainError(f"--finetune {config.finetune}: no such file")
        load_checkpoint(model, config.finetune, reset_heads=heads_differ(model, config.finetune))
    if config.val:
        items, _ = eval_items(config.val)
        if not items:
            raise TrainError(f"--val {config.val}: no images found")
    if config.online_teacher:
        from deitpipe.teacher import build_teacher

        build_teacher(config.online_teacher, weights_path=config.teacher_weights, num_classes=num_classes)


def _prepare_out(out: str, config: TrainConfig, *, num_classes: int, manifest: str,
                 manifest_sha256: str | None = None) -> None:
    """Write config.json; refuse to mix a different run into an existing ``out``, to resume onto
    another label set (config.json records the sha256 of the manifest the run started from), or to
    resume a student whose head does not fit the shards' classes (shards relabelled in place).

    A run that trained no epoch yet (it failed before its first checkpoint) is replaced freely,
    so a corrected rerun is not refused as "other arguments". ``--overwrite`` removes the run's
    own files only (:func:`_clear_run`).
    """
    path = storage.join(out, "config.json")
    student = storage.join(out, "student.pt")
    old = MARKER.read(out)
    if storage.is_file(student) and not config.overwrite:
        head = load_state(student).get("head.weight")
        if head is not None and head.shape[0] != num_classes:
            raise TrainError(f"{student} has a {head.shape[0]}-class head but {manifest} lists {num_classes} "
                             "classes; pass --overwrite or choose another --out")
    if old is not None:
        # A field the run's config.json lacks (written by an earlier version) has its default.
        old = {**_comparable(TrainConfig()), **old}
        same = {k: v for k, v in old.items() if k not in _RUNTIME} == _comparable(config)
        recorded = old.get(LABEL_SET)
        if config.overwrite:
            _clear_run(out)
        elif _started(out) and recorded and manifest_sha256 and recorded != manifest_sha256:
            raise TrainError(f"{out} trained on another label set: {manifest} has sha256 {manifest_sha256[:12]}..., the "
                             f"run started from {recorded[:12]}... (relabelled since?); pass --overwrite to start "
                             "over on these labels, or choose another --out")
        elif _started(out) and (not same or not config.resume):
            diff = sorted(k for k, v in _comparable(config).items() if old.get(k) != v)
            why = f"other arguments ({', '.join('--' + d.replace('_', '-') for d in diff)})" if diff else "a run"
            raise TrainError(f"{out} holds {why}; rerun with the same arguments to resume, "
                             "or pass --overwrite, or choose another --out")
    if not storage.is_object_uri(out):
        os.makedirs(out, exist_ok=True)
    write_json_atomic(path, {**asdict(config), RUN_MARKER: f"deitpipe train-student {__version__}",
                             LABEL_SET: manifest_sha256})


RUN_MARKER = "written_by"  # config.json's key that marks a run directory as deitpipe's
LABEL_SET = "manifest_sha256"  # config.json's key: the sha256 of the manifest the run trains on
RUN_FILES = ("student.pt", "config.json", "metrics.jsonl")


def _comparable(config: TrainConfig) -> dict[str, Any]:
    """The fields that make a run, as config.json holds them (tuples as lists)."""
    return {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k not in _RUNTIME}


def _parse_config(path: str) -> dict[str, Any] | None:
    """train-student's config.json at ``path``: one with deitpipe's marker (or every field of a
    TrainConfig, as written before the marker); None when another tool's."""
    try:
        data = json.loads(storage.read_bytes(path))
    except (ValueError, OSError):
        return None
    if not isinstance(data, dict):
        return None
    marked = str(data.get(RUN_MARKER, "")).startswith("deitpipe train-student")
    return data if marked or set(_comparable(TrainConfig())) <= set(data) else None


MARKER = Marker("config.json", "train-student config.json", _parse_config)


def _started(out: str) -> bool:
    """Whether the run in ``out`` finished an epoch (it has weights, metrics or a checkpoint)."""
    return (storage.is_file(storage.join(out, "student.pt")) or bool(storage.size(storage.join(out, "metrics.jsonl")))
            or bool(checkpoint_files(out)) or bool(ray_checkpoint_files(out)))


def _clear_run(out: str) -> None:
    """Remove what train-student wrote in ``out``: its files by name, leftovers of their atomic
    writes, its checkpoint files, and Ray Train's storage folder (``ray``, recognised by Ray's
    marker). Nothing else."""
    remove_files([storage.join(out, name) for name in RUN_FILES] + temp_leftovers(out, RUN_FILES))
    folder = storage.join(out, CHECKPOINT_DIR)
    if storage.is_object_uri(folder) or (os.path.isdir(folder) and not os.path.islink(folder)):
        remove_files(checkpoint_files(out) + temp_leftovers(folder, CHECKPOINT_FILE))
        if not storage.is_object_uri(folder) and not os.listdir(folder):
            os.rmdir(folder)
    remove_ray_storage(storage.join(out, "ray"))


_RUNTIME = frozenset({"out", "ray_address", "resume", "overwrite", "stop_after_steps", "progress",
                      "loader_workers", "cpus_per_worker", "keep_checkpoints", "launcher", RUN_MARKER,
                      LABEL_SET})
