"""``deitpipe inspect``: what a shard directory holds, whether it verifies, and whether its stored
labels are still the teacher's answer on the views train-student replays (``--check-teacher``)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deitpipe.shards import storage
from deitpipe.shards.format.manifest import ManifestError, read_manifest
from deitpipe.shards.format.reader import decode_sample, iter_tar_samples, sample_schema_version
from deitpipe.shards.format.verify import find_stray_files, verify_shards


def inspect_shards(out: str | Path, *, deep: bool = False) -> dict[str, Any]:
    """Summarise the manifest, verify every shard's count and sha256, and read one sample.

    Args:
        out: a label-teacher output directory, or its ``s3://`` prefix.
        deep: also decode every sample.
    Returns:
        ``{"ok", "problems", "warnings", "summary", "sample", "text"}``; ``ok`` is False when any
        shard does not verify or the run is incomplete.
    """
    try:
        manifest = read_manifest(out)
    except ManifestError as exc:
        return {"ok": False, "problems": [str(exc)], "warnings": [], "summary": {}, "sample": None,
                "text": f"error: {exc}"}
    problems = verify_shards(out, deep=deep)
    if not manifest.get("complete", False):
        problems.append(f"{out}: the run is incomplete; rerun label-teacher with the same arguments")
    warnings = find_stray_files(out, {s["name"] for s in manifest["shards"]})
    inputs = manifest.get("inputs", {})
    teacher = manifest.get("teacher", {})
    summary = {
        "schema_version": manifest.get("schema_version"),
        "teacher": teacher.get("name"), "weights": teacher.get("weights"),
        "num_classes": manifest.get("num_classes"), "views": manifest.get("views"),
        "topk": manifest.get("topk"), "full_softmax": manifest.get("full_softmax"),
        "seed": manifest.get("seed"), "shards": len(manifest["shards"]),
        "samples": sum(s["samples"] for s in manifest["shards"]),
        "with_true_label": sum(s["samples"] - s.get("unlabeled", 0) for s in manifest["shards"]),
        "without_true_label": sum(s.get("unlabeled", 0) for s in manifest["shards"]),
        "found": inputs.get("found"), "labelled": inputs.get("labelled"),
        "skipped": len(inputs.get("skipped", [])), "ignored": inputs.get("ignored"),
        "augment": manifest.get("augment"),
    }
    sample = None
    if not problems:
        sample = _first_sample(out, manifest)
        if sample is None:
            problems.append(f"{out}: no samples in its {len(manifest['shards'])} shard(s); "
                            "rerun label-teacher on data with decodable images")
    report = {"ok": not problems, "problems": problems, "warnings": warnings, "summary": summary,
              "sample": sample}
    report["text"] = _text(out, summary, problems, warnings, sample, manifest)
    return report


def _first_sample(out: str | Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The first sample of the first shard that holds one, or None when every shard is empty."""
    raw = next((r for shard in manifest["shards"] for r in iter_tar_samples(storage.join(out, shard["name"]))), None)
    if raw is None:
        return None
    s = decode_sample(raw)
    names = manifest.get("class_names") or []
    name = (lambda c: names[c] if c < len(names) else str(c))
    return {
        "key": s["key"], "schema_version": sample_schema_version(raw), "path": s["meta"].get("path"),
        "label": s["label"], "label_name": name(s["label"]) if s["label"] >= 0 else "no true label",
        "size": [s["meta"].get("height"), s["meta"].get("width")],
        "views": [
            {"view": v, "box": s["box"][v].tolist(), "flip": bool(s["flip"][v]), "hard": int(s["hard"][v]),
             "top": [[int(c), round(float(p), 4)] for c, p in zip(s["topk"][v][:3], s["prob"][v][:3])],
             "rest": round(float(s["rest"][v]), 4), **_record(s, v)}
            for v in range(min(len(s["box"]), 4))
        ],
        "hard_agrees_with_label": float(np.mean(s["hard"] == s["label"])) if s["label"] >= 0 else None,
    }


def _record(sample: dict[str, Any], view: int) -> dict[str, Any]:
    """A version 3 view's augmentation record, readable: RandAugment ops applied with their level
    and sign, the erased box, the mixing partner with lambda and the CutMix box."""
    if "ra_op" not in sample:
        return {}
    from deitpipe.shards.format.augment import LEVEL_STEPS, MIX_NONE, RA_NONE

    ops = [{"op": int(o), "level": int(lv) / LEVEL_STEPS, "negate": bool(int(sample["ra_sign"][view]) >> k & 1)}
           for k, (o, lv) in enumerate(zip(sample["ra_op"][view], sample["ra_level"][view])) if int(o) != RA_NONE]
    mix_key = int(sample["mix_key"][view])
    return {"rand_augment": ops, "erase": sample["erase"][view].tolist(),
            "mix": None if mix_key == MIX_NONE else {"partner": mix_key, "view": int(sample["mix_view"][view]),
                                                     "lam": round(float(sample["lam"][view]), 4),
                                                     "cut": sample["cut"][view].tolist()}}


