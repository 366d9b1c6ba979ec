"""Stage two on Ray Train: DeiT students train from the shards on one or many workers.

The driver checks the shards' manifest against the student, then a ``TorchTrainer`` runs
``worker_loop`` on every worker (DDP: NCCL on GPUs, gloo on CPUs). Every epoch rank 0 reports a
checkpoint (model, optimizer, schedule, EMA, epoch, step, config) through Ray Train, which
persists it under ``OUT/ray``; a rerun of the same ``OUT`` resumes from the last one. Rank 0 also
keeps ``OUT/student.pt`` (a plain state dict timm loads), ``config.json`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from deitpipe.pipeline.config import TrainConfig
from deitpipe.pipeline.progress import Progress, append_jsonl
from deitpipe.shards import schema
from deitpipe.shards.manifest import read_manifest, write_json_atomic
from deitpipe.shards.reader import expand_urls, is_remote, shard_name
from deitpipe.student import (
    DistillationLoss,
    MixupCutmix,
    build_ema,
    build_optimizer,
    build_scheduler,
    create_student,
    evaluate,
    load_checkpoint,
    scaled_lr,
    train_one_epoch,
)
from deitpipe.student.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    EvalImages,
    ShardReplay,
    eval_items,
    steps_per_epoch,
)

CHECKPOINT_FILE = "checkpoint.pt"


class TrainError(RuntimeError):
    """A user-facing failure of train-student; its message is one line."""


def shard_info(spec: str, manifest: str | None = None) -> dict[str, Any]:
    """Read and check the manifest of ``spec`` (a directory, or a pattern inside one).

    Args:
        spec: shard directory, or brace pattern (local, ``s3://``, ``http(s)://``, ``pipe:``).
        manifest: the manifest's path or URL; default: ``manifest.json`` beside the shards
            (required for ``pipe:`` commands, whose files deitpipe cannot locate).

    Returns:
        ``{"urls", "num_classes", "class_names", "views", "samples", "teacher", "manifest"}``.
    """
    where = manifest or _manifest_beside(spec)
    data = read_manifest(where)  # one line on a missing manifest or another schema version
    if not data.get("complete", False):
        raise TrainError(f"{where}: label-teacher has not finished; rerun it with the same arguments first")
    if not data.get("teacher", {}).get("name"):
        raise TrainError(f"{where}: the manifest records no teacher")
    listed = {s["name"]: s["samples"] for s in data["shards"]}
    urls = expand_urls(spec)
    unknown = [u for u in urls if shard_name(u) not in listed]
    if unknown:
        raise TrainError(f"{unknown[0]} is not listed in {where}")
    return {"urls": urls, "num_classes": int(data["num_classes"]), "class_names": data["class_names"],
            "views": int(data["views"]), "teacher": data["teacher"],
            "samples": sum(listed[shard_name(u)] for u in urls), "manifest": where}


def _manifest_beside(spec: str) -> str:
    if os.path.isdir(spec):
        return spec
    if spec.startswith("pipe:"):
        raise TrainError(f"--shards {spec}: a pipe: command has no place beside it; pass --manifest PATH "
                         f"(the {schema.MANIFEST_NAME} label-teacher wrote)")
    head = spec.split("{")[0]
    folder = head.rsplit("/", 1)[0] if "/" in head else "."
    return f"{folder}/{schema.MANIFEST_NAME}" if is_remote(spec) else folder


def teacher_labels_mode(config: TrainConfig, views: int) -> str:
    """The loader's label mode: stored views, global labels (fixed teacher), or none."""
    if config.distillation == "none" or config.online_teacher:
        return "none"
    mode = config.teacher_labels or ("views" if views > 0 else "global")
    if mode == "views" and views == 0:
        raise TrainError("--teacher-labels views: the shards hold no views (label-teacher --views 0); "
                         "use --teacher-labels global or relabel with --views N")
    return mode


def train_student(config: TrainConfig) -> dict[str, Any]:
    """Train a student as ``config`` says; returns the last epoch's metrics and the run's paths."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from deitpipe.pipeline.raysession import ray_session

    config = config.resolved()  # workers do not share the driver's working directory
    info = shard_info(config.shards, config.manifest)
    create_student(config.model, num_classes=info["num_classes"], **config.model_overrides())  # fail early
    mode = teacher_labels_mode(config, info["views"])
    out = Path(config.out).resolve()
    _prepare_out(out, config, num_classes=info["num_classes"], manifest=info["manifest"])
    loop_config = {"config": asdict(config), "info": info, "mode": mode, "out": str(out)}
    cpus = config.cpus_per_worker
    with ray_session(config.ray_address):
        if cpus is None:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // config.num_workers)
        board = progress_board()
        trainer = TorchTrainer(
            worker_loop, train_loop_config={**loop_config, "cpus": cpus, "board": board},
            scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                                   resources_per_worker={"CPU": cpus}),
            run_config=ray.train.RunConfig(
                name="ray", storage_path=str(out), failure_config=ray.train.FailureConfig(max_failures=2),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints)),
        )
        try:
            steps = steps_per_epoch(info["samples"], batch_size=config.batch_size, world_size=config.num_workers)
            follow(trainer.fit, board, Progress(config.epochs * steps, desc="train-student", unit="step",
                                                enabled=config.progress))
        except Exception as exc:  # a worker's error arrives wrapped; surface its last line
            raise TrainError(f"training failed on a worker: {_last_error_line(str(exc))}") from exc
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return {"out": str(out), "student": str(out / "student.pt"), "epochs_done": len(metrics),
            "last": metrics[-1] if metrics else {}}


def progress_board():
    """A small actor that rank 0 posts its progress to and the driver reads: worker output stays
    in Ray's logs, and the driver shows one bar, on any node layout."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self) -> None:
            self.state: tuple[int, int, dict] = (0, 0, {})

        def post(self, start: int, step: int, info: dict) -> None:
            self.state = (start, step, info)

        def read(self) -> tuple[int, int, dict]:
            return self.state

    return ProgressBoard.remote()


def follow(fit: Callable[[], Any], board, bar: Progress, *, every_s: float = 0.5) -> None:
    """Run ``fit`` in a thread and move ``bar`` as the board says; re-raise what ``fit`` raised."""
    import threading

    import ray

    failure: list[BaseException] = []

    def run() -> None:
        try:
            fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="train-student-fit", daemon=True)
    thread.start()
    shown, started = 0, False
    while True:
        thread.join(timeout=every_s)
        start, step, info = ray.get(board.read.remote())
        if not started and step > 0:
            bar.begin(start)  # the clock starts at the first step; steps before a resume are not this run's rate
            shown, started = start, True
        if step > shown:
            bar.update(step - shown, **info)
            shown = step
        if not thread.is_alive():
            break
    bar.close()
    if failure:
        raise failure[0]


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return errors[-1] if errors else (lines[-1] if lines else "unknown error")


