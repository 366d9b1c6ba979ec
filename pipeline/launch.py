"""Launchers of the training core (``student.trainer.train``): this process, torchrun's
processes, or Ray Train workers. Each starts the workers, sets up devices and the process group,
takes the lock on the run directory and prepares it on the driver (rank 0), and feeds one
progress bar; the core does the rest.

- ``local``: this process, one worker (the CPU, or one GPU); no Ray.
- ``torchrun``: one process per rank under ``torchrun --nproc-per-node N``; rank, world and
  device from torchrun's environment; DDP (NCCL on GPUs, gloo on CPUs); rank 0 writes.
- ``ray``: a Ray Train ``TorchTrainer`` runs the core on every worker; Ray places the workers
  across nodes, restarts them after a failure (``FailureConfig``) and keeps the checkpoints
  under ``out/ray``.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from deitpipe.pipeline.outdir import locked
from deitpipe.pipeline.progress import Feed, Progress
from deitpipe.shards import storage
from deitpipe.student.config import TrainConfig
from deitpipe.student.data import IMAGENET_MEAN, IMAGENET_STD, steps_per_epoch
from deitpipe.student.runfiles import RAY_CHECKPOINT, FileCheckpoints, latest_checkpoint
from deitpipe.student.trainer import train

LAUNCHERS = ("local", "torchrun", "ray")


class TrainError(RuntimeError):
    """A user-facing failure of train-student; its message is one line."""


def launch(config: TrainConfig, *, info: dict[str, Any], mode: str, out: str,
           prepare: Callable[[], None]) -> None:
    """Run ``config`` with its launcher; ``prepare`` readies ``out`` on the driver under its lock."""
    if config.launcher not in LAUNCHERS:
        raise TrainError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {config.launcher!r}")
    {"local": _local, "torchrun": _torchrun, "ray": _ray}[config.launcher](
        config, info=info, mode=mode, out=out, prepare=prepare)


def _bar(config: TrainConfig, info: dict[str, Any], world: int) -> Progress:
    steps = steps_per_epoch(info["samples"], batch_size=config.batch_size, world_size=world,
                            repeats=config.epoch_repeats)
    return Progress(config.epochs * steps, desc="train-student", unit="step", enabled=config.progress)


def _local(config: TrainConfig, *, info, mode, out, prepare) -> None:
    if config.num_workers != 1:
        raise TrainError(f"--launcher local runs one worker, got --num-workers {config.num_workers}; "
                         "use --launcher torchrun or ray for more")
    device = _device(config.device, 0)
    cpus = config.cpus_per_worker or len(os.sched_getaffinity(0))
    with locked(out, command="deitpipe train-student"):
        prepare()
        bar = _bar(config, info, 1)
        teacher = online_teacher_fn(config, info["num_classes"], device) if config.online_teacher else None
        try:
            train(config, info=info, mode=mode, out=out, device=device, cpus=cpus, resume=latest_checkpoint(out),
                  progress=Feed(bar), online_teacher=teacher)
        finally:
            bar.close()


def _torchrun(config: TrainConfig, *, info, mode, out, prepare) -> None:
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except KeyError:
        raise TrainError("--launcher torchrun: RANK, WORLD_SIZE and LOCAL_RANK are not set; start it as "
                         "'torchrun --nproc-per-node N -m deitpipe train-student --launcher torchrun ...'") from None
    device = _device(config.device, local)
    cpus = config.cpus_per_worker or max(1, len(os.sched_getaffinity(0)) // int(os.environ.get(
        "LOCAL_WORLD_SIZE", world)))
    started_here = not dist.is_initialized()
    if started_here:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with contextlib.ExitStack() as held:
            _prepared_on_rank_zero(rank, device, lambda: (held.enter_context(locked(
                out, command="deitpipe train-student (torchrun rank 0)")), prepare()))
            bar = _bar(config, info, world) if rank == 0 else None
            teacher = online_teacher_fn(config, info["num_classes"], device) if config.online_teacher else None
            try:
                train(config, info=info, mode=mode, out=out, device=device, rank=rank, world=world, cpus=cpus,
                      resume=latest_checkpoint(out), save=_then_barrier(FileCheckpoints(
                          out, keep=config.keep_checkpoints, rank=rank)),
                      progress=Feed(bar) if bar else None, online_teacher=teacher)
            finally:
                if bar is not None:
                    bar.close()
            dist.barrier()
    finally:
        if started_here:
            dist.destroy_process_group()


def _then_barrier(save):
    """Every rank waits until rank 0 has written the epoch's checkpoint."""
    def wrapped(state, metrics):
        save(state, metrics)
        dist.barrier()
    return wrapped


