"""The training core of train-student: one worker's whole run, whoever launched it.

``train`` builds the student, optimizer, schedule and EMA, resumes from a checkpoint state, runs
the epoch loop with validation, and on rank 0 writes ``student.pt`` (a plain state dict timm
loads) and ``metrics.jsonl``. It takes rank, world size and device as arguments and knows
nothing of Ray or click; launchers (``pipeline/launch.py``: this process, torchrun, Ray Train)
start the workers and the process group, and say where checkpoints go.

Every epoch reseeds from (seed, epoch, rank), so a run resumed from an epoch's checkpoint replays
the following epochs exactly; the checkpoint needs no generator state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from deitpipe.shards import storage
from deitpipe.student.checkpoint import load_checkpoint
from deitpipe.student.config import TrainConfig
from deitpipe.student.data import Augment, ShardReplay, steps_per_epoch
from deitpipe.student.heldout import EvalImages, eval_items
from deitpipe.student.ema import build_ema
from deitpipe.student.engine import MixupCutmix, evaluate, train_one_epoch
from deitpipe.shards.format.randaugment import BatchAugment
from deitpipe.student.gpu_replay import DeviceBatches, EncodedShardReplay, collate
from deitpipe.student.loss import DistillationLoss
from deitpipe.student.model import create_student
from deitpipe.student.optim import build_optimizer, build_scheduler, scaled_lr
from deitpipe.student.runfiles import FileCheckpoints, append_jsonl, heads_differ, save_weights, truncate_metrics


# (state on rank 0, else None; the epoch's metrics) -> None, called by every rank after each epoch.
SaveFn = Callable[[dict[str, Any] | None, dict[str, Any]], None]
# (first step of this run, step, {"epoch": "3/300", "loss": "1.2345"}) -> None, called by rank 0.
ProgressFn = Callable[[int, int, dict[str, str]], None]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch: the data order, augmentation and mixup draws."""
    return seed * 100_003 + epoch * 64 + rank


def default_loader_workers(device_type: str, cpus: int) -> int:
    """DataLoader processes when --loader-workers is not given.

    On CPUs the model's own threads use every core, and loading in the training process costs
    least. A GPU step is far faster than decoding one batch on one core, so a GPU worker loads in
    the other processes its CPUs allow, keeping one for the training loop.
    """
    return 0 if device_type == "cpu" else max(1, cpus - 1)


def train(cfg: TrainConfig, *, info: dict[str, Any], mode: str, out: str | Path, device: torch.device,
          rank: int = 0, world: int = 1, cpus: int = 1, resume: dict[str, Any] | None = None,
          save: SaveFn | None = None, progress: ProgressFn | None = None,
          online_teacher: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Train one worker's share of a student run.

    Args:
        cfg: the run's configuration (paths already absolute).
        info: the shard set: "urls", "num_classes", "views", "samples".
        mode: the loader's teacher labels: "views", "global" or "none".
        out: the run directory (shared by all ranks): a local directory or an ``s3://`` prefix.
        device: this worker's device.
        rank, world: this worker's rank and the number of workers; with world > 1 the default
            process group must be initialised (the model is wrapped in DDP).
        cpus: CPUs of this worker (its torch threads on a CPU, its loader processes on a GPU).
        resume: a checkpoint state (:func:`checkpoint_state`) to continue from, or None.
        save: called by every rank after each epoch (default: :class:`FileCheckpoints`).
        progress: rank 0's progress callback.
        online_teacher: images -> teacher probabilities, run live on each batch (the baseline).
    Returns:
        This run's epoch metrics (rank 0 also appended them to ``out/metrics.jsonl``).
    """
    out = os.fspath(out)
    if rank == 0 and not storage.is_object_uri(out):
        os.makedirs(out, exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(cpus)
    if cfg.loader_workers is None:
        cfg = replace(cfg, loader_workers=default_loader_workers(device.type, cpus))
    save = save or FileCheckpoints(out, keep=cfg.keep_checkpoints, rank=rank)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = create_student(cfg.model, num_classes=info["num_classes"], **cfg.model_overrides())
    if cfg.finetune and resume is None:
        load_checkpoint(model, cfg.finetune, reset_heads=heads_differ(model, cfg.finetune))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    steps = steps_per_epoch(info["samples"], batch_size=cfg.batch_size, world_size=world,
                            repeats=cfg.epoch_repeats)
    optimizer = build_optimizer(model, lr=scaled_lr(cfg.lr, cfg.batch_size * world), weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, epochs=cfg.epochs, steps_per_epoch=steps,
                                warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr)
    ema = build_ema(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    start_epoch, step = _resume(resume, model, optimizer, scheduler, ema)
    if rank == 0:
        truncate_metrics(storage.join(out, "metrics.jsonl"), start_epoch)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    if cfg.compile:
        net = torch.compile(net)
    loss_fn = DistillationLoss(distillation=cfg.distillation, alpha=cfg.alpha, tau=cfg.tau,
                               label_smoothing=cfg.label_smoothing)
    val = _val_loader(cfg, model.config.img_size) if cfg.val and rank == 0 else None
    autocast = torch.bfloat16 if device.type == "cuda" else None
    post = _throttled(progress if rank == 0 else None, start=step)
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))  # a resume replays the epoch exactly
        loader = train_loader(cfg, info, mode, img_size=model.config.img_size, epoch=epoch, rank=rank,
                              world=world, steps=steps, device=device)
        budget = None if cfg.stop_after_steps is None else cfg.stop_after_steps - step
        if budget is not None and budget <= 0:
            break
        label = f"{epoch + 1}/{cfg.epochs}"
        start = time.perf_counter()
        stats = train_one_epoch(
            net, loss_fn, loader, optimizer, device=device, scheduler=scheduler, ema=ema,
            grad_clip=cfg.grad_clip, autocast_dtype=autocast, online_teacher=online_teacher,
            mixup=_mixup(cfg, info["num_classes"], epoch, rank), max_steps=budget,
            progress=lambda i, parts, s=step, e=label: post(s + i, parts, epoch=e))
        step += int(stats["steps"])
        if stats["steps"] < steps:
            post(step, {}, epoch=label, force=True)
            break  # stopped mid-epoch (as if killed): no checkpoint for a partial epoch
        metrics = {"epoch": epoch, "step": step, "seconds": round(time.perf_counter() - start, 2),
                   **{k: float(v) for k, v in stats.items()}}
        if val is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate(model, val, device=device,
                                                               num_classes=info["num_classes"]).items()})
            if ema is not None:
                metrics["val_ema_top1_avg"] = evaluate(ema.module, val, device=device,
                                                       num_classes=info["num_classes"]).get("top1_avg")
        state = None
        if rank == 0:
            weights = ema.module.state_dict() if ema is not None else model.state_dict()
            save_weights({k: v.detach().cpu() for k, v in weights.items()}, storage.join(out, "student.pt"))
            append_jsonl(storage.join(out, "metrics.jsonl"), metrics)
            state = checkpoint_state(cfg, model, optimizer, scheduler, ema, epoch=epoch, step=step)
        save(state, metrics)
        history.append(metrics)
        post(step, {"loss": metrics["loss"]}, epoch=label, force=True)
    return history


def checkpoint_state(cfg, model, optimizer, scheduler, ema, *, epoch: int, step: int) -> dict[str, Any]:
    """What a checkpoint holds: everything to continue after ``epoch`` (tensors, numbers, strings)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "epoch": epoch, "step": step,
            "config": asdict(cfg), "model_config": asdict(model.config)}


