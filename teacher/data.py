"""The teacher's training data: a Source's decoded images in memory, and the crops it trains on.

Training views are RandomResizedCrop + flip, the kind of views stage one labels; evaluation is
the resize and centre crop of stage one's global view.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from deitpipe.shards.format.image import ImageDecodeError, decode_image
from deitpipe.shards.inputs import Source, read_bytes
from deitpipe.teacher.preprocess import Preprocessing


def train_transform(prep: Preprocessing, *, scale: tuple[float, float]) -> v2.Compose:
    """Random crop of ``prep.crop`` px, flip, normalise: uint8 (3, H, W) -> float (3, S, S)."""
    mode = v2.InterpolationMode(prep.interpolation)
    crop = v2.RandomResizedCrop(prep.crop, scale=scale, interpolation=mode, antialias=True)
    return v2.Compose([crop, v2.RandomHorizontalFlip(), *_to_input(prep)])


def eval_transform(prep: Preprocessing) -> v2.Compose:
    """Resize the short side, centre crop, normalise: the input stage one's global view gives."""
    mode = v2.InterpolationMode(prep.interpolation)
    resize = v2.Resize(prep.resize, interpolation=mode, antialias=True)
    return v2.Compose([resize, v2.CenterCrop(prep.crop), *_to_input(prep)])


def _to_input(prep: Preprocessing) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)]


class SourceImages(Dataset):
    """The decodable images of a Source as ``(transform(uint8 (3, H, W)), label)`` items.

    Undecodable inputs are skipped at construction and listed in ``skipped`` as
    ``(path, reason)``, as stage one skips them. Decoded pixels stay in memory.
    """

    def __init__(self, source: Source, transform: v2.Transform) -> None:
        self.transform = transform
        self.pixels: list[torch.Tensor] = []  # (3, H, W) uint8 each
        self.labels: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        for candidate in source.candidates:
            try:
                img = decode_image(read_bytes(candidate))
            except (ImageDecodeError, OSError) as error:
                self.skipped.append((candidate.path, str(error)))
                continue
            self.pixels.append(v2.functional.pil_to_tensor(img))
            self.labels.append(candidate.label)
        if not self.pixels:
            raise ValueError(f"input {source.spec!r} has no decodable images")

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.pixels[index]), self.labels[index]

    def with_transform(self, transform: v2.Transform) -> SourceImages:
        """The same images (shared, not copied) under another transform."""
        other = object.__new__(SourceImages)
        other.__dict__.update(self.__dict__, transform=transform)
        return other


__all__ = ["SourceImages", "eval_transform", "train_transform"]
