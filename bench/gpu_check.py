"""The prepared GPU check: DeiT training throughput in memory and from shards, offline vs online.

Every row trains through the library's own pieces (``create_student``, ``build_optimizer``,
``DistillationLoss``, ``MixupCutmix``, ``train_one_epoch``; shards through
``student.trainer.train_loader``) with the full DeiT recipe: batch 256, bfloat16 autocast on
CUDA, ``torch.compile``, RandAugment m9 mstd0.5, random erasing 0.25, mixup 0.8 / cutmix 1.0,
label smoothing 0.1, hard distillation. Rows, most important first (lower ones are skipped with
a note when ``--budget-s`` would be exceeded):

    s_memory         DeiT-S on batches already on the device (the model alone)
    s_gpu_loader     DeiT-S from shards, ``--loader gpu``: workers read bytes, the device
                     decodes, cuts and augments (= the offline row of the comparison below)
    teacher_alone    the live teacher (random-init regnet_y_16gf, bf16, channels-last) alone,
                     through ``pipeline.launch.online_teacher_fn``, on the same batch size
    s_online         DeiT-S from the same shards and loader with that teacher run on each batch
    ti_memory, ti_gpu_loader                DeiT-Ti, as the DeiT-S rows
    s_cpu_loader, ti_cpu_loader             from shards, ``--loader cpu`` (DataLoader workers
                                            decode, cut and augment; workers = CPUs - 1)

The shards are synthetic, in the label-teacher format (schema 2, written with the library's
writer): photo-like 500x375 JPEGs at quality 90, 1,000 classes, 8 stored views with their
boxes and flips, random teacher top-10; a pool of distinct JPEGs cycles over the samples, and
the loaders cycle the shards for as many steps as a row needs.

Timing: a row warms up first (compiling, on a loader of its own kind when it reads shards), then
starts a fresh loader, lets its first wave of batches through untimed (every worker delivers its
first batch at about the same time) and times ``--steps`` steps between two synchronisations.
So a loader that is slower than the model cannot hide behind batches it buffered while the
model compiled. Reported: img/s, step ms, achieved TFLOP/s and MFU of the student

    MFU = images/s * 3 * forward FLOPs per image / peak dense bf16 FLOP/s

(forward FLOPs from ``student.model.flops_per_image``; the peak from the device name or
``--peak-tflops``). The summary's goals: from shards with ``--loader gpu`` >= 0.9x in-memory
for DeiT-S and >= 0.8x for DeiT-Ti, compiled, on an H100/H200; offline vs online >= 0.9x the
ideal speed-up (t_student + t_teacher) / t_student, t_student the offline row's step and
t_teacher the teacher's step measured alone.

Output: progress on stderr; one JSON line per row on stdout (also appended to
``$OUT/gpu_check.jsonl`` when ``OUT`` is set), and a final ``"summary"`` line with every ratio
beside its goal. Ray is never imported (``pipeline.launch`` imports it only inside its Ray
launcher); the shard rows need webdataset and are skipped with the reason without it.

Run: bash bench/gpu_check.sh                           (see its header; about 4 to 5 minutes)
     python bench/gpu_check.py --quick --device cpu    (code paths only: tiny model and data)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from deitpipe.student.config import TrainConfig
from deitpipe.student.engine import MixupCutmix, train_one_epoch
from deitpipe.student.loss import DistillationLoss
from deitpipe.student.model import create_student, flops_per_image
from deitpipe.student.optim import build_optimizer, scaled_lr

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; first match wins.
PEAKS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
VARIANTS = {"s": "deit_small_distilled_patch16_224", "ti": "deit_tiny_distilled_patch16_224"}
ROWS = ("s_memory", "s_gpu_loader", "teacher_alone", "s_online", "ti_memory", "ti_gpu_loader",
        "s_cpu_loader", "ti_cpu_loader")
# Rough seconds of a row at full settings once its model is compiled, for the budget; a model's
# first row adds its compilation (measured on the first model, guessed before).
ROW_COST_S = {"memory": 10, "gpu": 25, "teacher": 20, "online": 35, "cpu": 35}
COMPILE_GUESS_S = 90.0
GOALS = (("s_gpu_over_memory", 0.9), ("ti_gpu_over_memory", 0.8), ("offline_speedup_over_ideal", 0.9))
NUM_VIEWS, TOPK = 8, 10
START = time.perf_counter()  # budgets count from here (after the imports: a few seconds)


class HardLimit(Exception):
    """Raised by the alarm at --hard-limit-s, so the summary is still written."""


def log(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


class Recorder:
    """Emits JSON lines to stdout and, when ``OUT`` is set, to ``$OUT/gpu_check.jsonl``; keeps rows."""

    def __init__(self) -> None:
        out = os.environ.get("OUT")
        self.path = Path(out) / "gpu_check.jsonl" if out else None
        self.rows: dict[str, dict] = {}

    def emit(self, record: dict) -> None:
        line = json.dumps(_rounded(record))
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        if "row" in record:
            self.rows[record["row"]] = record


def _rounded(value):
    """Floats to 4 decimals, inside dicts and lists too, for reading."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The peak to divide by, and where it came from."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAKS:
        if key in name:
            return value, f"{key} (from device name {name!r})"
    return None, f"unknown device {name!r}; pass --peak-tflops"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _jpeg(task: tuple[int, int, int]) -> bytes:
    from benchutil import photo_jpeg

    seed, height, width = task
    return photo_jpeg(np.random.default_rng(seed), height=height, width=width, quality=90)


