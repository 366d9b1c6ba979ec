"""Stage one on Ray: a teacher labels every image's views and the results are packed into shards.

Ray Data runs the work: CPU tasks read, decode and cut the views of each image; an actor pool
runs the teacher on those crops (one actor per GPU, or one on the CPU); the driver collects the
small teacher outputs per shard and, as soon as a shard's samples are all labelled, packs its tar
from the source bytes and the outputs (atomically, in a thread beside the stream). A shard is the
unit of planning and of resume: complete shards are skipped on a rerun.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from deitpipe.pipeline.config import LabelConfig
from deitpipe.pipeline.outdir import check_output_dir, locked, remove_files, temp_leftovers
from deitpipe.pipeline.progress import Progress
from deitpipe.pipeline.raysession import quiet_ray_data, ray_session
from deitpipe.shards import schema, storage
from deitpipe.shards.image import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    cut_views,
    decode_image,
    sniff_image_type,
    storable_image,
)
from deitpipe.shards.manifest import file_sha256, read_manifest, write_manifest
from deitpipe.shards.plan import assign_shards
from deitpipe.shards.sources import Candidate, Source, read_bytes, resolve_source
from deitpipe.shards.views import global_box, random_view_boxes
from deitpipe.shards.writer import ShardFileWriter, encode_sample
from deitpipe.teacher import Preprocessing, TeacherInfo, TeacherPredictor, build_teacher


_OUTPUT_MEMBERS = ("hard", "topk", "prob", "rest", "softmax")
_READERS = 16  # a shard's source images read at once (ranged GETs, when they lie in object storage)


class LabelError(RuntimeError):
    """A user-facing failure of label-teacher; its message is one line."""


def image_views(
    data: bytes, *, key: str, seed: int, views: int, prep: Preprocessing, min_scale: float = 0.08,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[dict[str, Any], np.ndarray]:
    """Decode one image and cut its global view plus ``views`` random views at the teacher's size.

    Args:
        data: the image file's bytes.
        key: the sample key, which seeds its random views.
        seed: run seed.
        views: number of random views V.
        prep: teacher preprocessing (resize, crop, interpolation).
        min_scale: smallest crop area of a random view.
        max_pixels: larger images are refused as decompression bombs.
    Returns:
        ``({"height", "width", "box" (V+1, 4), "flip" (V+1,)}, pixels (V+1, 3, S, S) uint8)``.
    Raises:
        ImageDecodeError: the bytes are not a decodable image.
    """
    img = decode_image(data, max_pixels=max_pixels)
    width, height = img.size
    boxes, flips = random_view_boxes(seed=seed, key=key, num_views=views, height=height, width=width,
                                     scale=(min_scale, 1.0))
    g = global_box(height=height, width=width, resize=prep.resize, crop=prep.crop)
    boxes = np.concatenate([np.asarray([g], dtype=schema.BOX_DTYPE), boxes])  # (V+1, 4)
    flips = np.concatenate([np.zeros(1, dtype=schema.FLIP_DTYPE), flips])  # (V+1,)
    pixels = cut_views(img, boxes, flips, prep.crop, interpolation=prep.interpolation).numpy()
    return {"height": height, "width": width, "box": boxes, "flip": flips}, pixels


def decode_batch(batch: dict[str, np.ndarray], *, seed: int, views: int, prep: dict[str, Any],
                 min_scale: float = 0.08, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Ray Data task: candidates -> view crops. Undecodable images come back with ``ok`` False."""
    prep_ = Preprocessing.from_dict(prep)
    n, s = len(batch["index"]), prep_.crop
    out = {
        "index": batch["index"], "ok": np.zeros(n, dtype=bool), "reason": np.full(n, "", dtype=object),
        "height": np.zeros(n, dtype=np.int64), "width": np.zeros(n, dtype=np.int64),
        "box": np.zeros((n, views + 1, 4), dtype=schema.BOX_DTYPE),
        "flip": np.zeros((n, views + 1), dtype=schema.FLIP_DTYPE),
        "pixels": np.zeros((n, views + 1, 3, s, s), dtype=np.uint8),
    }
    for i in range(n):
        cand = _candidate(batch, i)
        try:
            geo, pixels = image_views(read_bytes(cand), key=schema.sample_key(int(batch["index"][i])),
                                      seed=seed, views=views, prep=prep_, min_scale=min_scale,
                                      max_pixels=max_pixels)
        except (ImageDecodeError, OSError) as exc:
            out["reason"][i] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            continue
        out["ok"][i] = True
        for k in ("height", "width", "box", "flip"):
            out[k][i] = geo[k]
        out["pixels"][i] = pixels
    return out


