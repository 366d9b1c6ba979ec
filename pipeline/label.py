"""Stage one, orchestrated: check the inputs, the teacher and ``--out`` on the driver, then label
with a launcher and finish the manifest.

The work itself is ``teacher.labelling``'s, which knows nothing of Ray: chunks of inputs are
decoded and cut into views, the teacher labels them, and a packer writes each shard as soon as
its inputs are all labelled. Two launchers run those chunks: ``local`` (this process: threads
decode ahead of one teacher, no Ray start-up) and ``ray`` (Ray Data: CPU tasks decode, an actor
pool runs the teacher, one actor per GPU). They give the same shards, byte for byte. A shard is
the unit of planning and of resume: complete shards are skipped on a rerun.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import warnings
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from deitpipe.pipeline.config import LabelConfig
from deitpipe.pipeline.outdir import Marker, locked, remove_files, temp_leftovers
from deitpipe.pipeline.progress import Progress
from deitpipe.shards import storage
from deitpipe.shards.format import schema
from deitpipe.shards.format.augment import AugmentSpec
from deitpipe.shards.format.image import DEFAULT_MAX_PIXELS
from deitpipe.shards.format.manifest import read_manifest, write_manifest
from deitpipe.shards.storage import file_sha256
from deitpipe.shards.format.plan import assign_shards
from deitpipe.shards.inputs import Source, resolve_source
from deitpipe.teacher import TeacherInfo, build_teacher
from deitpipe.teacher.labelling import (
    LabelError,
    ShardPacker,
    chunk_items,
    chunk_plan,
    consume,
    decode_chunk,
    inputs_summary,
    label_local,
    local_cpus,
)

__all__ = ["LabelError", "input_source", "label_teacher", "resolve_launcher"]


def input_source(config: LabelConfig) -> Source:
    """The images ``--data`` names.

    ``digits:train`` and ``digits:val`` (and cluttered-digits') are the fixed split every command
    reads, whatever ``--seed`` is: the seed moves the view boxes, never an image from the held-out
    split that train-student's and evaluate's ``--val digits:val`` read into the labelled one.
    """
    return resolve_source(config.data, image_size=config.image_size, unlabeled=config.unlabeled)


def resolve_launcher(config: LabelConfig) -> str:
    """``--launcher``, or its default: Ray where it has more to run on than this process (a
    cluster named by ``--ray-address``, or several GPUs here), else this process, which starts in
    no time and needs no Ray."""
    if config.launcher:
        return config.launcher
    if config.ray_address:
        return "ray"
    if config.device != "cpu":
        import torch

        if torch.cuda.device_count() > 1:
            return "ray"
    return "local"


def label_teacher(config: LabelConfig) -> dict[str, Any]:
    """Run stage one: label ``config.data`` with the teacher into shards under ``config.out``.

    A rerun with the same arguments skips complete shards; with other arguments it refuses
    unless ``config.overwrite``.

    Args:
        config: the run's configuration.
    Returns:
        The final manifest (also written to ``out/manifest.json``), plus "run" statistics.
    """
    start = time.perf_counter()
    config = config.resolved()  # Ray tasks do not share the driver's working directory
    launcher = resolve_launcher(config)
    if launcher == "local" and config.ray_address:
        raise LabelError("--ray-address names a cluster but --launcher local labels in this process; "
                         "drop one of them")
    out = config.out  # a local directory or an s3:// prefix
    source = input_source(config)
    if not source.candidates:
        first = f" (first skipped: {source.skipped[0][0]}: {source.skipped[0][1]})" if source.skipped else ""
        hint = ("; pass --unlabeled to label samples without one" if not config.unlabeled
                and any("cls" in reason for _, reason in source.skipped) else "")
        raise LabelError(f"--data {config.data}: no candidate images found{first}{hint}")
    _check_device(config)
    teacher_kwargs = dict(name=config.teacher, weights_path=config.teacher_weights,
                          num_classes=config.num_classes, preprocessing_overrides=_overrides(config))
    _, info = build_teacher(**teacher_kwargs)  # fails here, before any work, on bad weights
    if not config.unlabeled and any(c.label < 0 for c in source.candidates):
        raise LabelError(f"--data {config.data} has images without labels; pass --unlabeled to have the teacher "
                         "label them alone")
    if len(source.class_names) > info.num_classes:
        raise LabelError(
            f"--data has {len(source.class_names)} classes but teacher {info.name} has "
            f"{info.num_classes} outputs; fine-tune the teacher to the data's classes first"
        )
    _check_apart(out, config.data, source)
    MARKER.check(out)
    plan = assign_shards(len(source.candidates), config.shard_size, seed=config.seed)
    with locked(out, command="deitpipe label-teacher"):
        manifest = _open_output(out, config, source, info, planned=len(plan))
        done = {e["name"] for e in manifest["shards"]}
        todo = [s for s in range(len(plan)) if schema.shard_name(s) not in done]
        written: list[dict[str, Any]] = []
        if todo:
            packer = ShardPacker(out=out, plan=plan, todo=todo, source=source, manifest=manifest,
                                 num_classes=info.num_classes, strict=config.strict)
            run = _label_ray if launcher == "ray" else _label_here
            written = run(config, source, info, plan, todo, packer, teacher_kwargs)
        manifest["inputs"] = inputs_summary(source, manifest["shards"])
        if manifest["inputs"]["labelled"] == 0:  # shards without samples would stall a student
            write_manifest(out, manifest)  # incomplete, with the reasons: train-student names them
            first = manifest["inputs"]["skipped"][:1]
            why = f" (first: {first[0]['path']}: {first[0]['reason']})" if first else ""
            raise LabelError(f"--data {config.data}: none of {manifest['inputs']['found']} inputs could be "
                             f"labelled{why}; fix or replace the inputs, then rerun")
        manifest["complete"] = True
        if written or not _is_complete(out):  # a rerun that finds everything done writes nothing
            write_manifest(out, manifest)
    labelled = sum(len(plan[s]) for s in todo)
    seconds = time.perf_counter() - start
    return {**manifest, "run": {"shards_written": len(written), "shards_skipped": len(plan) - len(todo),
                                "launcher": launcher, "seconds": round(seconds, 2),
                                "images_per_s": round(labelled / seconds, 2) if todo else None}}


def _check_apart(out: str, data: str, source: Source) -> None:
    """Refuse an --out that holds the inputs, or lies inside an input folder (a rerun would list
    the shards as images). Local paths are compared by their real paths, so a link into --data
    (or an input reached through one) is caught."""
    if storage.is_object_uri(out):
        inside = (lambda path, folder: path == folder or path.startswith(folder.rstrip("/") + "/"))
        if storage.is_dir(data) and inside(out, data):
            raise LabelError(f"--out {out} lies inside --data {data}; choose an --out outside the input folder")
        for cand in source.candidates:
            if cand.kind in ("file", "tarmember") and inside(cand.ref, out):
                raise LabelError(f"--data {cand.ref} lies inside --out {out}; choose an --out apart from the inputs")
        return
    real_out = os.path.realpath(out)
    if not storage.is_object_uri(data) and os.path.isdir(data) and _inside(real_out, os.path.realpath(data)):
        raise LabelError(f"--out {out} lies inside --data {data} (real path {real_out}); choose an --out "
                         "outside the input folder")
    folders: dict[str, str] = {}  # an input's folder -> its real path: one lookup a folder, not a file
    for cand in source.candidates:
        if cand.kind not in ("file", "tarmember") or storage.is_object_uri(cand.ref):
            continue
        head, name = os.path.split(cand.ref)
        if head not in folders:
            folders[head] = os.path.realpath(head or ".")
        real = os.path.join(folders[head], name)
        if os.path.islink(cand.ref):
            real = os.path.realpath(cand.ref)
        if _inside(real, real_out):
            raise LabelError(f"--data {cand.ref} lies inside --out {out}; choose an --out apart from the inputs")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_device(config: LabelConfig) -> None:
    """``--device cuda`` on a machine without a GPU is an error, not a quiet run on the CPU (a
    cluster's GPUs are checked when Ray is joined)."""
    if config.device == "cuda" and not config.ray_address:
        import torch

        if not torch.cuda.is_available():
            raise LabelError("--device cuda: this machine has no CUDA GPU that torch can use; pass --device cpu "
                             "(or auto), or join a cluster with GPUs (--ray-address)")


def _overrides(config: LabelConfig) -> dict[str, Any]:
    return {"resize": config.resize, "crop": config.crop, "interpolation": config.interpolation}


_SHARD_FILE = re.compile(r"shard-[0-9]{6}\.tar")  # schema.SHARD_PATTERN's names
_OWN_FILES = re.compile(rf"shard-[0-9]{{6}}\.tar|{re.escape(schema.MANIFEST_NAME)}")


def _open_output(out: str, config: LabelConfig, source: Source, info: TeacherInfo,
                 planned: int) -> dict[str, Any]:
    """Check ``out`` against this run and return the manifest to continue (kept shards only).

    Only files label-teacher writes are ever removed, and only in a directory holding its
    manifest or empty: the shards it replaces (those the old manifest lists, and those of this
    run's ``planned`` numbers, by their exact names, unless kept) and leftovers of its atomic
    writes. A ``shard-NNNNNN.tar`` neither listed nor planned stays.
    """
    old = MARKER.check(out)
    if old is not None:
        # A field newer than the old manifest counts as its default (the old run's behaviour).
        defaults = {f.name: f.default for f in fields(LabelConfig)}
        before = {k: old.get("config", {}).get(k, defaults.get(k)) for k in config.fingerprint()}
        diff = sorted(k for k, v in config.fingerprint().items() if before.get(k) != v)
        if diff and not config.overwrite:
            raise LabelError(
                f"{out} holds shards made with other arguments ({', '.join('--' + d.replace('_', '-') for d in diff)} "
                "differ); pass --overwrite to replace them or choose another --out"
            )
        kept = [] if diff else [e for e in old["shards"] if _shard_intact(out, e)]
    else:
        kept = []
    keep = {e["name"] for e in kept}
    if not storage.is_object_uri(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    replaced = {e["name"] for e in (old or {}).get("shards", [])} | {schema.shard_name(s) for s in range(planned)}
    # Leftovers of an interrupted run, and shards being replaced: deitpipe's exact names only.
    remove_files([storage.join(out, name) for name in storage.list_names(out)
                  if _SHARD_FILE.fullmatch(name) and name in replaced and name not in keep]
                 + temp_leftovers(out, _OWN_FILES))
    spec = augment_spec(config, info)
    manifest = {
        "schema_version": schema.AUGMENTED_VERSION if spec else schema.SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "config": asdict(config), "teacher": info.to_dict(),
        "num_classes": info.num_classes, "class_names": _class_names(source, info),
        "views": config.views, "topk": min(config.topk, info.num_classes),
        "full_softmax": config.full_softmax, "seed": config.seed, "shards": kept,
    }
    if spec is not None:
        manifest["augment"] = spec.to_dict()
    if not kept:
        write_manifest(out, manifest)
    return manifest


def _class_names(source: Source, info: TeacherInfo) -> list[str]:
    """The data's class names; for unlabelled data, the teacher's (its sidecar's, else indices)."""
    if source.class_names:
        return list(source.class_names)
    names = list(getattr(info, "class_names", None) or [])
    return names if len(names) == info.num_classes else [str(i) for i in range(info.num_classes)]


def _parse_manifest_marker(path: str) -> dict[str, Any]:
    """label-teacher's manifest at ``path``; one line when it is not one."""
    try:
        return read_manifest(path)
    except ValueError as exc:
        raise LabelError(f"{path} is not a readable label-teacher manifest ({exc}); choose another --out") from exc


MARKER = Marker(schema.MANIFEST_NAME, f"label-teacher {schema.MANIFEST_NAME}", _parse_manifest_marker)


def _shard_intact(out: str, entry: dict[str, Any]) -> bool:
    """Whether a listed shard is there as the manifest describes it: its size, then its sha256 (a
    shard edited or replaced behind the manifest is labelled again, not called complete)."""
    path = storage.join(out, entry["name"])
    if storage.is_symlink(path) or storage.size(path) != entry.get("bytes", -1):
        return False
    return file_sha256(path) == entry.get("sha256")


def _is_complete(out: str) -> bool:
    try:
        return bool(read_manifest(out).get("complete"))
    except ValueError:
        return False


def augment_spec(config: LabelConfig, info: TeacherInfo) -> AugmentSpec | None:
    """What label-teacher stores with each random view beyond its box and flip (None: nothing).
    The views are cut at ``--view-size`` (default: the teacher's crop), the student's input."""
    spec = AugmentSpec(size=config.view_size or info.preprocessing.crop, rand_augment=config.rand_augment,
                       rand_augment_std=config.rand_augment_std, random_erasing=config.random_erasing,
                       mixup=config.mixup, cutmix=config.cutmix, mixup_switch=config.mixup_switch,
                       cut_interpolation=info.preprocessing.interpolation)
    return spec if spec.active else None


def _augment_dict(config: LabelConfig, info: TeacherInfo) -> dict[str, Any] | None:
    spec = augment_spec(config, info)
    return spec.to_dict() if spec else None


def _chunks(config: LabelConfig, info: TeacherInfo, plan: list[list[int]], todo: list[int]) -> list[list[int]]:
    spec = augment_spec(config, info)
    return chunk_plan(plan, todo, views=config.views, batch_size=config.batch_size,
                      mix_group=spec.mix_group if spec and spec.mixes else None)


def _decode_kwargs(config: LabelConfig, info: TeacherInfo) -> dict[str, Any]:
    return dict(seed=config.seed, views=config.views, prep=info.preprocessing.to_dict(), min_scale=config.min_scale,
                max_pixels=config.max_pixels if config.max_pixels is not None else DEFAULT_MAX_PIXELS,
                view_size=config.view_size, augment=_augment_dict(config, info))


def _teacher_kwargs(config: LabelConfig, teacher_kwargs: dict[str, Any], device: str, info: TeacherInfo) -> dict[str, Any]:
    return dict(teacher_kwargs, topk=config.topk, full_softmax=config.full_softmax, device=device,
                batch_size=config.batch_size, augment=_augment_dict(config, info))


def _progress(config: LabelConfig, info: TeacherInfo, total: int, packer: ShardPacker, shards: int) -> tuple:
    bar = Progress(total, desc=f"label-teacher {info.name}", enabled=config.progress)
    started = [False]

    def on_batch(n: int) -> None:
        if not started[0]:
            bar.begin()  # the rate is labelling's, not the start-up's and the teacher's load
            started[0] = True
        bar.update(n, shards=f"{len(packer.manifest['shards'])}/{shards}")

    return bar, on_batch


def _label_here(config: LabelConfig, source: Source, info: TeacherInfo, plan: list[list[int]], todo: list[int],
                packer: ShardPacker, teacher_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The local launcher: this process, no Ray."""
    import torch

    device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    chunks = _chunks(config, info, plan, todo)
    bar, on_batch = _progress(config, info, sum(map(len, chunks)), packer, len(plan))
    batches = label_local((chunk_items(source, c) for c in chunks), decode=_decode_kwargs(config, info),
                          teacher=_teacher_kwargs(config, teacher_kwargs, device, info))
    try:
        return consume(batches, packer, on_batch)
    finally:
        bar.close()


def _label_ray(config: LabelConfig, source: Source, info: TeacherInfo, plan: list[list[int]], todo: list[int],
               packer: ShardPacker, teacher_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The Ray launcher: Ray Data maps the same chunks over a cluster; CPU tasks decode, an actor
    pool runs the teacher (one actor per GPU, or one on the CPU)."""
    import ray
    from ray.data import ActorPoolStrategy

    from deitpipe.pipeline.raysession import quiet_ray_data, ray_session

    chunks = _chunks(config, info, plan, todo)
    bar, on_batch = _progress(config, info, sum(map(len, chunks)), packer, len(plan))
    with ray_session(config.ray_address), quiet_ray_data():
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = config.device != "cpu" and gpus >= 1
        if config.device == "cuda" and not use_gpu:
            raise LabelError(f"--device cuda: the Ray cluster at {config.ray_address or 'this machine'} has no GPU; "
                             "pass --device cpu (or auto), or add GPU nodes")
        actors = config.num_actors or (gpus if use_gpu else 1)
        # One row per chunk, so that every launcher's teacher sees the same batches.
        rows = [{"items": _encode_items(chunk_items(source, c))} for c in chunks]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * _cluster_cpus(ray))))
        # Decoding runs in CPU tasks, never inside the teacher actor. Ray Data fuses a task stage
        # into an actor stage with equal resource requests, so on a CPU-only cluster the tasks ask
        # for half a CPU (GPU actors differ by num_gpus anyway).
        ds = ds.map_batches(_ray_decode, batch_size=1, num_cpus=1 if use_gpu else 0.5,
                            fn_kwargs=dict(decode=_decode_kwargs(config, info)))
        # The teacher's settings travel inside its class, not as constructor arguments: Ray keeps
        # those in the object store and warns about it on every run.
        teacher_cls = _ray_teacher_class(dict(_teacher_kwargs(config, teacher_kwargs, "cuda" if use_gpu else "cpu", info),
                                              cpu_threads=None if use_gpu else local_cpus()))
        # On a cluster, Ray Data restarts a teacher actor whose node is lost. On one machine a
        # lost node is the whole run, and restarts only make Ray warn, on every run, about its own
        # constructor arguments (ray-project/ray#57733): none there.
        # (Ray 2.60 marks this argument for removal in 2.64 and offers no other way to say it yet.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.* is deprecated")
            ds = ds.map_batches(teacher_cls, batch_size=1, compute=ActorPoolStrategy(size=actors),
                                num_gpus=1 if use_gpu else 0, num_cpus=1,
                                ray_remote_args_fn=None if config.ray_address else _no_restarts)
        try:
            batches = (b for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
            return consume(batches, packer, on_batch)
        finally:
            bar.close()


def _encode_items(items: list[dict[str, Any]]) -> str:
    """A chunk's items as one JSON string (in-memory image bytes as base64): one plain column."""
    return json.dumps([{**it, "data": None if it["data"] is None else base64.b64encode(it["data"]).decode("ascii")}
                       for it in items])


def _decode_items(text: str) -> list[dict[str, Any]]:
    return [{**it, "data": None if it["data"] is None else base64.b64decode(it["data"])} for it in json.loads(text)]


def _ray_decode(batch: dict[str, Any], *, decode: dict[str, Any]) -> dict[str, Any]:
    """Ray Data task: one chunk row -> one row holding the chunk's decoded views (each column
    with a leading axis of 1), so that the teacher's batch is the whole chunk, as in every launcher."""
    (text,) = batch["items"]
    chunk = decode_chunk(_decode_items(str(text)), **decode)
    row = {k: v[None] for k, v in chunk.items() if k != "reason"}
    row["reason"] = np.asarray([json.dumps([str(r) for r in chunk["reason"]])])
    return row


def _ray_teacher_class(kwargs: dict[str, Any]) -> type:
    """:class:`ViewTeacher` for a Ray Data actor pool over chunk rows, its arguments bound in the class."""
    from deitpipe.teacher.labelling import ViewTeacher

    def __init__(self) -> None:
        ViewTeacher.__init__(self, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunk = {k: v[0] for k, v in batch.items() if k != "reason"}
        chunk["reason"] = np.asarray(json.loads(str(batch["reason"][0])), dtype=object)
        return ViewTeacher.__call__(self, chunk)  # one row per image

    # Named as the class it runs, so Ray's actor list and logs read "ViewTeacher".
    return type("ViewTeacher", (ViewTeacher,), {"__init__": __init__, "__call__": __call__})


def _no_restarts() -> dict[str, Any]:
    return {"max_restarts": 0}


def _cluster_cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
