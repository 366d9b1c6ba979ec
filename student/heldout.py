"""Held-out images for evaluation: resized and centre-cropped as timm evaluates DeiT, from a list
of images, an embedded split, an ImageFolder, or shards (with the teacher's global label)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torchvision.transforms import v2

from deitpipe.shards.format.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    cut_view,
    decode_image,
    eval_crop_pct,
    eval_resize,
)
from deitpipe.shards.format.manifest import read_manifest
from deitpipe.shards.format.reader import decode_sample, expand_urls, read_shard
from deitpipe.shards.format.views import global_box
from deitpipe.shards.inputs import read_bytes, resolve_source
from deitpipe.shards.specs import is_shard_set


class EvalImages(torch.utils.data.Dataset):
    """Held-out images for evaluation: resize and centre crop, as timm evaluates DeiT.

    Built from a list of (bytes loader, label) pairs, or from shards (their global view box, and
    the teacher's global hard label for agreement). Each image is decoded once per pass.

    Args:
        items: sequence of ``(load_bytes() -> bytes, label, teacher_hard or -1[, path])``; the
            optional path names the image in errors and in skip reports.
        img_size: the student's input size.
        crop_pct: centre-crop fraction; the image is first resized to ``img_size / crop_pct``
            on its shorter side. None: ``shards.format.image.eval_crop_pct(img_size)``, DeiT's 0.875
            from 128 px on and 1.0 (no border cut) for smaller images.
        mean, std: normalisation.
        interpolation: resize interpolation.
        skip_undecodable: an image that does not decode becomes a zero image whose sample
            carries the reason in "error" ("" for good ones) and its position in "index", for
            :meth:`decodable` to drop; otherwise it raises ``ImageDecodeError`` naming its path.
    """

    def __init__(self, items: list, *, img_size: int, crop_pct: float | None = None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bilinear",
                 skip_undecodable: bool = False) -> None:
        self.items, self.img_size, self.interpolation = items, img_size, interpolation
        self.skip_undecodable = skip_undecodable
        self.crop_pct = eval_crop_pct(img_size) if crop_pct is None else crop_pct
        self.resize = eval_resize(img_size, self.crop_pct)
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.items)

    def path(self, i: int) -> str:
        """What item ``i`` is called in messages: its path, or its position when it has none."""
        item = self.items[i]
        return str(item[3]) if len(item) > 3 else f"item {i}"

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        load, label, teacher_hard = self.items[i][:3]
        error = ""
        try:
            img = decode_image(load())
        except (ImageDecodeError, OSError) as exc:
            error = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
            if not self.skip_undecodable:
                raise ImageDecodeError(f"{self.path(i)}: {error}") from exc
            image = torch.zeros(3, self.img_size, self.img_size)  # dropped by decodable()
        else:
            box = global_box(height=img.height, width=img.width, resize=self.resize, crop=self.img_size)
            image = self.normalize(cut_view(img, box, False, self.img_size, interpolation=self.interpolation))
        out = {"image": image, "label": torch.tensor(label, dtype=torch.long)}
        if teacher_hard >= 0:
            out["teacher_hard"] = torch.tensor(teacher_hard, dtype=torch.long)
        if self.skip_undecodable:
            out["index"], out["error"] = torch.tensor(i, dtype=torch.long), error
        return out

    def decodable(self, batches: torch.utils.data.DataLoader | Iterator[dict],
                  skipped: list[dict[str, str]]) -> Iterator[dict]:
        """The batches of a DataLoader over this data set (default collate) without the images
        that did not decode.

        Args:
            batches: the loader, or any iterable of its batches.
            skipped: receives ``{"path", "reason"}`` for each dropped image, in order.
        Yields:
            Batches without the "index" and "error" keys; one with no decodable image is left out.
        """
        for batch in batches:
            if "error" not in batch:
                yield batch
                continue
            batch = dict(batch)
            errors, index = batch.pop("error"), batch.pop("index")
            keep = torch.tensor([not e for e in errors], dtype=torch.bool)
            skipped.extend({"path": self.path(int(index[j])), "reason": e} for j, e in enumerate(errors) if e)
            if keep.all():
                yield batch
            elif keep.any():
                yield {k: v[keep] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def eval_items(spec: str, *, image_size: int = 32, seed: int = 0) -> tuple[list, list[str]]:
    """Items for :class:`EvalImages` from shards (dir or pattern) or a source spec.

    Args:
        spec: a label-teacher output directory or brace pattern, ``digits:val``, or an ImageFolder.
        image_size: size digits are rendered at.
        seed: digits split seed.
    Returns:
        ``(items, class_names)``; items are ``(load, label, teacher_hard, path)``, where shard
        items carry the teacher's global hard label (-1 otherwise) and are named ``url#key``.
    """
    if is_shard_set(spec):
        items = []
        for url in expand_urls(spec):
            for raw in read_shard(url):
                s = decode_sample(raw)
                items.append(((lambda b=s["image"]: b), s["label"], int(s["hard"][0]), f"{url}#{s['key']}"))
        names = read_manifest(spec).get("class_names", []) if os.path.isdir(spec) else []
        return items, names
    source = resolve_source(spec, image_size=image_size, seed=seed)
    return [((lambda c=c: read_bytes(c)), c.label, -1, c.ref if c.kind == "file" else c.path)
            for c in source.candidates], source.class_names


__all__ = ["EvalImages", "eval_items"]
