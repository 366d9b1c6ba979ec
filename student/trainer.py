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

import errno
import io
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from deitpipe.shards import storage
from deitpipe.student.checkpoint import load_checkpoint, read_state_dict
from deitpipe.student.config import TrainConfig
from deitpipe.student.data import Augment, EvalImages, ShardReplay, eval_items, steps_per_epoch
from deitpipe.student.ema import build_ema
from deitpipe.student.engine import MixupCutmix, evaluate, train_one_epoch
from deitpipe.student.gpu_augment import BatchAugment
from deitpipe.student.gpu_replay import DeviceBatches, EncodedShardReplay, collate
from deitpipe.student.loss import DistillationLoss
from deitpipe.student.model import create_student
from deitpipe.student.optim import build_optimizer, build_scheduler, scaled_lr

CHECKPOINT_DIR = "checkpoints"  # the plain checkpoint files of the local and torchrun launchers
CHECKPOINT_FILE = re.compile(r"epoch-([0-9]{4,})\.pt")
RAY_CHECKPOINT = "checkpoint.pt"  # the file inside each of Ray Train's out/ray/checkpoint_* folders

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
        _truncate_metrics(storage.join(out, "metrics.jsonl"), start_epoch)
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


class CheckpointWriteError(OSError):
    """A checkpoint or weights file could not be written; the message is one line naming the file."""


