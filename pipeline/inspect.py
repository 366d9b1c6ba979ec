"""``deitpipe inspect``: what a shard directory holds, and whether it verifies."""

from __future__ import annotations

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
             "rest": round(float(s["rest"][v]), 4)}
            for v in range(min(len(s["box"]), 4))
        ],
        "hard_agrees_with_label": float(np.mean(s["hard"] == s["label"])) if s["label"] >= 0 else None,
    }


def _text(out, summary, problems, warnings, sample, manifest) -> str:
    lines = [f"{out}: schema version {summary['schema_version']}, {summary['shards']} shards, "
             f"{summary['samples']} samples ({summary['with_true_label']} with a true label, "
             f"{summary['without_true_label']} without), teacher "
             f"{summary['teacher']} ({summary['num_classes']} classes), {summary['views']} views + global, "
             f"top-{summary['topk']}{' + full softmax' if summary['full_softmax'] else ''}, seed {summary['seed']}",
             f"inputs: {summary['found']} found, {summary['labelled']} labelled, {summary['skipped']} skipped, "
             f"{summary['ignored']} ignored"]
    for item in manifest.get("inputs", {}).get("skipped", [])[:5]:
        lines.append(f"  skipped {item['path']}: {item['reason']}")
    if sample:
        lines.append(f"sample {sample['key']} ({sample['path']}, {sample['size'][0]}x{sample['size'][1]}, "
                     f"schema version {sample['schema_version']}): label {sample['label']} ({sample['label_name']})")
        for v in sample["views"]:
            kind = "global" if v["view"] == 0 else f"view {v['view']}"
            lines.append(f"  {kind:>7}: box {v['box']} flip {int(v['flip'])} hard {v['hard']} "
                         f"top {v['top']} rest {v['rest']}")
    lines += [f"warning: {w}" for w in warnings]
    lines += [f"FAIL: {p}" for p in problems]
    lines.append("OK: every shard verifies" if not problems else f"{len(problems)} problem(s)")
    return "\n".join(lines)