def _augment_line(spec: dict[str, Any]) -> str:
    """What a version 3 set stores with each view, in DeiT's terms."""
    parts = []
    if spec.get("rand_augment") is not None:
        parts.append(f"RandAugment m{spec['rand_augment']:g} mstd{spec['rand_augment_std']:g}")
    if spec.get("random_erasing"):
        parts.append(f"erasing {spec['random_erasing']:g}")
    if spec.get("mixup"):
        parts.append(f"mixup {spec['mixup']:g}")
    if spec.get("cutmix"):
        parts.append(f"cutmix {spec['cutmix']:g}")
    if spec.get("mixup") and spec.get("cutmix"):
        parts.append(f"switch {spec['mixup_switch']:g}")
    mixing = f", partners among {spec['mix_group']} inputs of a shard" if spec.get("mixup") or spec.get("cutmix") else ""
    return f"stored augmentation: {', '.join(parts)} on {spec['size']} px views{mixing}"


def _text(out, summary, problems, warnings, sample, manifest) -> str:
    lines = [f"{out}: schema version {summary['schema_version']}, {summary['shards']} shards, "
             f"{summary['samples']} samples ({summary['with_true_label']} with a true label, "
             f"{summary['without_true_label']} without), teacher "
             f"{summary['teacher']} ({summary['num_classes']} classes), {summary['views']} views + global, "
             f"top-{summary['topk']}{' + full softmax' if summary['full_softmax'] else ''}, seed {summary['seed']}",
             f"inputs: {summary['found']} found, {summary['labelled']} labelled, {summary['skipped']} skipped, "
             f"{summary['ignored']} ignored"]
    if summary.get("augment"):
        lines.append(_augment_line(summary["augment"]))
    for item in manifest.get("inputs", {}).get("skipped", [])[:5]:
        lines.append(f"  skipped {item['path']}: {item['reason']}")
    if sample:
        lines.append(f"sample {sample['key']} ({sample['path']}, {sample['size'][0]}x{sample['size'][1]}, "
                     f"schema version {sample['schema_version']}): label {sample['label']} ({sample['label_name']})")
        for v in sample["views"]:
            kind = "global" if v["view"] == 0 else f"view {v['view']}"
            lines.append(f"  {kind:>7}: box {v['box']} flip {int(v['flip'])} hard {v['hard']} "
                         f"top {v['top']} rest {v['rest']}")
            if v.get("rand_augment") or (v.get("erase") or [0, 0, 0])[2] or v.get("mix"):
                names = (manifest.get("augment") or {}).get("ops") or []
                ops = ", ".join(f"{names[o['op']] if o['op'] < len(names) else o['op']} "
                                f"{'-' if o['negate'] else ''}{o['level']:g}" for o in v["rand_augment"])
                mix = v["mix"]
                lines.append(f"           ops [{ops}] erase {v['erase']}"
                             + (f" mix with {mix['partner']} view {mix['view']} lam {mix['lam']} cut {mix['cut']}"
                                if mix else ""))
    lines += [f"warning: {w}" for w in warnings]
    lines += [f"FAIL: {p}" for p in problems]
    lines.append("OK: every shard verifies" if not problems else f"{len(problems)} problem(s)")
    return "\n".join(lines)


# The check imports torch, the loaders and the teacher inside its functions: a plain inspect stays light.
AGREEMENT_FLOOR = 99.0  # % of replayed views whose live argmax must be the stored one
_TEACHER_BATCH = 64  # views per teacher forward pass


