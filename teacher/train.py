"""Training or fine-tuning a torchvision convnet teacher, saved the way stage one loads it.

A plain ``model.state_dict()`` file plus its JSON sidecar (``teacher.pt`` -> ``teacher.json``:
model, class count and names, eval preprocessing) lets ``label-teacher --teacher-weights`` rebuild
the model through :func:`~deitpipe.teacher.models.build_teacher` without repeating any option.
Recipe: RandomResizedCrop + flip (the kind of views stage one labels), label-smoothed
cross-entropy, SGD (Nesterov) or AdamW, one epoch of linear warmup then per-step cosine decay.
The optimizer, its weight-decay split, the schedule and mixed precision are those the student
trains with (:mod:`deitpipe.common.optim`).
Images are decoded once and kept in memory: meant for data sets that fit in RAM (the digits,
small image folders), not for ImageNet-sized fine-tunes.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from deitpipe.common.optim import bf16_autocast, build_optimizer, build_scheduler
from deitpipe.shards.inputs import Source, resolve_source
from deitpipe.shards.storage.atomic import atomic_writer
from deitpipe.teacher.config import OPTIMIZER_DEFAULTS, SGD_MOMENTUM, TeacherTrainConfig  # noqa: F401 (re-exported)
from deitpipe.teacher.data import SourceImages, eval_transform, train_transform
from deitpipe.teacher.models import _arch_kwargs, build_teacher
from deitpipe.teacher.predict import resolve_device
from deitpipe.teacher.preprocess import Preprocessing, check_weights_out, sidecar_path, write_sidecar


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the model's classifier for a freshly initialised one with ``num_classes`` outputs.

    The classifier is the last ``nn.Linear`` in ``named_modules`` order (the last ``nn.Conv2d``
    for models without one, e.g. SqueezeNet), which is the layer :func:`build_teacher` reads the
    class count from. Weights ~ N(0, 0.01), bias 0: torchvision's RegNet/MobileNet head init.

    Args:
        model: a torchvision classification model.
        num_classes: outputs of the new classifier.

    Returns:
        The dotted name of the replaced module, e.g. "fc".
    """
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    heads = heads or [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d classifier to replace")
    name, old = heads[-1]
    bias = old.bias is not None
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=bias)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, bias=bias)
    nn.init.normal_(new.weight, std=0.01)
    if bias:
        nn.init.zeros_(new.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new.to(old.weight.device, old.weight.dtype))
    return name


def build_start_model(
    name: str, *, num_classes: int, prep: Preprocessing, weights_path: str | None = None
) -> nn.Module:
    """The model training starts from: fresh, or the fine-tune weights with a fitted head.

    Args:
        name: torchvision model name.
        num_classes: head size to train.
        prep: preprocessing of the trained teacher (its crop sizes ViT/MaxViT position tables).
        weights_path: start weights, loaded strictly through :func:`build_teacher`, or None.

    Returns:
        The model in train mode on the CPU.
    """
    if weights_path is None:
        # Built with the switches build_teacher mirrors when it reloads the saved file, so the
        # trained state dict fits the model stage one constructs.
        kwargs = _arch_kwargs(name, prep, {})
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        return model.train()
    model, info = build_teacher(
        name, weights_path=weights_path, preprocessing_overrides={"crop": prep.crop}
    )
    if info.num_classes != num_classes:
        replace_head(model, num_classes)
    return model.train()


