"""Teacher preprocessing: what a teacher expects of its input, where that comes from, and the
normalisation applied to uint8 view crops on the device.

A teacher's preprocessing is resolved from four sources, first match per field wins:

1. explicit overrides (command-line options),
2. the JSON sidecar written next to fine-tuned weights (``teacher.pt`` -> ``teacher.json``),
3. the metadata of torchvision's default weights for the architecture,
4. the ImageNet default (resize 256, crop 224, ImageNet mean/std, bilinear).

A sidecar deitpipe writes carries a ``written_by`` marker; deitpipe replaces only a sidecar of its
own (:func:`check_weights_out`), never a ``.json`` another tool left beside the weights.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision

from deitpipe import __version__
from deitpipe.shards.format.conventions import (  # re-exported: defined once there
    INTERPOLATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from deitpipe.shards.storage.atomic import atomic_writer


# Sidecar keys that may carry the crop size; "input_size" is what timm-style tools write.
_CROP_KEYS = ("crop", "input_size")
# The key that marks a sidecar as deitpipe's; its value starts with SIDECAR_WRITER.
SIDECAR_MARKER = "written_by"
SIDECAR_WRITER = "deitpipe train-teacher"
# The keys of every sidecar train-teacher wrote before the marker, exactly.
_UNMARKED_SIDECAR_KEYS = frozenset({"model", "num_classes", "class_names", "resize", "crop", "mean", "std",
                                    "interpolation", "train"})


@dataclass(frozen=True)
class Preprocessing:
    """How a teacher's input is made: resize the short side, centre crop, normalise.

    Attributes:
        resize: short-side size before the centre crop of the eval transform.
        crop: square input size the teacher sees.
        mean: per-channel RGB mean in [0, 1] units.
        std: per-channel RGB standard deviation in [0, 1] units.
        interpolation: "bilinear", "bicubic" or "nearest".
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # JSON gives lists and ints may come as floats; store canonical types so that equality
        # and hashing behave.
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or int(value) <= 0:
                raise ValueError(f"preprocessing {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"preprocessing {name} needs 3 values (RGB), got {len(value)}")
            object.__setattr__(self, name, value)
        if min(self.std) <= 0:
            raise ValueError(f"preprocessing std must be positive, got {self.std}")
        interpolation = str(self.interpolation).lower()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocessing interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        object.__setattr__(self, "interpolation", interpolation)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists for mean/std)."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Build from a dict with the field names; ``input_size`` is accepted for ``crop``.

        Args:
            data: mapping with resize, crop (or input_size), mean, std, interpolation; other
                keys are ignored so a whole sidecar can be passed.

        Returns:
            The validated preprocessing.
        """
        fields = _preprocessing_fields(data)
        missing = {"resize", "crop", "mean", "std"} - fields.keys()
        if missing:
            raise ValueError(f"preprocessing is missing {', '.join(sorted(missing))}")
        return cls(**fields)


def _preprocessing_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing fields present in ``data``, with ``input_size`` mapped to ``crop``."""
    keys = ("resize", "mean", "std", "interpolation")
    fields = {k: data[k] for k in keys if data.get(k) is not None}
    for key in _CROP_KEYS:
        if data.get(key) is not None:
            fields["crop"] = data[key]
            break
    return fields