def write_shards(out: Path, *, shards: int, per_shard: int, distinct: int, height: int, width: int,
                 num_classes: int, processes: int) -> dict:
    """Synthetic label-teacher shards (schema 2): real view boxes and flips, random teacher top-k.

    Returns:
        train_loader's ``info`` ("urls", "num_classes", "views", "samples") plus "jpeg_bytes".
    """
    from deitpipe.shards.format import schema
    from deitpipe.shards.format.views import global_box, random_view_boxes
    from deitpipe.shards.format.writer import ShardFileWriter, encode_sample

    tasks = [(seed, height, width) for seed in range(distinct)]
    if processes > 1 and distinct > 16:
        with ProcessPoolExecutor(max_workers=processes) as pool:
            jpegs = list(pool.map(_jpeg, tasks, chunksize=4))
    else:
        jpegs = [_jpeg(t) for t in tasks]
    rng = np.random.default_rng(0)
    g = np.asarray([global_box(height=height, width=width, resize=232, crop=224)], dtype=schema.BOX_DTYPE)
    urls = []
    for shard in range(shards):
        with ShardFileWriter(out, schema.shard_name(shard)) as writer:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                key = schema.sample_key(index)
                boxes, flips = random_view_boxes(seed=0, key=key, num_views=NUM_VIEWS, height=height, width=width)
                start = rng.integers(0, num_classes, (NUM_VIEWS + 1, 1))
                topk = (start + 7 * np.arange(TOPK)) % num_classes  # distinct classes per view
                prob = np.sort(rng.random((NUM_VIEWS + 1, TOPK)), axis=1)[:, ::-1]
                prob = 0.9 * prob / prob.sum(1, keepdims=True)
                views = {"box": np.concatenate([g, boxes]), "flip": np.concatenate([[0], flips]),
                         "hard": topk[:, 0], "topk": topk, "prob": prob, "rest": np.full(NUM_VIEWS + 1, 0.1)}
                writer.write(encode_sample(
                    key=key, image_bytes=jpegs[index % distinct], image_ext="jpg", label=index % num_classes,
                    meta={"path": f"synthetic/{index}", "height": height, "width": width}, views=views,
                    num_classes=num_classes, schema_version=2))
        urls.append(str(writer.path))
    return {"urls": urls, "num_classes": num_classes, "views": NUM_VIEWS, "samples": shards * per_shard,
            "jpeg_bytes": float(np.mean([len(j) for j in jpegs]))}


@dataclass
class Student:
    """One variant's model, its compiled form and optimizer, reused by all of its rows."""

    key: str
    cfg: TrainConfig
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: DistillationLoss
    compiled: bool
    warm: bool = False  # compiled (or failed to) already


def build_student(key: str, cfg: TrainConfig, device: torch.device, num_classes: int) -> Student:
    torch.manual_seed(cfg.seed)
    model = create_student(cfg.model, num_classes=num_classes, **cfg.model_overrides()).to(device)
    optimizer = build_optimizer(model, lr=scaled_lr(cfg.lr, cfg.batch_size), weight_decay=cfg.weight_decay)
    loss_fn = DistillationLoss(distillation=cfg.distillation, alpha=cfg.alpha, tau=cfg.tau,
                               label_smoothing=cfg.label_smoothing)
    net = torch.compile(model) if cfg.compile else model
    return Student(key, cfg, model, net, optimizer, loss_fn, compiled=cfg.compile)