def evaluate_teacher(
    model: nn.Module, source: Source | SourceImages, prep: Preprocessing, *,
    batch_size: int = 256, device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy of ``model`` on a source through the eval transform of ``prep``.

    Args:
        model: classifier; it is moved to ``device`` and left in eval mode.
        source: labelled input (undecodable images left out), or already decoded images.
        prep: eval preprocessing (resize, centre crop, normalisation).
        batch_size: images per forward pass.
        device: where the model runs.

    Returns:
        Fraction of images whose arg-max class is the label, in [0, 1].
    """
    if not isinstance(source, SourceImages):
        source = SourceImages(source, eval_transform(prep))
    data = source.with_transform(eval_transform(prep))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    return _accuracy(model.to(device), loader, torch.device(device))


@torch.no_grad()
def _accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with bf16_autocast(device):
            logits = model(images.to(device))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return correct / total


def build_teacher_optimizer(
    model: nn.Module, config: TeacherTrainConfig, *, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The student's optimizer and per-step schedule (``common.optim``), set up with the teacher's recipe.

    No decay on norm scales and biases (``common.optim.param_groups``); SGD is Nesterov with
    momentum ``SGD_MOMENTUM``. Schedule: one epoch of linear warmup from ``lr / steps_per_epoch``
    (none for a one-epoch run), then cosine to 0 at the last step.

    Args:
        model: the teacher, already on its device.
        config: a resolved config (``lr`` and ``weight_decay`` set).
        steps_per_epoch: optimizer steps per epoch.
    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` after every optimizer step.
    """
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                kind=config.optimizer, momentum=SGD_MOMENTUM, nesterov=True)
    scheduler = build_scheduler(optimizer, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                                warmup_epochs=1 if config.epochs > 1 else 0, min_lr=0.0,
                                warmup_lr=config.lr / steps_per_epoch)
    return optimizer, scheduler