def check_teacher(out: str | Path, *, views: int, teacher_weights: str | None = None, loader: str = "cpu",
                  device: str = "auto", seed: int = 0,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Replay stored views as train-student's loader does and label those pixels with the teacher again.

    The views are epoch 0's of a one-rank run with ``seed``, in its order, one per sample; each is
    given to the manifest's teacher exactly as label-teacher gave it (back to [0, 1] units, resized
    to the teacher's input), and the live answer is compared with the stored one.

    Args:
        out: a label-teacher output directory, or its ``s3://`` prefix.
        views: how many views to check (all of an epoch when it holds fewer).
        teacher_weights: the teacher's weights file; default: the one label-teacher was given.
        loader: "cpu" (train-student's worker loader) or "gpu" (its batched loader, on ``device``).
        device: where the teacher and the gpu loader run: "auto", "cpu" or "cuda".
        seed: train-student's seed, which picks the epoch's order and views.
        progress: called with the number of views each teacher pass checked.
    Returns:
        ``{"ok", "agreement" (%), "n", "mean_kl" (KL(stored || live), averaged), "asked",
        "available", "loader", "schema_version", "weights", "disagreements", "views" (per view:
        "position", "stored", "live", "kl"), "text"}``; ``ok`` is False below
        ``AGREEMENT_FLOOR`` %.
    """
    from deitpipe.pipeline.train import shard_info
    from deitpipe.shards.format.augment import AugmentSpec
    from deitpipe.student.data import Augment

    if views < 1:
        raise ValueError(f"--check-teacher takes a number of views of at least 1, got {views}")
    if loader not in ("cpu", "gpu"):
        raise ValueError(f"--loader must be cpu or gpu, got {loader!r}")
    info = shard_info(str(out))  # train-student's reading of the set: its shards, checksums, augmentation
    if info["views"] < 1:
        raise ValueError(f"{out} stores no random views (label-teacher --views 0): train-student replays none "
                         "to check; relabel with --views N")
    manifest = read_manifest(out)
    predictor, weights = _live_teacher(out, manifest, teacher_weights, device)
    crop = predictor.info.preprocessing.crop
    stored = AugmentSpec.from_dict(info["augment"]) if info.get("augment") else None
    size = stored.size if stored else ((manifest.get("config") or {}).get("view_size") or crop)
    plain = Augment(rand_augment=None, random_erasing=0.0, img_size=size)  # the stored view, nothing added
    mean, std = (stored.mean, stored.std) if stored else (plain.mean, plain.std)
    n = min(views, info["samples"])  # an epoch replays one view of each sample
    replay = dict(urls=info["urls"], num_classes=info["num_classes"], num_views=info["views"],
                  teacher_labels="views", img_size=size, batch_size=n, steps=1, seed=seed,
                  checksums=info.get("sha256"), stored_augment=info.get("augment"))
    batches = (_worker_batches(replay, plain) if loader == "cpu"
               else _device_batches(replay, plain, device=predictor.device, seed=seed))
    rows: list[dict[str, Any]] = []
    for batch in batches:
        pixels = _teacher_input(batch["image"], mean=mean, std=std, crop=crop, rendered=stored is not None)
        rows += _compare(predictor, pixels, batch["teacher"], batch["teacher_hard"], first=len(rows),
                         num_classes=info["num_classes"])
        if progress is not None:
            progress(len(batch["image"]))
    agreement = 100.0 * sum(r["stored"] == r["live"] for r in rows) / max(len(rows), 1)
    mean_kl = sum(r["kl"] for r in rows) / max(len(rows), 1)
    result = {"ok": agreement >= AGREEMENT_FLOOR, "agreement": agreement, "n": len(rows), "mean_kl": mean_kl,
              "asked": views, "available": info["samples"], "loader": loader,
              "schema_version": manifest.get("schema_version"), "weights": weights,
              "disagreements": sum(r["stored"] != r["live"] for r in rows), "views": rows}
    result["text"] = _check_text(out, result)
    return result


def _live_teacher(out: str | Path, manifest: dict[str, Any], weights: str | None, device: str):
    """The manifest's teacher with the weights it was labelled with, checked by their sha256.

    Returns:
        ``(TeacherPredictor, weights path or None for torchvision's published weights)``.
    """
    from deitpipe.shards.storage import file_sha256
    from deitpipe.teacher.predict import TeacherPredictor

    teacher = manifest.get("teacher") or {}
    path = weights or (manifest.get("config") or {}).get("teacher_weights")
    if weights is not None and not os.path.isfile(weights):
        raise ValueError(f"--teacher-weights {weights}: no such file; pass the weights file {out} was labelled with")
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"{out} was labelled with teacher weights {path}, which are not on this machine; "
                         "pass --teacher-weights PATH to a copy of that file")
    expected = teacher.get("weights_sha256")
    if path is not None and expected:
        _check_sha(out, path, file_sha256(path), expected)
    predictor = TeacherPredictor(
        name=teacher["name"], weights_path=path, num_classes=int(manifest["num_classes"]),
        preprocessing_overrides=teacher.get("preprocessing"),  # as recorded: a sidecar may not travel with the file
        topk=int(manifest.get("topk") or 1), full_softmax=bool(manifest.get("full_softmax")), device=device,
        batch_size=_TEACHER_BATCH)
    if path is None and expected:
        _check_sha(out, teacher.get("weights"), predictor.info.weights_sha256, expected)
    return predictor, path


def _check_sha(out: str | Path, path: str | None, found: str | None, expected: str) -> None:
    if found != expected:
        raise ValueError(f"teacher weights {path} have sha256 {str(found)[:12]}..., but {out} was labelled by other "
                         f"weights ({expected[:12]}...); pass --teacher-weights with the file label-teacher used")


def _worker_batches(replay: dict[str, Any], plain) -> Iterator[dict[str, Any]]:
    """train-student's ``--loader cpu`` samples (``ShardReplay``), stacked ``_TEACHER_BATCH`` at a time."""
    import torch

    from deitpipe.student.data import ShardReplay

    dataset = ShardReplay(**replay, augment=plain)
    dataset.set_epoch(0)
    for samples in _chunks(iter(dataset)):
        yield {k: torch.stack([s[k] for s in samples]) for k in ("image", "teacher", "teacher_hard")}


def _device_batches(replay: dict[str, Any], plain, *, device, seed: int) -> Iterator[dict[str, Any]]:
    """train-student's ``--loader gpu`` batches: encoded samples, collated, then decoded, cut (and
    rendered) on ``device`` by its batch step."""
    from deitpipe.shards.format.randaugment import BatchAugment, augment_generator
    from deitpipe.student.gpu_replay import EncodedShardReplay, collate, prepare_batch

    dataset = EncodedShardReplay(**replay)
    dataset.set_epoch(0)
    augment = BatchAugment.from_config(plain)
    stored = {"renderer": dataset.renderer} if dataset.stored is not None else {}  # as train-student passes it
    for step, samples in enumerate(_chunks(iter(dataset))):
        generator = augment_generator(seed=seed, epoch=0, rank=0, step=step, device=device)
        yield prepare_batch(collate(samples), img_size=replay["img_size"], device=device, augment=augment,
                            generator=generator, **stored)


def _chunks(samples: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    while chunk := list(itertools.islice(samples, _TEACHER_BATCH)):
        yield chunk


def _teacher_input(image, *, mean, std, crop: int, rendered: bool):
    """What label-teacher gave the teacher for these loader images (B, 3, S, S), normalised.

    Rendered views (stored augmentation) go back to [0, 1] units and are resized to the teacher's
    input as floats (``teacher.labelling.ViewTeacher``); crop-only views go back to their uint8
    pixels and are resized with rounding (``shards.format.image.upsample_views``).
    """
    import torch

    from deitpipe.shards.format.image import upsample_views
    from deitpipe.teacher.labelling import rendered_teacher_input

    if rendered:
        return rendered_teacher_input(image, mean=mean, std=std, crop=crop)
    mean_ = torch.tensor(mean, device=image.device)[None, :, None, None]
    std_ = torch.tensor(std, device=image.device)[None, :, None, None]
    return upsample_views((image * std_ + mean_).mul_(255).round_().clamp_(0, 255).to(torch.uint8), crop)


def _compare(predictor, pixels, stored, stored_hard, *, first: int, num_classes: int) -> list[dict[str, Any]]:
    """Per view: the stored and live argmax and KL(stored || live), the live softmax reduced to
    what label-teacher stores (top-k, float16), so an exact replay reads as KL 0."""
    from deitpipe.shards.format.reader import teacher_distribution

    live = predictor.summarize(predictor.probs(pixels))
    stored = stored.detach().cpu().double().numpy()
    rows = []
    for i, p in enumerate(stored):
        q = teacher_distribution({"key": "live", **live}, i, num_classes).astype(np.float64)
        mask = p > 0
        kl = float(np.sum(p[mask] * (np.log(p[mask]) - np.log(np.maximum(q[mask], 1e-12)))))
        rows.append({"position": first + i, "stored": int(stored_hard[i]), "live": int(live["hard"][i]),
                     "kl": max(kl, 0.0)})
    return rows


def _check_text(out: str | Path, result: dict[str, Any]) -> str:
    lines = []
    if result["n"] < result["asked"]:
        lines.append(f"{out}: an epoch replays {result['available']} views (one per sample), fewer than the "
                     f"{result['asked']} asked; checked them all")
    lines.append(f"agreement {result['agreement']:.2f} % over {result['n']} views, mean KL {result['mean_kl']:.4f}")
    if not result["ok"]:
        lines.append(f"FAIL: the teacher disagrees with the stored labels on {result['disagreements']} of "
                     f"{result['n']} views (below {AGREEMENT_FLOOR:g} % agreement); the labels do not match "
                     f"the views train-student replays")
    return "\n".join(lines)
