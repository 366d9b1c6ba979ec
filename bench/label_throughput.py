"""What each launcher costs in stage one: label-teacher images/s, in this process (--launcher local)
and on Ray (--launcher ray), against a plain PyTorch loop on the same inputs.

The plain loop does the same work per image and per batch without Ray: DataLoader workers run
``image_views`` (decode + global view + V random views at the teacher's size, exactly what
label-teacher's decode tasks do), the main process runs the same teacher (channels-last, same
views per forward) through ``predict_probs`` and ``summarize_probs``. It writes no shards, so
label-teacher's shard writing is part of the measured cost.

Both are run over the first N and the first 2N inputs. Figures per method:
    end_to_end_img_s  2N / seconds of the 2N run, everything after Ray is up (build the teacher,
                      start workers/actors, label, and for label-teacher write the shards);
    marginal_img_s    N / (t(2N) - t(N)): the rate once fixed start-up is paid, for both;
    steady_img_s      plain loop only: images/s after its first batch, in the 2N run.
Ray's own start-up (``ray.init``) is timed once and reported separately as ``ray_init_s``; a
first pass of each method over one batch of inputs (``warmup_s``) is not counted.
Goal: ratio ray/plain >= 0.9 (marginal).

Run: python bench/label_throughput.py            (photo-like JPEGs at 300 px, RegNetY-1.6GF)
     python bench/label_throughput.py --quick    (digits at 32 px, tiny teacher; seconds)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from benchutil import emit, header, photo_folder, save_random_teacher
from deitpipe.pipeline.config import LabelConfig
from deitpipe.pipeline.label import label_teacher
from deitpipe.teacher.labelling import image_views
from deitpipe.shards.format import schema
from deitpipe.shards.inputs import Source, read_bytes, resolve_source
from deitpipe.teacher import Preprocessing, build_teacher, predict_probs, summarize_probs


def local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def subset_folder(source: Source, count: int, dest: Path) -> Path:
    """An ImageFolder of the first ``count`` inputs of ``source`` (links to files, or written bytes)."""
    if count > len(source.candidates):
        raise SystemExit(f"--images {count // 2} needs {count} inputs; the data has {len(source.candidates)}")
    for i, cand in enumerate(source.candidates[:count]):
        d = dest / source.class_names[cand.label]
        d.mkdir(parents=True, exist_ok=True)
        name = f"{i:06d}-{Path(cand.path).name}"
        if cand.kind == "file":
            os.symlink(os.path.abspath(cand.ref), d / name)
        else:
            (d / f"{name}.png").write_bytes(read_bytes(cand))
    return dest


class ViewsDataset(Dataset):
    """Per image: the teacher's views, cut as label-teacher's decode tasks cut them."""

    def __init__(self, source: Source, *, views: int, seed: int, prep: Preprocessing) -> None:
        self.cands, self.views, self.seed, self.prep = source.candidates, views, seed, prep

    def __len__(self) -> int:
        return len(self.cands)

    def __getitem__(self, i: int) -> torch.Tensor:
        _, pixels = image_views(read_bytes(self.cands[i]), key=schema.sample_key(i), seed=self.seed,
                                views=self.views, prep=self.prep)
        return torch.from_numpy(pixels)  # (V+1, 3, S, S) uint8


def plain_run(data: str, args: argparse.Namespace, weights: Path) -> dict:
    """Label ``data`` with the plain loop; returns seconds and the time of the first batch."""
    start = time.perf_counter()
    model, info = build_teacher(args.teacher, weights_path=weights)
    model = model.to(memory_format=torch.channels_last).eval()
    index_dtype = schema.class_dtype(info.num_classes)
    source = resolve_source(data, image_size=args.image_size)
    dataset = ViewsDataset(source, views=args.views, seed=0, prep=info.preprocessing)
    loader = DataLoader(dataset, batch_size=max(1, args.batch_size // (args.views + 1)),
                        num_workers=args.workers, persistent_workers=False)
    first, labelled = None, 0
    for pixels in loader:  # (B, V+1, 3, S, S)
        b, v = pixels.shape[:2]
        probs = predict_probs(model, pixels.reshape(b * v, *pixels.shape[2:]), info.preprocessing,
                              device="cpu", batch_size=args.batch_size)
        summarize_probs(probs, topk=args.topk, full_softmax=False, index_dtype=index_dtype)
        labelled += b
        if first is None:
            first = (time.perf_counter(), labelled)
    end = time.perf_counter()
    return {"seconds": end - start, "images": labelled,
            "steady_img_s": (labelled - first[1]) / (end - first[0]) if labelled > first[1] else None}


def ray_run(data: str, out: Path, args: argparse.Namespace, weights: Path, launcher: str = "ray") -> dict:
    """Label ``data`` with label-teacher into ``out`` with ``launcher`` (Ray already running)."""
    config = LabelConfig(data=data, out=str(out), teacher=args.teacher, teacher_weights=str(weights),
                         views=args.views, topk=args.topk, shard_size=args.shard_size,
                         batch_size=args.batch_size, image_size=args.image_size, progress=False,
                         device="cpu", overwrite=True, launcher=launcher)
    start = time.perf_counter()
    manifest = label_teacher(config)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": manifest["inputs"]["labelled"],
            "reported_seconds": manifest["run"]["seconds"]}


def summary(method: str, small: dict, big: dict, n: int) -> dict:
    delta = big["seconds"] - small["seconds"]
    row = {"method": method, "images": big["images"], "seconds_n": small["seconds"],
           "seconds_2n": big["seconds"], "end_to_end_img_s": big["images"] / big["seconds"],
           "marginal_img_s": n / delta if delta > 0 else None}  # None: t(2N) <= t(N), raise --images
    if "steady_img_s" in big:
        row["steady_img_s"] = big["steady_img_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="photos",
                        help="photos (generated JPEGs, ImageNet-like), digits, or an ImageFolder path")
    parser.add_argument("--images", type=int, default=128, help="N; runs over N and 2N inputs")
    parser.add_argument("--image-size", type=int, default=300,
                        help="short side of generated photos, or the digits render size")
    parser.add_argument("--teacher", default="regnet_y_1_6gf")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--crop", type=int, default=None,
                        help="teacher input size (default: that of its published weights, 224)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="views per teacher forward")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=local_cpus(), help="plain loop's DataLoader workers")
    parser.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="tiny settings that run in seconds")
    args = parser.parse_args()
    if args.quick:
        args.data, args.images, args.image_size, args.teacher = "digits", 8, 32, "regnet_y_400mf"
        args.crop, args.views, args.batch_size, args.num_classes = 32, 2, 12, 10

    import ray

    from deitpipe.pipeline.raysession import ray_session

    torch.set_num_threads(local_cpus())  # what label-teacher's CPU teacher actor sets
    header(ray=ray.__version__, data=args.data, teacher=args.teacher, views=args.views,
           batch_views=args.batch_size, workers=args.workers)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-label-"))
    try:
        crop = {} if args.crop is None else {"crop": args.crop, "resize": args.crop}
        weights = save_random_teacher(work / "teacher", args.teacher, num_classes=args.num_classes, **crop)
        spec = args.data
        if spec == "photos":
            spec = str(photo_folder(work / "photos", images=2 * args.images, size=args.image_size))
        source = resolve_source(spec, image_size=args.image_size)
        n = args.images
        warm = max(1, args.batch_size // (args.views + 1))  # one teacher batch
        sets = {}
        counts = {"warmup": warm, "n": n, "2n": 2 * n}
        for name, count in counts.items():
            shutil.rmtree(work / f"in-{name}", ignore_errors=True)
            sets[name] = str(subset_folder(source, count, work / f"in-{name}"))
        start = time.perf_counter()
        with ray_session(None):
            ray_init = time.perf_counter() - start
            runs = {"plain": {}, "local": {}, "ray": {}}
            # A first pass over one batch pays one-off costs (imports in Ray's worker pool, page
            # cache, oneDNN kernel selection); it is reported but not counted.
            for name in counts:  # interleaved, so drift in machine load hits both
                runs["plain"][name] = plain_run(sets[name], args, weights)
                runs["local"][name] = ray_run(sets[name], work / f"local-{name}", args, weights, launcher="local")
                runs["ray"][name] = ray_run(sets[name], work / f"out-{name}", args, weights)
        rows = {m: summary(m, r["n"], r["2n"], n) for m, r in runs.items()}
        rows["ray"]["ray_init_s"] = ray_init
        for method, row in rows.items():
            row["warmup_s"] = runs[method]["warmup"]["seconds"]
        for row in rows.values():
            emit(row)
        plain_row = rows["plain"]
        for method in ("local", "ray"):
            row = rows[method]
            ratio = (row["marginal_img_s"] / plain_row["marginal_img_s"]
                     if row["marginal_img_s"] and plain_row["marginal_img_s"] else None)
            emit({"launcher": method, "ratio_marginal": ratio,
                  "ratio_end_to_end": row["end_to_end_img_s"] / plain_row["end_to_end_img_s"],
                  "goal": 0.9, "images": 2 * n, "views": args.views})
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