def _train_epoch(
    model: nn.Module, loader: DataLoader, *, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, device: torch.device,
    bar: tqdm,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean loss and the top-1 on the augmented crops."""
    model.train()
    loss_sum = correct = total = 0.0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with bf16_autocast(device):
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return {"loss": loss_sum / total, "top1": correct / total}


def save_teacher(model: nn.Module, path: str | os.PathLike, sidecar: dict[str, Any]) -> Path:
    """Write ``model.state_dict()`` to ``path`` and the sidecar beside it, both atomically.

    Order: the check that neither file replaces something deitpipe did not write
    (:func:`~deitpipe.teacher.preprocess.check_weights_out`), weights to a temporary file, the
    sidecar, then the rename (``shards.storage.atomic``). A failure leaves no partial or temporary
    file, and never new weights without the sidecar that describes them.

    Args:
        model: the trained model (tensors are saved from the CPU, so the file loads anywhere).
        path: the weights file.
        sidecar: JSON-ready dict for :func:`write_sidecar`.
    Returns:
        The weights path.
    Raises:
        ValueError: one line, before anything is written, when ``path`` is a directory or a link
            or its sidecar's place holds a file deitpipe did not write.
    """
    check_weights_out(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_writer(path) as file:
        torch.save(state, file)
        write_sidecar(path, sidecar)  # inside the block: a failed sidecar discards the weights
    return path


def _load_data(config: TeacherTrainConfig) -> tuple[Source, Source | None, int]:
    """Resolve the training and validation inputs and the head size; check they agree."""
    train = resolve_source(config.data, image_size=config.image_size)
    if not train.candidates:
        raise ValueError(f"--data {config.data!r} holds no images")
    val = resolve_source(config.val, image_size=config.image_size) if config.val else None
    if val is not None and val.class_names != train.class_names:
        raise ValueError(
            f"--val {config.val!r} has classes {val.class_names[:5]}... but --data has "
            f"{train.class_names[:5]}...; both need the same class folders"
        )
    num_classes = config.num_classes or len(train.class_names)
    top = max(c.label for s in (train, val) if s for c in s.candidates)
    if top >= num_classes:
        raise ValueError(f"--num-classes {num_classes} is too small: the data has label {top}")
    return train, val, num_classes


def _loader(data: Dataset, *, config: TeacherTrainConfig, shuffle: bool,
            generator: torch.Generator | None = None) -> DataLoader:
    # drop_last avoids a last batch of one image, which BatchNorm cannot normalise in training.
    drop_last = shuffle and len(data) > config.batch_size
    return DataLoader(data, batch_size=config.batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=config.num_workers, generator=generator)


def train_teacher(config: TeacherTrainConfig) -> dict[str, Any]:
    """Train (or fine-tune) a teacher on ``config.data`` and save weights and sidecar.

    Deterministic for a fixed ``config.seed`` on the CPU (the same weights bit for bit). The
    output path and the device are checked before any data is read, so a refusal comes at once,
    not after the last epoch.

    Args:
        config: the run's options.

    Returns:
        ``weights`` and ``sidecar`` paths, ``train_top1`` (eval transform on the training data,
        in [0, 1]), ``val_top1`` (None without ``config.val``), ``epochs``, ``seconds``,
        ``skipped`` (undecodable ``(path, reason)``) and ``history``: per epoch ``epoch``,
        ``loss``, ``top1`` (on the augmented crops), ``lr`` (at its start), ``val_top1``.
    Raises:
        ValueError: one line, before any work, when ``--out`` would replace a file deitpipe did not
            write (:func:`~deitpipe.teacher.preprocess.check_weights_out`), when ``--device`` names
            a device that is not there, or when the data does not fit the options.
    """
    start, config = time.perf_counter(), config.resolved()
    check_weights_out(config.out)
    device, prep = resolve_device(config.device), config.preprocessing
    train_src, val_src, num_classes = _load_data(config)
    torch.manual_seed(config.seed)  # model init and transforms draw from torch's generator
    train_data = SourceImages(train_src, train_transform(prep, scale=config.crop_scale))
    val_data = SourceImages(val_src, eval_transform(prep)) if val_src else None
    model = build_start_model(config.teacher, num_classes=num_classes, prep=prep,
                              weights_path=config.teacher_weights).to(device)
    history = _fit(model, train_data, val_data, config=config, device=device)
    train_top1 = evaluate_teacher(model, train_data, prep, batch_size=config.batch_size,
                                  device=device)
    val_top1 = history[-1]["val_top1"]
    names = train_src.class_names if len(train_src.class_names) == num_classes else None
    sidecar = {
        "model": config.teacher, "num_classes": num_classes, "class_names": names,
        **prep.to_dict(),
        "train": {"config": asdict(config), "train_top1": train_top1, "val_top1": val_top1,
                  "skipped": len(train_data.skipped)},
    }
    weights = save_teacher(model.cpu(), config.out, sidecar)
    return {
        "weights": str(weights), "sidecar": str(sidecar_path(weights)),
        "train_top1": train_top1, "val_top1": val_top1, "epochs": config.epochs,
        "seconds": time.perf_counter() - start, "skipped": train_data.skipped, "history": history,
    }


def _fit(
    model: nn.Module, train_data: SourceImages, val_data: SourceImages | None, *,
    config: TeacherTrainConfig, device: torch.device,
) -> list[dict[str, Any]]:
    """The epochs of :func:`train_teacher`; returns the per-epoch history."""
    generator = torch.Generator().manual_seed(config.seed)  # data order
    loader = _loader(train_data, config=config, shuffle=True, generator=generator)
    val_loader = _loader(val_data, config=config, shuffle=False) if val_data else None
    optimizer, scheduler = build_teacher_optimizer(model, config, steps_per_epoch=len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history: list[dict[str, Any]] = []
    desc = f"train-teacher {config.teacher}"
    # In a log file (stderr no terminal) the bar is a line every 15 s, not a redraw per step.
    with tqdm(total=config.epochs * len(loader), disable=not config.progress, unit="step", desc=desc,
              mininterval=0.1 if sys.stderr.isatty() else 15.0) as bar:
        for epoch in range(1, config.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            stats = _train_epoch(model, loader, optimizer=optimizer, scheduler=scheduler,
                                 loss_fn=loss_fn, device=device, bar=bar)
            val_top1 = _accuracy(model, val_loader, device) if val_loader else None
            history.append({"epoch": epoch, **stats, "lr": lr, "val_top1": val_top1})
            val = f" val {val_top1:.1%}" if val_top1 is not None else ""
            bar.set_description(f"{desc} epoch {epoch}{val}")
    return history