def loader_kind(cfg: TrainConfig, device: torch.device) -> str:
    """``--loader``, or its default: batched on the device when that is a GPU, else in processes."""
    return cfg.loader or ("gpu" if device.type == "cuda" else "cpu")


def train_loader(cfg: TrainConfig, info: dict[str, Any], mode: str, *, img_size: int, epoch: int, rank: int,
                 world: int, steps: int, device: torch.device) -> Iterable[dict[str, Any]]:
    """One rank's batches for one epoch: stored views replayed, then the DeiT augmentation.

    With ``--loader cpu`` the DataLoader's processes decode, cut and augment each sample; with
    ``--loader gpu`` they only read the encoded bytes and the view arrays, and the training
    process decodes, cuts and augments whole batches on ``device``, one batch ahead.
    """
    augment = Augment(rand_augment=cfg.rand_augment, rand_augment_std=cfg.rand_augment_std,
                      random_erasing=cfg.random_erasing, img_size=img_size)
    kwargs = dict(urls=info["urls"], num_classes=info["num_classes"], num_views=info["views"], teacher_labels=mode,
                  img_size=img_size, batch_size=cfg.batch_size, steps=steps, seed=cfg.seed, rank=rank,
                  world_size=world, min_scale=cfg.min_scale, checksums=info.get("sha256"),
                  class_targets="soft" if info.get("unlabeled") and cfg.distillation == "soft" else "hard",
                  stored_augment=info.get("augment") if mode == "views" else None)
    pin = device.type == "cuda"
    if loader_kind(cfg, device) == "gpu":
        encoded = EncodedShardReplay(**kwargs)
        encoded.set_epoch(epoch)
        loader = DataLoader(encoded, batch_size=cfg.batch_size, num_workers=cfg.loader_workers, pin_memory=pin,
                            collate_fn=collate)
        return DeviceBatches(loader, img_size=img_size, device=device, augment=BatchAugment.from_config(augment),
                             seed=cfg.seed, epoch=epoch, rank=rank,
                             renderer=encoded.renderer if encoded.stored is not None else None)
    dataset = ShardReplay(**kwargs, augment=augment)
    dataset.set_epoch(epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.loader_workers, pin_memory=pin,
                      persistent_workers=False)


def _val_loader(cfg: TrainConfig, img_size: int) -> DataLoader:
    items, _ = eval_items(cfg.val)
    return DataLoader(EvalImages(items, img_size=img_size), batch_size=256, num_workers=cfg.loader_workers)


def _mixup(cfg: TrainConfig, num_classes: int, epoch: int, rank: int) -> MixupCutmix | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return MixupCutmix(num_classes, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                       switch_prob=cfg.mixup_switch, seed=epoch_seed(cfg.seed, epoch, rank))


def _resume(state, model, optimizer, scheduler, ema) -> tuple[int, int]:
    if state is None:
        return 0, 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    return int(state["epoch"]) + 1, int(state["step"])


def _throttled(progress: ProgressFn | None, *, start: int, every_s: float = 0.5) -> Callable[..., None]:
    """``progress`` at most every ``every_s`` (reading the loss waits for the device)."""
    last = [0.0]

    def post(step: int, parts: dict, *, epoch: str, force: bool = False) -> None:
        now = time.perf_counter()
        if progress is None or (not force and now - last[0] < every_s):
            return
        last[0] = now
        info = {"epoch": epoch}
        if "loss" in parts:
            info["loss"] = f"{float(parts['loss']):.4f}"
        progress(start, step, info)

    return post
