"""DeiT training throughput and MFU on one GPU, through the library's own training step.

DeiT-S (distilled) trains for ``--steps`` steps on synthetic in-memory batches (random images,
labels and teacher distributions, already on the device, so the loader costs nothing) with
``train_one_epoch`` under bfloat16 autocast, eager and/or ``torch.compile``d. It reports
images/s and the model FLOPs utilisation

    MFU = images/s * 3 * forward FLOPs per image / peak dense bf16 FLOP/s

(training = forward + backward ~ 3 forwards; forward FLOPs from
``deitpipe.student.model.flops_per_image``; the peak from the device name, or ``--peak-tflops``).

The in-memory run needs only torch (and numpy) and deitpipe's student modules. The shards run
(``--data shards|both``) writes synthetic shards in the label-teacher format and trains from them
through train-student's loader (``ShardReplay`` + DataLoader workers), as train-student does:
it needs torchvision, Pillow and webdataset, and is skipped with a note when one is missing.
Prints progress on stderr and JSON lines on stdout; stays under about 4 minutes on an H100
(compilation included), skipping the compiled run when ``--budget-s`` would be exceeded.

Run: bash bench/gpu_check.sh                         (installs deitpipe if needed, then this)
     python bench/gpu_check.py --quick --device cpu  (code paths only, tiny)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable

import torch

from deitpipe.student.engine import train_one_epoch
from deitpipe.student.loss import DistillationLoss
from deitpipe.student.model import create_student, flops_per_image
from deitpipe.student.optim import build_optimizer, scaled_lr

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; first match wins.
PEAKS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)


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


def synthetic_batches(count: int, *, batch: int, size: int, num_classes: int, device: torch.device) -> list[dict]:
    """Batches as the shard loader yields them (normalised float images, labels, teacher probs)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        out.append({
            "image": ((pixels.float() / 255 - 0.45) / 0.225).to(device),
            "label": torch.randint(0, num_classes, (batch,), generator=g).to(device),
            "teacher": (3 * torch.randn(batch, num_classes, generator=g)).softmax(-1).to(device),
        })
    return out