def default_preprocessing() -> Preprocessing:
    """The ImageNet eval transform: resize 256, crop 224, ImageNet mean/std, bilinear."""
    return Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def teacher_names() -> list[str]:
    """Names of torchvision's classification models (detection, video etc. are excluded)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_teacher_name(name: str) -> None:
    """Raise a one-line ValueError if ``name`` is not a torchvision classification model."""
    names = teacher_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(
        f"unknown teacher {name!r}{hint}: use a torchvision classification model name; list "
        "them with: python -c \"import torchvision; "
        "print(torchvision.models.list_models(module=torchvision.models))\""
    )


def default_weights(name: str) -> torchvision.models.WeightsEnum:
    """torchvision's default (best) pretrained weights for a classification model.

    Args:
        name: torchvision model name, e.g. "regnet_y_16gf".

    Returns:
        The weights enum member, e.g. ``RegNet_Y_16GF_Weights.IMAGENET1K_V2``.
    """
    check_teacher_name(name)
    return torchvision.models.get_model_weights(name).DEFAULT


def preprocessing_from_weights(weights: torchvision.models.WeightsEnum) -> Preprocessing:
    """Read the eval transform that torchvision publishes with a set of weights.

    Args:
        weights: a torchvision weights enum member of a classification model.

    Returns:
        Its resize, crop, mean, std and interpolation.
    """
    transform = weights.transforms()
    try:
        resize, crop = transform.resize_size, transform.crop_size
        mean, std, interpolation = transform.mean, transform.std, transform.interpolation
    except AttributeError as error:
        raise ValueError(f"{weights} does not publish an image-classification transform") from error
    return Preprocessing(
        # torchvision stores sizes as one-element lists.
        resize=resize[0] if isinstance(resize, (list, tuple)) else resize,
        crop=crop[0] if isinstance(crop, (list, tuple)) else crop,
        mean=tuple(mean),
        std=tuple(std),
        interpolation=getattr(interpolation, "value", interpolation),
    )


def sidecar_path(weights_path: str | os.PathLike) -> Path:
    """The JSON sidecar next to a weights file: ``teacher.pt`` -> ``teacher.json``."""
    return Path(weights_path).with_suffix(".json")


def read_sidecar(weights_path: str | os.PathLike) -> dict[str, Any] | None:
    """Read the sidecar of a weights file.

    Args:
        weights_path: the weights file (not the sidecar itself).

    Returns:
        The sidecar dict (keys: model, num_classes, class_names, crop or input_size, resize,
        mean, std, interpolation; all optional), or None when there is no sidecar. The
        ``written_by`` marker is left out.
    """
    path = sidecar_path(weights_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read teacher sidecar {path}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"teacher sidecar {path} must hold a JSON object")
    data.pop(SIDECAR_MARKER, None)
    return data


def is_own_sidecar(path: str | os.PathLike) -> bool:
    """Whether the JSON file at ``path`` is a sidecar deitpipe wrote.

    One with the ``written_by`` marker, or (written before the marker) a JSON object with exactly
    the keys train-teacher's sidecar has. An unreadable file is not deitpipe's.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    marker = data.get(SIDECAR_MARKER)
    if isinstance(marker, str):
        return marker.startswith(SIDECAR_WRITER + " ")
    return set(data) == _UNMARKED_SIDECAR_KEYS


def check_weights_out(weights_path: str | os.PathLike, *, option: str = "--out") -> None:
    """Refuse a weights path whose writing would replace something deitpipe did not write.

    Meant to run before any work, so that a refusal costs nothing: the weights path must not be
    a directory or a symbolic link, and its sidecar (``teacher.pt`` -> ``teacher.json``) must be
    absent or one deitpipe wrote (:func:`is_own_sidecar`), and not a link either. deitpipe makes
    no links, and writing renames over a link, which would drop it.

    Args:
        weights_path: the weights file about to be written.
        option: the option that named it, for the message.
    Raises:
        ValueError: one line naming the file and the fix.
    """
    weights = Path(weights_path)
    if os.path.isdir(weights) and not os.path.islink(weights):
        raise ValueError(f"{option} {weights} is a directory; name the weights file to write, "
                         f"e.g. {option} {weights / 'teacher.pt'}")
    if os.path.islink(weights):
        raise ValueError(f"{option} {weights} is a symbolic link, which deitpipe did not make and would "
                         f"replace; choose another {option}")
    _check_sidecar_target(weights, fix=f"choose another {option}")