class FileCheckpoints:
    """Checkpoints as plain files, ``out/checkpoints/epoch-NNNN.pt``; the latest ``keep`` stay.

    Args:
        out: the run directory (or ``s3://`` prefix).
        keep: how many of the latest checkpoints to keep.
        rank: only rank 0 writes.
    """

    def __init__(self, out: str | Path, *, keep: int = 2, rank: int = 0) -> None:
        self.out, self.keep, self.rank = os.fspath(out), keep, rank

    def __call__(self, state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
        if self.rank != 0 or state is None:
            return
        _save(state, storage.join(self.out, CHECKPOINT_DIR, f"epoch-{int(state['epoch']):04d}.pt"))
        for old in checkpoint_files(self.out)[:-self.keep]:
            storage.remove(old)


def checkpoint_files(out: str | Path) -> list[str]:
    """The run's plain checkpoint files (paths or URIs), oldest epoch first."""
    folder = storage.join(out, CHECKPOINT_DIR)
    found = [storage.join(folder, name) for name in storage.list_names(folder) if CHECKPOINT_FILE.fullmatch(name)]
    if not storage.is_object_uri(folder):
        found = [p for p in found if os.path.isfile(p)]
    return sorted(found, key=lambda p: int(CHECKPOINT_FILE.fullmatch(p.rsplit("/", 1)[-1])[1]))


def ray_checkpoint_files(out: str | Path) -> list[str]:
    """The checkpoint files in Ray Train's ``out/ray/checkpoint_*`` folders, oldest first."""
    folder = storage.join(out, "ray")
    names = [n for n in storage.list_names(folder) if n.startswith("checkpoint_")]
    return [uri for uri in (storage.join(folder, n, RAY_CHECKPOINT) for n in names) if storage.is_file(uri)]


def latest_checkpoint(out: str | Path) -> dict[str, Any] | None:
    """The newest readable checkpoint state in ``out``, from any launcher: the plain files and Ray
    Train's ``out/ray/checkpoint_*`` folders both count, so a run can resume under another launcher.

    A checkpoint cut off by a lost node (Ray Train copies a worker's folder into its storage file
    by file) does not load; the next newest of its kind is taken instead, so a rerun resumes
    rather than failing on the same file again.
    """
    states = [_newest_readable(checkpoint_files(out)), _newest_readable(ray_checkpoint_files(out))]
    return max((s for s in states if s is not None), key=lambda s: int(s["epoch"]), default=None)


def _newest_readable(paths: list[str]) -> dict[str, Any] | None:
    for path in reversed(paths):
        try:
            state = load_state(path)
        except storage.StorageError:
            raise  # the store is unreachable: not a reason to resume from an older epoch
        except (ValueError, OSError):  # cut off, corrupt or another kind of file: the next older one
            continue
        if "epoch" in state:
            return state
    return None


def load_state(uri: str | Path) -> dict[str, Any]:
    """A checkpoint state from a file (memory-mapped: comparing epochs reads only that number,
    not the weights and optimizer state) or an object (read whole).

    Raises:
        ValueError: one line naming the file, when it is not a torch checkpoint (another kind of
            file, cut off or corrupt) or holds something other than a dict.
        OSError: the file cannot be opened (missing, no permission; an object: StorageError).
    """
    uri = os.fspath(uri)
    if storage.is_object_uri(uri):
        head = storage.read_bytes(uri)
        source, mmap = io.BytesIO(head), False
    else:
        with open(uri, "rb") as f:  # a missing or forbidden file fails here, as itself
            head = f.read(4)
        source, mmap = uri, True
    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types (even OSError) for bytes it cannot parse
        raise ValueError(f"{uri} {_unreadable(head, exc)}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{uri} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _unreadable(head: bytes, exc: BaseException) -> str:
    """What a file that torch.load refused is, from its first bytes (torch.save writes a zip)."""
    if not head:
        return "is empty, not a torch checkpoint"
    if not head.startswith(b"PK\x03\x04"):
        return "is not a torch checkpoint: it is not the zip archive torch.save writes"
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if unsafe:
        return (f"is not a checkpoint of tensors and plain values: it holds a {unsafe[1]}, "
                "which is not loaded as it could run code")
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "").split(". ")[0][:120]
    return f"is a cut-off or corrupt torch checkpoint ({type(exc).__name__}{': ' + reason if reason else ''})"


def heads_differ(model: torch.nn.Module, path: str) -> bool:
    """Whether the checkpoint at ``path`` has a head of another shape than ``model``'s."""
    state = read_state_dict(path)
    return "head.weight" in state and state["head.weight"].shape != model.head.weight.shape


def save_weights(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """``torch.save`` to ``path`` (or an object) atomically and durably.

    Raises:
        CheckpointWriteError: one line naming the file and the cause (e.g. no space left).
    """
    _save(weights, os.fspath(path))


def _save(obj: Any, path: str) -> None:
    """``torch.save`` through an atomic output: a failed write leaves nothing under ``path``."""
    try:
        with storage.atomic_output(path) as f:
            torch.save(obj, f)
    except storage.StorageError:
        raise  # already one line naming the object
    except (OSError, RuntimeError) as exc:
        raise CheckpointWriteError(f"cannot write {path}: {_write_failure(exc)}") from exc


def _write_failure(exc: BaseException) -> str:
    """The cause of a failed write in words. torch.save reports a failed write of its file object
    as "enforce fail at inline_container.cc: unexpected pos", with the OSError as its context."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "no space left" in str(e).lower():
            return "no space left on device; free some space or choose another --out"
    root = next((e for e in reversed(chain) if isinstance(e, OSError)), chain[0])
    text = root.strerror if isinstance(root, OSError) and root.strerror else str(root)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(root).__name__)[:200]


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed and fsynced, so a killed run keeps what it logged); an
    object is rewritten whole with the line added.

    A line cut off by a killed write (no newline at the end) is first ended, so it stays a line
    of its own that :func:`read_metrics` skips, and never runs into this record.
    """
    line = json.dumps(record, sort_keys=True).encode("utf-8") + b"\n"
    if storage.is_object_uri(path):
        before = storage.read_bytes(path) if storage.is_file(path) else b""
        storage.write_bytes(path, before + (b"\n" if before and not before.endswith(b"\n") else b"") + line)
        return
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)  # "a": appended at the end, wherever the read left the position
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a file or an object), in order; empty when it is absent.

    Lines that are not whole JSON objects are skipped: the last line of a run killed while
    writing it, or a line damaged in the middle. They never stop a resume or a report.
    """
    path = os.fspath(path)
    return [record for _, record in _metric_lines(storage.read_bytes(path))] if storage.is_file(path) else []


def _metric_lines(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each intact line of a ``metrics.jsonl``'s bytes."""
    found = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.append((line, record))
    return found


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
                  class_targets="soft" if info.get("unlabeled") and cfg.distillation == "soft" else "hard")
    pin = device.type == "cuda"
    if loader_kind(cfg, device) == "gpu":
        encoded = EncodedShardReplay(**kwargs)
        encoded.set_epoch(epoch)
        loader = DataLoader(encoded, batch_size=cfg.batch_size, num_workers=cfg.loader_workers, pin_memory=pin,
                            collate_fn=collate)
        return DeviceBatches(loader, img_size=img_size, device=device, augment=BatchAugment.from_config(augment),
                             seed=cfg.seed, epoch=epoch, rank=rank)
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


def _truncate_metrics(path: str, start_epoch: int) -> None:
    """Drop lines of epochs that will be trained again, so a resumed run logs each epoch once;
    lines that are not intact records (:func:`read_metrics`) go too."""
    if not storage.is_file(path):
        return
    data = storage.read_bytes(path)
    keep = [line for line, record in _metric_lines(data)
            if isinstance(record.get("epoch"), int) and record["epoch"] < start_epoch]
    text = "".join(line + "\n" for line in keep).encode("utf-8")
    if text != data:
        storage.write_bytes(path, text)


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