def _prepare_out(out: Path, config: TrainConfig, *, num_classes: int, manifest: str) -> None:
    """Write config.json; refuse to mix a different run into an existing ``out``, or to resume a
    student whose head does not fit the shards' classes (shards relabelled in place)."""
    path = out / "config.json"
    student = out / "student.pt"
    if student.exists() and not config.overwrite:
        # mmap: only the head's bytes are read, not a whole DeiT-B
        head = torch.load(student, map_location="cpu", weights_only=True, mmap=True).get("head.weight")
        if head is not None and head.shape[0] != num_classes:
            raise TrainError(f"{student} has a {head.shape[0]}-class head but {manifest} lists {num_classes} "
                             "classes; pass --overwrite or choose another --out")
    if path.exists():
        old = json.loads(path.read_text())
        same = {k: v for k, v in old.items() if k not in _RUNTIME} == {
            k: v for k, v in asdict(config).items() if k not in _RUNTIME}
        if config.overwrite:
            import shutil

            shutil.rmtree(out)
        elif not same or not config.resume:
            diff = sorted(k for k, v in asdict(config).items() if k not in _RUNTIME and old.get(k) != v)
            why = f"other arguments ({', '.join('--' + d.replace('_', '-') for d in diff)})" if diff else "a run"
            raise TrainError(f"{out} holds {why}; rerun with the same arguments to resume, "
                             "or pass --overwrite, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(config))


_RUNTIME = frozenset({"out", "ray_address", "resume", "overwrite", "stop_after_steps", "progress",
                      "loader_workers", "cpus_per_worker", "keep_checkpoints"})


def worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build, maybe resume, and train epoch by epoch."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**loop_config["config"])
    info, mode, out = loop_config["info"], loop_config["mode"], Path(loop_config["out"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(int(loop_config["cpus"]))
    if cfg.loader_workers is None:
        cfg = replace(cfg, loader_workers=default_loader_workers(device.type, int(loop_config["cpus"])))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = create_student(cfg.model, num_classes=info["num_classes"], **cfg.model_overrides())
    if cfg.finetune:
        load_checkpoint(model, cfg.finetune, reset_heads=_heads_differ(model, cfg.finetune))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    steps = steps_per_epoch(info["samples"], batch_size=cfg.batch_size, world_size=world)
    optimizer = build_optimizer(model, lr=scaled_lr(cfg.lr, cfg.batch_size * world), weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, epochs=cfg.epochs, steps_per_epoch=steps,
                                warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr)
    ema = build_ema(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    start_epoch, step = _resume(ray.train.get_checkpoint(), model, optimizer, scheduler, ema)
    if rank == 0:
        _truncate_metrics(out / "metrics.jsonl", start_epoch)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    if cfg.compile:
        ddp = torch.compile(ddp)
    loss_fn = DistillationLoss(distillation=cfg.distillation, alpha=cfg.alpha, tau=cfg.tau,
                               label_smoothing=cfg.label_smoothing)
    teacher = online_teacher_fn(cfg, info["num_classes"], device) if cfg.online_teacher else None
    val = _val_loader(cfg, model.config.img_size) if cfg.val and rank == 0 else None
    autocast = torch.bfloat16 if device.type == "cuda" else None
    post = _poster(loop_config.get("board") if rank == 0 else None, start=step)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch * 64 + rank)  # per-epoch: a resume replays it exactly
        loader = _train_loader(cfg, info, mode, img_size=model.config.img_size, epoch=epoch, rank=rank,
                               world=world, steps=steps, device=device)
        budget = None if cfg.stop_after_steps is None else cfg.stop_after_steps - step
        if budget is not None and budget <= 0:
            break
        start = time.perf_counter()
        stats = train_one_epoch(
            ddp, loss_fn, loader, optimizer, device=device, scheduler=scheduler, ema=ema,
            grad_clip=cfg.grad_clip, autocast_dtype=autocast, online_teacher=teacher,
            mixup=_mixup(cfg, info["num_classes"], epoch, rank), max_steps=budget,
            progress=lambda i, parts, e=epoch, s=step: post(s + i, parts, epoch=f"{e + 1}/{cfg.epochs}"))
        step += int(stats["steps"])
        if stats["steps"] < steps:
            post(step, {}, epoch=f"{epoch + 1}/{cfg.epochs}", force=True)
            break  # stopped mid-epoch (as if killed): no checkpoint for a partial epoch
        metrics = {"epoch": epoch, "step": step, "seconds": round(time.perf_counter() - start, 2),
                   **{k: float(v) for k, v in stats.items()}}
        if val is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate(model, val, device=device,
                                                               num_classes=info["num_classes"]).items()})
            if ema is not None:
                metrics["val_ema_top1_avg"] = evaluate(ema.module, val, device=device,
                                                       num_classes=info["num_classes"]).get("top1_avg")
        _report(rank, out, cfg, metrics, model, optimizer, scheduler, ema, epoch, step)
        post(step, {"loss": metrics["loss"]}, epoch=f"{epoch + 1}/{cfg.epochs}", force=True)


def default_loader_workers(device_type: str, cpus: int) -> int:
    """DataLoader processes when --loader-workers is not given.

    On CPUs the model's own threads use every core, and loading in the training process costs
    least. A GPU step is far faster than decoding one batch on one core, so a GPU worker loads in
    the other processes its CPUs allow, keeping one for the training loop.
    """
    return 0 if device_type == "cpu" else max(1, cpus - 1)


def _poster(board, *, start: int, every_s: float = 0.5) -> Callable[..., None]:
    """Rank 0's progress to the driver's board, at most every ``every_s`` (a read of the loss
    waits for the device)."""
    last = [0.0]

    def post(step: int, parts: dict, *, epoch: str, force: bool = False) -> None:
        now = time.perf_counter()
        if board is None or (not force and now - last[0] < every_s):
            return
        last[0] = now
        info = {"epoch": epoch}
        if "loss" in parts:
            info["loss"] = f"{float(parts['loss']):.4f}"
        board.post.remote(start, step, info)

    return post


def _heads_differ(model: torch.nn.Module, path: str) -> bool:
    from deitpipe.student import read_state_dict

    state = read_state_dict(path)
    return "head.weight" in state and state["head.weight"].shape != model.head.weight.shape


def _resume(checkpoint, model, optimizer, scheduler, ema) -> tuple[int, int]:
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    return int(state["epoch"]) + 1, int(state["step"])


def _truncate_metrics(path: Path, start_epoch: int) -> None:
    """Drop lines of epochs that will be trained again, so a resumed run logs each epoch once."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] < start_epoch]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _report(rank, out, cfg, metrics, model, optimizer, scheduler, ema, epoch, step) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "ema": ema.state_dict() if ema is not None else None, "epoch": epoch, "step": step,
             "config": asdict(cfg), "model_config": asdict(model.config)}
    weights = ema.module.state_dict() if ema is not None else model.state_dict()
    _save_atomic({k: v.detach().cpu() for k, v in weights.items()}, out / "student.pt")
    append_jsonl(out / "metrics.jsonl", metrics)
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _train_loader(cfg, info, mode, *, img_size, epoch, rank, world, steps, device) -> DataLoader:
    augment = Augment(rand_augment=cfg.rand_augment, rand_augment_std=cfg.rand_augment_std,
                      random_erasing=cfg.random_erasing, img_size=img_size)
    dataset = ShardReplay(urls=info["urls"], num_classes=info["num_classes"], num_views=info["views"],
                          teacher_labels=mode, img_size=img_size, batch_size=cfg.batch_size, steps=steps,
                          seed=cfg.seed, rank=rank, world_size=world, augment=augment, min_scale=cfg.min_scale)
    dataset.set_epoch(epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.loader_workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def _val_loader(cfg: TrainConfig, img_size: int) -> DataLoader:
    items, _ = eval_items(cfg.val)
    crop_pct = 0.875 if img_size >= 128 else 1.0  # small images have no border to spare
    return DataLoader(EvalImages(items, img_size=img_size, crop_pct=crop_pct), batch_size=256,
                      num_workers=cfg.loader_workers)


def _mixup(cfg: TrainConfig, num_classes: int, epoch: int, rank: int) -> MixupCutmix | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return MixupCutmix(num_classes, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                       switch_prob=cfg.mixup_switch, seed=cfg.seed * 100_003 + epoch * 64 + rank)


def online_teacher_fn(cfg: TrainConfig, num_classes: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The paper's live teacher: student-normalised images -> teacher probabilities."""
    from deitpipe.teacher import build_teacher

    model, info = build_teacher(cfg.online_teacher, weights_path=cfg.teacher_weights, num_classes=num_classes)
    model = model.to(device, memory_format=torch.channels_last).eval()  # as the labelling actors run it
    prep = info.preprocessing
    view = dict(device=device, dtype=torch.float32)
    s_mean, s_std = (torch.tensor(v, **view).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    t_mean, t_std = (torch.tensor(v, **view).view(1, 3, 1, 1) for v in (prep.mean, prep.std))

    @torch.no_grad()
    def teach(images: torch.Tensor) -> torch.Tensor:
        x = images.float() * s_std + s_mean  # back to [0, 1] pixels
        if x.shape[-1] != prep.crop or x.shape[-2] != prep.crop:
            x = F.interpolate(x, size=(prep.crop, prep.crop), mode=prep.interpolation if prep.interpolation != "nearest"
                              else "nearest", antialias=prep.interpolation != "nearest")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model((x - t_mean) / t_std)
        return logits.float().softmax(-1)

    return teach