def _check_sidecar_target(weights_path: str | os.PathLike, *, fix: str) -> None:
    """Raise one line when the sidecar of ``weights_path`` would replace a file not deitpipe's."""
    sidecar = sidecar_path(weights_path)
    if os.path.islink(sidecar):
        why = "is a symbolic link, which deitpipe did not make"
    elif os.path.isdir(sidecar):
        why = "is a directory"
    elif os.path.exists(sidecar) and not is_own_sidecar(sidecar):
        why = "was not written by deitpipe"
    else:
        return
    raise ValueError(f"{sidecar} {why}, and the sidecar of {weights_path} would replace it; "
                     f"{fix} (or move {sidecar.name} away)")


def write_sidecar(weights_path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write the sidecar of a weights file atomically and durably (``shards.storage.atomic``).

    The sidecar carries the ``written_by`` marker; an existing sidecar is replaced only when it
    is deitpipe's (:func:`check_weights_out`).

    Args:
        weights_path: the weights file the sidecar describes.
        data: JSON-serialisable dict, see :func:`read_sidecar` for the keys.

    Returns:
        The sidecar path.
    Raises:
        ValueError: one line, when the sidecar's path holds another tool's file, a directory or a link.
    """
    path = sidecar_path(weights_path)
    _check_sidecar_target(weights_path, fix="write the weights under another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, text=True) as file:
        json.dump({**data, SIDECAR_MARKER: f"{SIDECAR_WRITER} {__version__}"}, file, indent=2, sort_keys=True)
        file.write("\n")
    return path


def resolve_preprocessing(
    *,
    name: str,
    weights_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Preprocessing:
    """Resolve a teacher's preprocessing field by field.

    Precedence: overrides > sidecar of ``weights_path`` > torchvision default weights of
    ``name`` > ImageNet default.

    Args:
        name: torchvision model name.
        weights_path: fine-tuned weights whose sidecar is consulted, or None.
        overrides: fields to force (resize, crop/input_size, mean, std, interpolation); None
            values are ignored so unset command-line options can be passed as they are.

    Returns:
        The resolved preprocessing.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = overrides.keys() - {"resize", "mean", "std", "interpolation", *_CROP_KEYS}
    if unknown:
        raise ValueError(f"unknown preprocessing override(s): {', '.join(sorted(unknown))}")
    fields = preprocessing_from_weights(default_weights(name)).to_dict()
    if weights_path is not None:
        fields.update(_preprocessing_fields(read_sidecar(weights_path) or {}))
    fields.update(_preprocessing_fields(overrides))
    return Preprocessing.from_dict(fields)


def normalize(
    batch_uint8: torch.Tensor, prep: Preprocessing, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Turn uint8 crops into the teacher's normalised float input on ``device``.

    The crops are already cut at the teacher's input size; only ``(x / 255 - mean) / std`` is
    applied here. Float crops (rendered views: mixed or erased) are taken in [0, 1] units and
    get ``(x - mean) / std``.

    Args:
        batch_uint8: (N, 3, S, S) uint8 RGB crops, or float32 in [0, 1] units.
        prep: the teacher's preprocessing (mean and std are used).
        device: where the result lives.

    Returns:
        (N, 3, S, S) float32 tensor in channels-last memory format.
    """
    scale = 255.0 if batch_uint8.dtype == torch.uint8 else 1.0
    if batch_uint8.dtype not in (torch.uint8, torch.float32) or batch_uint8.ndim != 4 or batch_uint8.shape[1] != 3:
        raise ValueError(
            f"teacher input must be uint8 or float32 (N, 3, S, S), got {batch_uint8.dtype} "
            f"{tuple(batch_uint8.shape)}"
        )
    # Move uint8 (a quarter of the float bytes) and convert on the device.
    x = batch_uint8.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    # One fused multiply-add: x * 1/(255 std) - mean/std.
    out = torch.addcmul(-mean / std, x.float(), 1.0 / (scale * std))
    return out.contiguous(memory_format=torch.channels_last)