class ViewTeacher:
    """Ray Data actor: the teacher over all views of a batch of images, (B, V+1, 3, S, S)."""

    def __init__(self, *, cpu_threads: int | None = None, **predictor_kwargs: Any) -> None:
        if cpu_threads:
            # A CPU teacher is the heavy stage: let it use the cores the decode tasks leave idle.
            import torch

            torch.set_num_threads(cpu_threads)
        self.predictor = TeacherPredictor(**predictor_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")  # (B, V+1, 3, S, S)
        b, v = pixels.shape[:2]
        labelled = self.predictor({"pixels": pixels.reshape(b * v, *pixels.shape[2:])})
        for k in _OUTPUT_MEMBERS:
            if k in labelled:
                batch[k] = labelled[k].reshape(b, v, *labelled[k].shape[1:])
        return batch


def _candidate(batch: dict[str, np.ndarray], i: int) -> Candidate:
    data = batch["data"][i]
    return Candidate(path=str(batch["path"][i]), label=int(batch["label"][i]), kind=str(batch["kind"][i]),
                     ref=str(batch["ref"][i]), size=int(batch["size"][i]),
                     data=bytes(data) if data is not None else None, offset=int(batch["offset"][i]),
                     length=int(batch["length"][i]))


def _items(source: Source, indices: list[int]) -> list[dict[str, Any]]:
    cands = source.candidates
    return [{"index": i, "path": cands[i].path, "label": cands[i].label, "kind": cands[i].kind,
             "ref": cands[i].ref, "size": cands[i].size, "data": cands[i].data, "offset": cands[i].offset,
             "length": cands[i].length} for i in indices]


def pack_shard(*, out_dir: Path, shard: int, order: list[int], first_index: int, source: Source,
               rows: dict[int, dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Write one shard from its labelled rows (index -> row), in its planned order.

    Returns:
        Its manifest entry; ``first_index`` is the position of its first input in the
        assignment order (``shards.plan.assign_shards``).
    """
    indices = [i for i in order if i in rows]
    with ShardFileWriter(out_dir, schema.shard_name(shard)) as writer, \
            ThreadPoolExecutor(max_workers=_READERS) as readers:
        # Images in object storage are one ranged GET each: many in flight, written in order.
        for index, data in zip(indices, readers.map(lambda i: read_bytes(source.candidates[i]), indices)):
            row, cand = rows[index], source.candidates[index]
            ext = sniff_image_type(data)
            # Types the schema does not list are stored as PNG of the same pixel grid.
            image_bytes, ext = (data, ext) if ext else storable_image(data, decode_image(data))
            views = {"box": row["box"], "flip": row["flip"]}
            views.update({k: row[k] for k in _OUTPUT_MEMBERS if k in row})
            writer.write(encode_sample(
                key=schema.sample_key(index), image_bytes=image_bytes, image_ext=ext, label=cand.label,
                meta={"path": cand.path, "height": int(row["height"]), "width": int(row["width"])},
                views=views, num_classes=num_classes,
            ))
    return {**writer.record(), "first_index": first_index}


def input_source(config: LabelConfig) -> Source:
    """The images ``--data`` names.

    ``digits:train`` and ``digits:val`` (and cluttered-digits') are the fixed split every command
    reads, whatever ``--seed`` is: the seed moves the view boxes, never an image from the held-out
    split that train-student's and evaluate's ``--val digits:val`` read into the labelled one.
    """
    return resolve_source(config.data, image_size=config.image_size)


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
    out = config.out  # a local directory or an s3:// prefix
    source = input_source(config)
    if not source.candidates:
        raise LabelError(f"--data {config.data}: no candidate images found")
    teacher_kwargs = dict(name=config.teacher, weights_path=config.teacher_weights,
                          num_classes=config.num_classes, preprocessing_overrides=_overrides(config))
    _check_device(config)
    _, info = build_teacher(**teacher_kwargs)  # fails here, before Ray, on bad weights
    if len(source.class_names) > info.num_classes:
        raise LabelError(
            f"--data has {len(source.class_names)} classes but teacher {info.name} has "
            f"{info.num_classes} outputs; fine-tune the teacher to the data's classes first"
        )
    _check_apart(out, config.data, source)
    check_output_dir(out, owned=_own_manifest(out) is not None, what=f"label-teacher {schema.MANIFEST_NAME}")
    plan = assign_shards(len(source.candidates), config.shard_size, seed=config.seed)
    with locked(out, command="deitpipe label-teacher"):
        manifest = _open_output(out, config, source, info, planned=len(plan))
        done = {e["name"] for e in manifest["shards"]}
        todo = [s for s in range(len(plan)) if schema.shard_name(s) not in done]
        written: list[dict[str, Any]] = []
        if todo:
            written = _label_shards(config, source, info, plan, todo, manifest, out, teacher_kwargs)
        manifest["inputs"] = _inputs_summary(source, manifest["shards"])
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
                                "seconds": round(seconds, 2),
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
    old = _own_manifest(out)
    check_output_dir(out, owned=old is not None, what=f"label-teacher {schema.MANIFEST_NAME}")
    if old is not None:
        before = {k: old.get("config", {}).get(k) for k in config.fingerprint()}
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
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "config": asdict(config), "teacher": info.to_dict(),
        "num_classes": info.num_classes, "class_names": list(source.class_names),
        "views": config.views, "topk": min(config.topk, info.num_classes),
        "full_softmax": config.full_softmax, "seed": config.seed, "shards": kept,
    }
    if not kept:
        write_manifest(out, manifest)
    return manifest


def _own_manifest(out: str) -> dict[str, Any] | None:
    """label-teacher's manifest in ``out``, None when there is none; one line when it is not one."""
    path = storage.join(out, schema.MANIFEST_NAME)
    if not storage.is_file(path):
        return None
    try:
        return read_manifest(path)
    except ValueError as exc:
        raise LabelError(f"{path} is not a readable label-teacher manifest ({exc}); choose another --out") from exc


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


def _inputs_summary(source: Source, shards: list[dict[str, Any]]) -> dict[str, Any]:
    skipped = [{"path": p, "reason": r} for p, r in source.skipped]
    for entry in shards:
        skipped += entry.get("skipped", [])
    labelled = sum(e["samples"] for e in shards)
    return {"found": len(source.candidates) + len(source.skipped), "labelled": labelled,
            "skipped": skipped, "ignored": len(source.ignored), "ignored_examples": source.ignored[:20]}


def _label_shards(config: LabelConfig, source: Source, info: TeacherInfo, plan: list[list[int]],
                  todo: list[int], manifest: dict[str, Any], out: str,
                  teacher_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Label the shards in ``todo`` and pack each as soon as it is complete."""
    import ray
    from ray.data import ActorPoolStrategy

    shard_of = {i: s for s in todo for i in plan[s]}  # items go in shard order, so shards finish early
    pending: dict[int, dict[int, dict[str, Any]]] = {s: {} for s in todo}
    seen = dict.fromkeys(todo, 0)
    skipped: dict[int, list[dict[str, str]]] = {s: [] for s in todo}
    written: list[dict[str, Any]] = []
    futures: list[Future] = []
    bar = Progress(len(shard_of), desc=f"label-teacher {info.name}", enabled=config.progress)

    def collect(block: bool) -> None:
        for f in [f for f in futures if block or f.done()]:
            futures.remove(f)
            entry = f.result()
            written.append(entry)
            manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda e: e["first_index"])
            write_manifest(out, manifest)

    with ray_session(config.ray_address), quiet_ray_data(), ThreadPoolExecutor(max_workers=2) as packer:
        use_gpu = config.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
        if config.device == "cuda" and not use_gpu:
            raise LabelError(f"--device cuda: the Ray cluster at {config.ray_address or 'this machine'} has no GPU; "
                             "pass --device cpu (or auto), or add GPU nodes")
        actors = config.num_actors or (int(ray.cluster_resources()["GPU"]) if use_gpu else 1)
        v = config.views + 1
        ds = ray.data.from_items(_items(source, [i for s in todo for i in plan[s]]))
        # Decoding runs in CPU tasks, never inside the teacher actor. Ray Data fuses a task stage
        # into an actor stage with equal resource requests, so on a CPU-only cluster the tasks ask
        # for half a CPU (GPU actors differ by num_gpus anyway).
        ds = ds.map_batches(decode_batch, batch_size=8, num_cpus=1 if use_gpu else 0.5, fn_kwargs=dict(
            seed=config.seed, views=config.views, prep=info.preprocessing.to_dict(), min_scale=config.min_scale,
            max_pixels=config.max_pixels if config.max_pixels is not None else DEFAULT_MAX_PIXELS))
        ds = ds.map_batches(
            ViewTeacher, batch_size=max(1, config.batch_size // v), compute=ActorPoolStrategy(size=actors),
            num_gpus=1 if use_gpu else 0, num_cpus=1,
            fn_constructor_kwargs=dict(teacher_kwargs, topk=config.topk, full_softmax=config.full_softmax,
                                       device="cuda" if use_gpu else "cpu", batch_size=config.batch_size,
                                       cpu_threads=None if use_gpu else _local_cpus()))
        try:
            for n, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="numpy")):
                if n == 0:
                    bar.begin()  # the rate is labelling's, not Ray's start-up and the teacher's load
                for i, index in enumerate(batch["index"].tolist()):
                    s = shard_of[index]
                    seen[s] += 1
                    if batch["ok"][i]:
                        pending[s][index] = {k: batch[k][i] for k in batch if k not in ("index", "ok", "reason")}
                    else:
                        reason = str(batch["reason"][i])
                        path = source.candidates[index].path
                        if config.strict:
                            raise LabelError(f"{path}: {reason} (--strict stops at the first undecodable input)")
                        skipped[s].append({"path": path, "reason": reason})
                    if seen[s] == len(plan[s]):
                        futures.append(packer.submit(_pack, out=out, shard=s, plan=plan, source=source,
                                                     rows=pending.pop(s), skipped=skipped[s],
                                                     num_classes=info.num_classes))
                bar.update(len(batch["index"]), shards=f"{len(manifest['shards'])}/{len(plan)}")
                collect(block=False)
        finally:
            collect(block=True)  # shards already being packed land before any error surfaces
            bar.close()
    return written


def _pack(*, out: str, shard: int, plan: list[list[int]], source: Source, rows: dict[int, dict[str, Any]],
          skipped: list[dict[str, str]], num_classes: int) -> dict[str, Any]:
    """Pack one shard into ``out``; into object storage, it is packed in a local temporary
    directory and uploaded whole (``storage.upload``) before the manifest lists it."""
    first = sum(len(p) for p in plan[:shard])
    pack = dict(shard=shard, order=plan[shard], first_index=first, source=source, rows=rows, num_classes=num_classes)
    if storage.is_object_uri(out):
        with tempfile.TemporaryDirectory(prefix="deitpipe-shard-") as staging:
            entry = pack_shard(out_dir=Path(staging), **pack)
            storage.upload(Path(staging) / entry["name"], storage.join(out, entry["name"]))
    else:
        entry = pack_shard(out_dir=Path(out), **pack)
    return {**entry, "candidates": len(plan[shard]), "skipped": skipped}


def _local_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