def shard_loader(args: argparse.Namespace, device: torch.device, *, size: int, workdir: str) -> Iterable[dict]:
    """Synthetic shards in the label-teacher format (photo-like JPEGs, random teacher outputs),
    replayed by train-student's loader: decode, cut the stored view, RandAugment, erasing."""
    import numpy as np
    from torch.utils.data import DataLoader

    from benchutil import photo_jpeg, write_synthetic_shards  # needs webdataset and Pillow
    from deitpipe.student.data import Augment, ShardReplay

    rng = np.random.default_rng(0)
    side = max(size + size // 7, 32)  # a short side like ImageNet's, a little above the crop
    log(f"shards: writing {args.shard_images} JPEGs of {side}x{side * 4 // 3}")
    jpegs = [photo_jpeg(rng, height=side, width=side * 4 // 3) for _ in range(args.shard_images)]
    urls = write_synthetic_shards(workdir, images=jpegs, labels=[i % args.num_classes for i in range(len(jpegs))],
                                  num_classes=args.num_classes, views=4, shard_size=64)
    workers = args.loader_workers if args.loader_workers is not None else max(1, (os.cpu_count() or 2) - 1)
    log(f"shards: {len(urls)} shards, {workers} loader workers")
    dataset = ShardReplay(urls=urls, num_classes=args.num_classes, num_views=4, teacher_labels="views",
                          img_size=size, batch_size=args.batch_size, steps=args.warmup + args.steps,
                          augment=Augment())
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=workers,
                      pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(compiled: bool, args: argparse.Namespace, device: torch.device, batches: list[dict] | None = None,
        loader: Iterable[dict] | None = None) -> dict:
    """Build, warm up (compiling if asked), then time ``args.steps`` steps; returns the figures.

    Batches come from ``batches`` (in memory, cycled) or from ``loader`` (the shard loader, which
    yields the warm-up and the timed steps).
    """
    torch.manual_seed(0)
    model = create_student(args.model, num_classes=args.num_classes, **args.overrides).to(device)
    optimizer = build_optimizer(model, lr=scaled_lr(5e-4, args.batch_size), weight_decay=0.05)
    loss_fn = DistillationLoss(distillation="hard", alpha=0.5, label_smoothing=0.1)
    net = torch.compile(model) if compiled else model
    autocast = torch.bfloat16 if args.bf16 else None
    tag = ("compiled" if compiled else "eager") + ("" if loader is None else ", from shards")
    source = iter(loader) if loader is not None else itertools.cycle(batches)

    def steps(n: int):
        return itertools.islice(source, n)

    def progress(step: int, _: dict) -> None:
        if step % args.log_every == 0:
            log(f"{tag}: step {step}/{args.steps}")

    start = time.perf_counter()
    log(f"{tag}: warm-up, {args.warmup} steps" + (" (compiling)" if compiled else ""))
    train_one_epoch(net, loss_fn, steps(args.warmup), optimizer, device=device, autocast_dtype=autocast)
    sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(f"{tag}: warm-up took {warmup_s:.1f}s; timing {args.steps} steps")
    start = time.perf_counter()
    stats = train_one_epoch(net, loss_fn, steps(args.steps), optimizer, device=device,
                            autocast_dtype=autocast, progress=progress)
    sync(device)
    seconds = time.perf_counter() - start
    img_s = stats["steps"] * args.batch_size / seconds
    flops = 3 * flops_per_image(model.config) * img_s
    peak, _ = peak_tflops(device, args.peak_tflops)
    return {"mode": tag, "data": "memory" if loader is None else "shards", "model": args.model, "batch": args.batch_size, "steps": int(stats["steps"]),
            "bf16": args.bf16, "img_s": img_s, "step_ms": 1000 * seconds / stats["steps"],
            "achieved_tflops": flops / 1e12, "mfu": flops / (peak * 1e12) if peak else None,
            "warmup_s": warmup_s, "loss": stats["loss"],
            "max_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_distilled_patch16_224")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation happens here)")
    parser.add_argument("--compile", default="both", choices=["off", "on", "both"])
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16 autocast")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the device")
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip the compiled run past this")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--data", default="both", choices=["memory", "shards", "both"],
                        help="in-memory batches (the model alone), synthetic shards through train-student's "
                             "loader (end to end), or both")
    parser.add_argument("--shard-images", type=int, default=2048, help="images in the synthetic shards")
    parser.add_argument("--loader-workers", type=int, default=None, help="default: all CPUs but one")
    parser.add_argument("--quick", action="store_true", help="tiny settings: only the code paths run")
    args = parser.parse_args()
    args.overrides = {}
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.log_every, args.shard_images = 2, 2, 1, 1, 8
        args.overrides = dict(depth=2)
    begin = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU (torch.cuda.is_available() is False)")
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast
        torch.backends.cudnn.allow_tf32 = True
    peak, source = peak_tflops(device, args.peak_tflops)
    config = create_student(args.model, num_classes=args.num_classes, **args.overrides).config
    emit({"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
          "peak_tflops": peak, "peak_source": source, "forward_gflops_per_image": flops_per_image(config) / 1e9})
    batches = synthetic_batches(4, batch=args.batch_size, size=config.img_size, num_classes=args.num_classes,
                                device=device)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile] if args.data != "shards" else []
    compiled_ok = args.data == "shards"
    for compiled in modes:
        elapsed = time.perf_counter() - begin
        if compiled and len(modes) > 1 and elapsed > args.budget_s:
            emit({"mode": "compiled", "skipped": f"{elapsed:.0f}s spent, over --budget-s {args.budget_s:.0f}"})
            continue
        try:
            emit(run(compiled, args, device, batches))
            compiled_ok = compiled_ok or compiled
        except Exception as error:  # a compiler that fails here is a finding, not a crash
            if not compiled:
                raise
            emit({"mode": "compiled", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
    if args.data in ("shards", "both"):
        # The fastest mode the in-memory run found, now fed by the shard loader.
        compiled = args.compile == "on" or (args.compile == "both" and compiled_ok)
        elapsed = time.perf_counter() - begin
        if args.data == "both" and elapsed > args.budget_s + 60:
            emit({"data": "shards", "skipped": f"{elapsed:.0f}s spent, over --budget-s {args.budget_s:.0f} + 60"})
        else:
            try:
                with tempfile.TemporaryDirectory(prefix="gpu-check-shards-") as workdir:
                    loader = shard_loader(args, device, size=config.img_size, workdir=workdir)
                    emit(run(compiled, args, device, loader=loader))
            except ImportError as error:  # webdataset missing on a bare GPU image
                emit({"data": "shards", "skipped": f"{type(error).__name__}: {error}"})
    log(f"done in {time.perf_counter() - begin:.0f}s")


if __name__ == "__main__":
    main()