def memory_batches(count: int, *, batch: int, size: int, num_classes: int, device: torch.device) -> list[dict]:
    """Batches as the loaders yield them (normalised float images, labels, teacher probs), on the device."""
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        out.append({"image": ((pixels.float() / 255 - 0.45) / 0.225).to(device),
                    "label": torch.randint(0, num_classes, (batch,), generator=g).to(device),
                    "teacher": (3 * torch.randn(batch, num_classes, generator=g)).softmax(-1).to(device)})
    return out


def measure(st: Student, args: argparse.Namespace, device: torch.device, *, warm: Callable[[], Iterable[dict]],
            timed: Callable[[], Iterable[dict]], skip: int, teacher: Callable | None = None) -> dict:
    """Warm up, then time ``args.steps`` steps of a fresh source after ``skip`` untimed ones."""
    autocast = torch.bfloat16 if args.bf16 and device.type == "cuda" else None
    mixup = MixupCutmix(st.model.num_classes, mixup_alpha=st.cfg.mixup, cutmix_alpha=st.cfg.cutmix,
                        switch_prob=st.cfg.mixup_switch, seed=st.cfg.seed)
    extra: dict = {}

    def run(source: Iterable[dict], n: int) -> dict:
        return train_one_epoch(st.net, st.loss_fn, itertools.islice(source, n), st.optimizer, device=device,
                               autocast_dtype=autocast, online_teacher=teacher, mixup=mixup)

    begin = time.perf_counter()
    try:
        run(warm(), args.warmup)
    except Exception as error:  # a compiler that fails is a finding; the rows go on eager
        if not st.compiled or isinstance(error, HardLimit):
            raise
        first_line = (str(error).splitlines() or [""])[0][:300]
        extra["compile_error"] = f"{type(error).__name__}: {first_line}"
        log(f"{st.key}: compilation failed ({extra['compile_error']}); eager from here on")
        st.net, st.compiled = st.model, False
        run(warm(), args.warmup)
    sync(device)
    st.warm = True
    warmup_s = time.perf_counter() - begin
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    source = iter(timed())
    run(source, skip)  # the loader's first wave: every worker's first batch at once
    sync(device)
    start = time.perf_counter()
    stats = run(source, args.steps)  # ends by reading the loss: synchronised
    seconds = time.perf_counter() - start
    if hasattr(source, "close"):
        source.close()  # a DeviceBatches generator: stops its DataLoader's workers
    del source
    img_s = stats["steps"] * st.cfg.batch_size / seconds
    flops = 3 * flops_per_image(st.model.config) * img_s
    peak, _ = peak_tflops(device, args.peak_tflops)
    return {"model": st.cfg.model, "compiled": st.compiled, "bf16": autocast is not None,
            "batch": st.cfg.batch_size, "warmup_steps": args.warmup, "skip_steps": skip,
            "steps": int(stats["steps"]), "img_s": img_s, "step_ms": 1000 * seconds / max(stats["steps"], 1),
            "achieved_tflops": flops / 1e12, "mfu": flops / (peak * 1e12) if peak else None,
            "warmup_s": warmup_s, "timed_s": seconds, "loss": stats.get("loss"),
            "max_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            **extra}


def memory_row(st: Student, args: argparse.Namespace, device: torch.device, num_classes: int) -> dict:
    batches = memory_batches(4, batch=st.cfg.batch_size, size=st.model.config.img_size, num_classes=num_classes,
                             device=device)
    fig = measure(st, args, device, warm=lambda: itertools.cycle(batches), timed=lambda: itertools.cycle(batches),
                  skip=0)
    return {"data": "memory", "loader": None, **fig}


def loader_row(st: Student, args: argparse.Namespace, device: torch.device, info: dict, *, kind: str,
               teacher: Callable | None = None, mode: str = "views") -> dict:
    """From shards through ``train_loader`` (``kind`` "gpu" or "cpu"), optionally with a live teacher."""
    from deitpipe.student.trainer import train_loader

    cfg = replace(st.cfg, loader=kind)
    workers = cfg.loader_workers
    skip = args.skip if args.skip is not None else (workers + 1 if workers else 1)

    def loader(epoch: int, steps: int) -> Iterable[dict]:
        return train_loader(cfg, info, mode, img_size=st.model.config.img_size, epoch=epoch, rank=0, world=1,
                            steps=steps, device=device)

    fig = measure(st, args, device, warm=lambda: loader(0, args.warmup),
                  timed=lambda: loader(1, skip + args.steps), skip=skip, teacher=teacher)
    return {"data": "shards", "loader": kind, "loader_workers": workers, "teacher_labels": mode, **fig}


def build_teacher_fn(args: argparse.Namespace, device: torch.device, num_classes: int, workdir: Path):
    """``pipeline.launch.online_teacher_fn`` over random-init weights saved with their sidecar."""
    import deitpipe.pipeline.launch as launch
    from benchutil import save_random_teacher

    path = save_random_teacher(workdir / "teacher", args.teacher, num_classes=num_classes)
    cfg = TrainConfig(online_teacher=args.teacher, teacher_weights=str(path))
    teach = launch.online_teacher_fn(cfg, num_classes, device)
    ray_loaded = any(m == "ray" or m.startswith("ray.") for m in sys.modules)
    return teach, ray_loaded


def teacher_row(teach: Callable, args: argparse.Namespace, device: torch.device, *, batch: int, size: int) -> dict:
    """The live teacher's step alone (bf16 autocast and channels-last, as online_teacher_fn runs it)."""
    images = memory_batches(1, batch=batch, size=size, num_classes=2, device=device)[0]["image"]
    reps = max(2, args.steps // 8)
    begin = time.perf_counter()
    for _ in range(3):
        teach(images)
    sync(device)
    warmup_s = time.perf_counter() - begin
    start = time.perf_counter()
    for _ in range(reps):
        teach(images)
    sync(device)
    seconds = time.perf_counter() - start
    return {"teacher": args.teacher, "batch": batch, "steps": reps, "img_s": reps * batch / seconds,
            "step_ms": 1000 * seconds / reps, "warmup_s": warmup_s}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summary(rows: dict[str, dict], device: torch.device, args: argparse.Namespace) -> dict:
    """Every ratio beside its goal; ``conditions`` says whether this run is one the goals speak of."""
    img = {name: row.get("img_s") for name, row in rows.items()}
    values = {
        "s_gpu_over_memory": ratio(img.get("s_gpu_loader"), img.get("s_memory")),
        "ti_gpu_over_memory": ratio(img.get("ti_gpu_loader"), img.get("ti_memory")),
        "s_cpu_over_memory": ratio(img.get("s_cpu_loader"), img.get("s_memory")),
        "ti_cpu_over_memory": ratio(img.get("ti_cpu_loader"), img.get("ti_memory")),
    }
    t_s = rows.get("s_gpu_loader", {}).get("step_ms")
    t_t = rows.get("teacher_alone", {}).get("step_ms")
    measured = ratio(img.get("s_gpu_loader"), img.get("s_online"))
    ideal = (t_s + t_t) / t_s if t_s and t_t else None
    values.update(t_student_ms=t_s, t_teacher_ms=t_t, offline_img_s=img.get("s_gpu_loader"),
                  online_img_s=img.get("s_online"),
                  offline_speedup=measured, ideal_speedup=ideal, offline_speedup_over_ideal=ratio(measured, ideal))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    compiled = all(r.get("compiled", True) for r in rows.values() if "img_s" in r and "model" in r)
    conditions = {"h100_or_h200": "H100" in name or "H200" in name, "compiled": compiled and args.compile,
                  "bf16": args.bf16 and device.type == "cuda", "batch_256": args.batch_size == 256,
                  "full_settings": not args.quick}
    goals = [{"name": key, "value": values[key], "goal": goal,
              "met": None if values[key] is None else values[key] >= goal} for key, goal in GOALS]
    goals.append({"name": "cpu_loader_no_regression_on_cpu_machines", "value": None, "goal": None, "met": None,
                  "note": "a CPU-machine goal: measure with bench/loader_cost.py there; the cpu loader rows here "
                          "are GPU-machine figures"})
    return {"summary": True, "device": name, "conditions": conditions, "conditions_met": all(conditions.values()),
            "ratios": values, "goals": goals, "mfu": {k: r.get("mfu") for k, r in rows.items() if "mfu" in r},
            "skipped": {k: r["skipped"] for k, r in rows.items() if "skipped" in r},
            "errors": {k: r["error"] for k, r in rows.items() if "error" in r},
            "elapsed_s": elapsed(), "budget_s": args.budget_s}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 150; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, compiling (default 10)")
    parser.add_argument("--skip", type=int, default=None, help="untimed steps of each timed loader "
                        "(default: loader workers + 1, its first wave)")
    parser.add_argument("--compile", choices=["on", "off"], default=None, help="torch.compile the students "
                        "(default on; off with --quick)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16 autocast")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--teacher", default=None, help="live teacher (default regnet_y_16gf; regnet_y_400mf "
                        "with --quick)")
    parser.add_argument("--loader-workers", type=int, default=None, help="default: CPUs - 1 (train_loader's)")
    parser.add_argument("--shards", type=int, default=None, help="shards to write (default 48)")
    parser.add_argument("--per-shard", type=int, default=128, help="samples per shard")
    parser.add_argument("--distinct-jpegs", type=int, default=384, help="distinct JPEGs cycled over the samples")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the device")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip rows that would end past this "
                        "(seconds since start, compilation included)")
    parser.add_argument("--hard-limit-s", type=float, default=330.0, help="stop the row in progress here and "
                        "write the summary")
    parser.add_argument("--quick", action="store_true", help="tiny model, images and steps: only the code paths")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (2 if quick else 150)
    args.warmup = args.warmup or (1 if quick else 10)
    args.compile = (args.compile or ("off" if quick else "on")) == "on"
    args.teacher = args.teacher or ("regnet_y_400mf" if quick else "regnet_y_16gf")
    args.shards = args.shards or (3 if quick else 48)
    if quick:
        args.batch_size, args.per_shard, args.distinct_jpegs = 4, 4, 4
        args.loader_workers = args.loader_workers if args.loader_workers is not None else 1
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    return args


class Check:
    """The rows in order of importance, sharing one set of shards, students and teacher."""

    def __init__(self, args: argparse.Namespace, device: torch.device, rec: Recorder, work: Path) -> None:
        self.args, self.device, self.rec, self.work = args, device, rec, work
        self.cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        self.workers = args.loader_workers if args.loader_workers is not None else max(1, self.cpus - 1)
        quick = dict(img_size=32, patch_size=8, depth=1) if args.quick else {}
        self.configs = {k: TrainConfig(model=name, batch_size=args.batch_size, compile=args.compile,
                                       loader_workers=self.workers, shards="synthetic", out="unused", **quick)
                        for k, name in VARIANTS.items()}
        self.students: dict[str, Student] = {}
        self.info: dict | None = None
        self.teach: Callable | None = None
        self.ray_imported: bool | None = None
        self.import_error: str | None = None  # the shard reader's, once a row met it
        self.stopped: str | None = None
        self.compile_s = COMPILE_GUESS_S if args.compile and not args.quick else 0.0

    def header(self) -> dict:
        versions = {}
        for module in ("torchvision", "timm", "PIL", "webdataset"):
            try:
                versions[module] = __import__(module).__version__
            except Exception as error:  # noqa: BLE001 - recorded; the rows that need it say so
                versions[module] = f"missing ({type(error).__name__})"
        peak, source = peak_tflops(self.device, self.args.peak_tflops)
        gflops = {k: flops_per_image(create_student(c.model, num_classes=self.args.num_classes,
                                                    **c.model_overrides()).config) / 1e9
                  for k, c in self.configs.items()}
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.machine()
        return {"header": True, "torch": torch.__version__, "cuda": torch.version.cuda,
                "python": platform.python_version(), **versions, "cpus": self.cpus, "loader_workers": self.workers,
                "device": name, "peak_tflops": peak, "peak_source": source, "budget_s": self.args.budget_s,
                "quick": self.args.quick, "forward_gflops_per_image": gflops}

    def shards(self) -> dict:
        if self.info is None:
            args = self.args
            height, width = (48, 64) if args.quick else (375, 500)
            log(f"writing {args.shards} shards x {args.per_shard} samples ({args.distinct_jpegs} distinct "
                f"{width}x{height} JPEGs, quality 90)")
            begin = time.perf_counter()
            info = write_shards(self.work / "shards", shards=args.shards, per_shard=args.per_shard,
                                distinct=args.distinct_jpegs, height=height, width=width,
                                num_classes=args.num_classes, processes=self.cpus)
            self.rec.emit({"shards": len(info["urls"]), "samples": info["samples"], "views": NUM_VIEWS,
                           "jpeg": f"{width}x{height} q90", "jpeg_bytes_mean": info.pop("jpeg_bytes"),
                           "write_s": time.perf_counter() - begin})
            self.info = info
        return self.info

    def student(self, key: str) -> Student:
        if key not in self.students:
            self.students[key] = build_student(key, self.configs[key], self.device, self.args.num_classes)
        return self.students[key]

    def teacher(self) -> Callable:
        if self.teach is None:
            self.teach, self.ray_imported = build_teacher_fn(self.args, self.device, self.args.num_classes,
                                                             self.work)
        return self.teach

    def online_mode(self) -> str:
        from deitpipe.pipeline.train import teacher_labels_mode  # what train-student reads with a live teacher

        return teacher_labels_mode(replace(self.configs["s"], online_teacher=self.args.teacher), NUM_VIEWS)

    def job(self, name: str) -> tuple[str, str | None, Callable[[], dict]]:
        """(kind for the budget, student key or None, the row's measurement)."""
        args, device = self.args, self.device
        key, _, what = name.partition("_")
        if name == "teacher_alone":
            return "teacher", None, lambda: teacher_row(self.teacher(), args, device, batch=args.batch_size,
                                                        size=self.student("s").model.config.img_size)
        if name == "s_online":
            return "online", "s", lambda: {
                **loader_row(self.student("s"), args, device, self.shards(), kind="gpu", teacher=self.teacher(),
                             mode=self.online_mode()),
                "teacher": args.teacher, "ray_imported": self.ray_imported, "mfu_counts": "the student only"}
        if what == "memory":
            return "memory", key, lambda: memory_row(self.student(key), args, device, args.num_classes)
        kind = what.split("_")[0]  # gpu_loader, cpu_loader
        return kind, key, lambda: loader_row(self.student(key), args, device, self.shards(), kind=kind)

    def skip_reason(self, name: str, kind: str, key: str | None) -> str | None:
        """Why a row is not run, or None: not selected, a reader piece missing, or over the budget."""
        if name not in self.args.rows:
            return "not selected (--rows)"
        if kind != "memory" and self.import_error:
            return f"needs the shard reader: {self.import_error}"
        if name == "s_online" and "teacher_alone" in self.args.rows and self.teach is None:
            return "teacher_alone did not run, so there is no teacher to run online"
        cost = 0.0 if self.args.quick else ROW_COST_S[kind]  # quick rows take about a second
        if key is not None and not (key in self.students and self.students[key].warm):
            cost += self.compile_s
        if elapsed() + cost > self.args.budget_s:
            return (f"would end near {elapsed() + cost:.0f}s, past --budget-s {self.args.budget_s:.0f} "
                    f"({elapsed():.0f}s spent)")
        return None

    def run_row(self, name: str) -> dict:
        kind, key, job = self.job(name)
        reason = self.skip_reason(name, kind, key)
        if reason:
            return {"row": name, "skipped": reason}
        log(f"{name}: start")
        begin = time.perf_counter()
        first = key is not None and not (key in self.students and self.students[key].warm)
        try:
            record = {"row": name, **job(), "row_s": time.perf_counter() - begin}
        except HardLimit as error:
            self.stopped = str(error)
            return {"row": name, "error": f"HardLimit: {error}"}
        except ImportError as error:  # webdataset (or another reader piece) missing on a bare image
            self.import_error = f"{type(error).__name__}: {error}"
            return {"row": name, "skipped": self.import_error}
        except Exception as error:  # noqa: BLE001 - one row's failure is a finding; the others still run
            return {"row": name, "error": f"{type(error).__name__}: {str(error)[:400]}"}
        if first and self.args.compile and not self.args.quick:
            self.compile_s = record["warmup_s"]  # the next model compiles in about as long
        return record

    def run(self) -> None:
        self.rec.emit(self.header())
        for name in ROWS:
            if self.stopped:
                record = {"row": name, "skipped": f"not run: {self.stopped}"}
            else:
                record = self.run_row(name)
            self.rec.emit(record)
            if "row_s" in record:
                log(f"{name}: {record.get('img_s', 0):.1f} img/s in {record['row_s']:.0f}s")
            else:
                log(f"{name}: {record.get('skipped') or record.get('error')}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rec = Recorder()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU (torch.cuda.is_available() is False); "
                             "pass --device cpu for the code paths")
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast
        torch.backends.cudnn.allow_tf32 = True

    def on_alarm(*_):
        raise HardLimit(f"--hard-limit-s {args.hard_limit_s:.0f} reached")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(max(1, int(args.hard_limit_s - elapsed())))
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
            Check(args, device, rec, Path(work)).run()
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
        rec.emit(summary(rec.rows, device, args))
        log(f"done in {elapsed():.0f}s")


if __name__ == "__main__":
    main()
