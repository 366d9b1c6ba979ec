"""Helpers the benchmarks share: the header line, generated inputs, random-init teachers, step clocks.

Nothing here downloads anything: images are generated, teachers are random-init torchvision
models saved with a sidecar, shards are written with the library's own writer.
"""

from __future__ import annotations

import io
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def header(**extra: object) -> None:
    """Print the line every benchmark starts with: versions, threads, processor."""
    parts = [f"torch {torch.__version__}", f"{torch.get_num_threads()} threads",
             platform.processor() or platform.machine()]
    parts += [f"{k} {v}" for k, v in extra.items()]
    print(", ".join(parts), flush=True)


def emit(record: dict) -> None:
    """One JSON line per measurement, floats rounded for reading."""
    def tidy(v):
        return round(v, 4) if isinstance(v, float) else v
    print(json.dumps({k: tidy(v) for k, v in record.items()}), flush=True)


def photo_jpeg(rng: np.random.Generator, *, height: int, width: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour gradients, a few soft blobs and sensor noise.

    Flat random noise compresses and decodes unlike a photograph; this keeps JPEG sizes and
    decode times in the range of ImageNet's (about 110 KB at 400x350, quality 90).
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(2 * np.pi * (a * x + b * y + p))
    for _ in range(int(rng.integers(3, 8))):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-90, 90, 3)
    img += rng.normal(0, 12, img.shape)  # texture, so the JPEG is not trivially small
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_folder(root: str | Path, *, images: int, classes: int = 10, size: int = 300,
                 seed: int = 0) -> Path:
    """An ImageFolder tree of photo-like JPEGs, short side ``size``, aspect 3:4 or 4:3.

    Reused when it already holds the requested images (a marker file records the settings).
    """
    root = Path(root)
    settings = {"images": images, "classes": classes, "size": size, "seed": seed}
    marker = root / ".photos.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return root
    rng = np.random.default_rng(seed)
    long = size * 4 // 3
    for i in range(images):
        h, w = (size, long) if i % 2 else (long, size)
        d = root / f"class{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(photo_jpeg(rng, height=h, width=w))
    marker.write_text(json.dumps(settings))
    return root


def save_random_teacher(out_dir: str | Path, name: str, *, num_classes: int, seed: int = 0,
                        **prep_overrides: object) -> Path:
    """Save a random-init torchvision model with its sidecar, as a fine-tuned teacher would be.

    The sidecar's preprocessing is that of torchvision's published weights for ``name`` (e.g.
    resize 232 / crop 224 for RegNetY), with ``prep_overrides`` applied.

    Returns:
        The weights path (``<out_dir>/<name>.pt``; sidecar ``<name>.json``).
    """
    import torchvision

    from deitpipe.teacher import default_weights, preprocessing_from_weights, write_sidecar

    path = Path(out_dir) / f"{name}-{num_classes}.pt"
    prep = {**preprocessing_from_weights(default_weights(name)).to_dict(), **prep_overrides}
    if path.exists() and json.loads(path.with_suffix(".json").read_text()).get("crop") == prep["crop"]:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(torchvision.models.get_model(name, num_classes=num_classes).state_dict(), path)
    write_sidecar(path, {"model": name, "num_classes": num_classes, **prep})
    return path


def peaked_probs(rng: np.random.Generator, rows: int, num_classes: int, *, scale: float = 4.0) -> torch.Tensor:
    """Random peaked softmax rows, (rows, C) float32: stand-ins where only timing matters."""
    logits = rng.normal(0.0, scale, (rows, num_classes)).astype(np.float32)
    return torch.from_numpy(logits).softmax(dim=-1)


def write_synthetic_shards(out_dir: str | Path, *, images: list[bytes], labels: list[int],
                           num_classes: int, views: int, topk: int = 10, shard_size: int = 64,
                           seed: int = 0) -> list[str]:
    """Shards in the label-teacher format with random teacher outputs (for timing only).

    Boxes and flips are the real ones (``random_view_boxes`` + ``global_box``), so a replay cuts
    the same views a labelled run would.

    Returns:
        The shard paths in order.
    """
    from deitpipe.shards.format import schema
    from deitpipe.shards.format.image import decode_image, sniff_image_type
    from deitpipe.shards.format.views import global_box, random_view_boxes
    from deitpipe.shards.format.writer import ShardFileWriter, encode_sample
    from deitpipe.teacher import summarize_probs

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    urls = []
    for shard, start in enumerate(range(0, len(images), shard_size)):
        with ShardFileWriter(out, schema.shard_name(shard)) as writer:
            for index in range(start, min(start + shard_size, len(images))):
                data, key = images[index], schema.sample_key(index)
                img = decode_image(data)
                boxes, flips = random_view_boxes(seed=seed, key=key, num_views=views,
                                                 height=img.height, width=img.width)
                side = min(img.height, img.width)  # global view: the centred square
                g = global_box(height=img.height, width=img.width, resize=side, crop=side)
                boxes = np.concatenate([np.asarray([g], dtype=schema.BOX_DTYPE), boxes])
                flips = np.concatenate([np.zeros(1, dtype=schema.FLIP_DTYPE), flips])
                outputs = summarize_probs(peaked_probs(rng, views + 1, num_classes), topk=topk,
                                          full_softmax=False,
                                          index_dtype=schema.class_dtype(num_classes))
                writer.write(encode_sample(
                    key=key, image_bytes=data, image_ext=sniff_image_type(data), label=labels[index],
                    meta={"path": f"synthetic/{index}", "height": img.height, "width": img.width},
                    views={"box": boxes, "flip": flips, **outputs.columns()}, num_classes=num_classes))
        urls.append(str(writer.path))
    return urls


class StepClock:
    """``train_one_epoch``'s progress callback that timestamps every step.

    On CUDA it synchronises first, so a timestamp means the step really finished.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.images: list[int] = []

    def __call__(self, step: int, info: dict) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.images.append(int(info["images"]))

    def steady(self, skip: int) -> float:
        """Images/s over the steps after the first ``skip`` (warm-up, first batch)."""
        if len(self.times) <= skip or skip < 1:
            raise ValueError(f"need more than {skip} steps to skip {skip}, got {len(self.times)}")
        return (self.images[-1] - self.images[skip - 1]) / (self.times[-1] - self.times[skip - 1])

    def median_rate(self, skip: int) -> float:
        """Images/s of the median step after the first ``skip``: robust to a few slow steps."""
        if len(self.times) <= skip or skip < 1:
            raise ValueError(f"need more than {skip} steps to skip {skip}, got {len(self.times)}")
        seconds = np.diff(self.times[skip - 1:])
        images = np.diff(self.images[skip - 1:])
        return float(np.median(images) / np.median(seconds))