def _prepared_on_rank_zero(rank: int, device: torch.device, prepare: Callable[[], Any]) -> None:
    """Rank 0 locks and prepares the run directory while the others wait; if it cannot, every
    rank stops (none is left waiting in a collective)."""
    failure: BaseException | None = None
    if rank == 0:
        try:
            prepare()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = exc
    flag = torch.tensor([failure is not None], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    if failure is not None:
        raise failure
    if flag.item():
        raise TrainError("rank 0 could not prepare the run directory; its error is in its output")


def _device(device: str, local_rank: int) -> torch.device:
    """``--device`` for this process: auto takes its GPU where it sees one."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is visible to this process; pass --device cpu or auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _ray(config: TrainConfig, *, info, mode, out, prepare) -> None:
    # Ray is imported here, not at the top: the local and torchrun launchers run without it.
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from deitpipe.pipeline.raysession import ray_session

    with locked(out, command="deitpipe train-student"), ray_session(config.ray_address):
        prepare()
        cpus = config.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // config.num_workers)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if config.device == "cuda" and gpus < config.num_workers:
            raise TrainError(f"--device cuda: {config.num_workers} workers need a GPU each, the Ray cluster has {gpus}; "
                             "pass --device cpu or auto, or fewer --num-workers")
        use_gpu = config.device == "cuda" or (config.device == "auto" and gpus >= config.num_workers)
        board = progress_board()
        trainer = TorchTrainer(
            ray_worker, train_loop_config={"config": asdict(config), "info": info, "mode": mode, "out": str(out),
                                           "cpus": cpus, "board": board},
            scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": cpus}),
            run_config=ray.train.RunConfig(
                name="ray", **_ray_storage(out), failure_config=ray.train.FailureConfig(max_failures=2),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints)),
        )
        try:
            follow(trainer.fit, board, _bar(config, info, config.num_workers))
        except Exception as exc:  # a worker's error arrives wrapped; surface its last line
            raise TrainError(f"training failed on a worker: {_last_error_line(str(exc))}") from exc


def _ray_storage(out: str) -> dict[str, Any]:
    """Ray Train's storage arguments for the run directory: a local path, or an object-storage
    prefix through deitpipe's own configured filesystem (the same endpoint and credentials)."""
    if not storage.is_object_uri(out):
        return {"storage_path": out}
    filesystem, path = storage.filesystem(out)
    return {"storage_path": path, "storage_filesystem": filesystem}


def ray_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the training core, with checkpoints reported to Ray Train."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    out = loop_config["out"]
    resume = None
    checkpoint = ray.train.get_checkpoint()  # set after a worker restart
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / RAY_CHECKPOINT, map_location="cpu", weights_only=True)
    else:
        resume = latest_checkpoint(out)
    board = loop_config.get("board") if rank == 0 else None
    teacher = online_teacher_fn(cfg, loop_config["info"]["num_classes"], device) if cfg.online_teacher else None
    train(cfg, info=loop_config["info"], mode=loop_config["mode"], out=out, device=device, rank=rank, world=world,
          cpus=int(loop_config["cpus"]), resume=resume, save=_ray_report,
          progress=board_poster(board) if board else None,
          online_teacher=teacher)


def _ray_report(state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
    import ray.train

    if state is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / RAY_CHECKPOINT)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def progress_board():
    """A small actor that rank 0 posts its progress to and the driver reads: worker output stays
    in Ray's logs, and the driver shows one bar, on any node layout.

    It lives on the driver's node: a lost worker node takes Train workers (which Ray Train
    restarts) but never the board, which nothing would restart.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self) -> None:
            self.state: tuple[int, int, dict] = (0, 0, {})

        def post(self, start: int, step: int, info: dict) -> None:
            self.state = (start, step, info)

        def read(self) -> tuple[int, int, dict]:
            return self.state

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ProgressBoard.options(scheduling_strategy=here).remote()


def board_poster(board) -> Callable[[int, int, dict], None]:
    """Rank 0's progress callback: post to ``board`` without waiting. The board is the driver's
    display, not part of training, so a board that is gone is ignored."""
    import ray

    def post(start: int, step: int, info: dict) -> None:
        with contextlib.suppress(ray.exceptions.RayActorError):
            board.post.remote(start, step, info)

    return post


def follow(fit: Callable[[], Any], board, bar: Progress, *, every_s: float = 0.5) -> None:
    """Run ``fit`` in a thread and move ``bar`` as the board says; re-raise what ``fit`` raised.

    A board that is lost only stops the bar: the run goes on, and its outcome is ``fit``'s.
    """
    import ray

    failure: list[BaseException] = []

    def run() -> None:
        try:
            fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="train-student-fit", daemon=True)
    thread.start()
    feed = Feed(bar)
    while True:
        thread.join(timeout=every_s)
        if board is not None:
            try:
                feed(*ray.get(board.read.remote()))
            except ray.exceptions.RayActorError:
                board = None  # the display is gone, not the run
        if not thread.is_alive():
            break
    bar.close()
    if failure:
        raise failure[0]


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return errors[-1] if errors else (lines[-1] if lines else "unknown error")


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
