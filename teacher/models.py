"""Teacher construction: any torchvision classification model, with fine-tuned weights from a
file or torchvision's published weights from the torch hub cache.

Every checkpoint is read by :func:`~deitpipe.common.weights.read_state_dict`, which the student
shares (``torch.load(weights_only=True)``), so a weights file can never run code. The model comes
back in eval mode on the CPU, with a :class:`TeacherInfo` that records what was loaded (for
manifests) and how its input must be prepared.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from deitpipe.common.weights import read_state_dict
from deitpipe.shards.storage import file_sha256
from deitpipe.teacher.preprocess import (
    Preprocessing,
    check_teacher_name,
    default_weights,
    read_sidecar,
    resolve_preprocessing,
)

# DataParallel/DDP and torch.compile wrap the model and prefix every key; read_state_dict removes
# one "module." only, and a compiled DDP model saves "module._orig_mod." (or the reverse).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Old torchvision DenseNet checkpoints (still the published ones) name layers "norm.1" etc.
_DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


@dataclass(frozen=True)
class TeacherInfo:
    """What a built teacher is, for manifests and for the labelling predictor.

    Attributes:
        name: torchvision model name.
        weights: path of the weights file, or the torchvision weights name
            (e.g. "RegNet_Y_16GF_Weights.IMAGENET1K_V2").
        weights_sha256: hex digest of the file actually loaded, or None.
        num_classes: size of the classifier head.
        preprocessing: the input the teacher expects.
        class_names: one name per class, or None when unknown.
    """

    name: str
    weights: str
    weights_sha256: str | None
    num_classes: int
    preprocessing: Preprocessing
    class_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (class names as a list)."""
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        data["class_names"] = list(self.class_names) if self.class_names is not None else None
        return data


def hub_cache_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torch hub keeps a torchvision weights file: ``<hub dir>/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def build_teacher(
    name: str,
    *,
    weights_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    allow_download: bool = False,
    preprocessing_overrides: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, TeacherInfo]:
    """Build a torchvision classification model with trained weights, in eval mode on the CPU.

    Args:
        name: torchvision model name, e.g. "regnet_y_16gf".
        weights_path: fine-tuned weights (plain state dict, or nested under "model",
            "state_dict", "model_ema" or "state_dict_ema"); None for torchvision's default
            ImageNet weights.
        num_classes: head size; with ``weights_path`` it defaults to the sidecar's value, else
            to the file's classifier shape. Without ``weights_path`` only 1000 is allowed.
        allow_download: fetch torchvision weights missing from the hub cache.
        preprocessing_overrides: fields forced on the resolved preprocessing.

    Returns:
        The model and its :class:`TeacherInfo`.
    """
    check_teacher_name(name)
    prep = resolve_preprocessing(
        name=name, weights_path=weights_path, overrides=preprocessing_overrides
    )
    if weights_path is not None:
        return _build_from_file(name, Path(weights_path), num_classes=num_classes, prep=prep)
    return _build_from_torchvision(
        name, num_classes=num_classes, allow_download=allow_download, prep=prep
    )


def _build_from_file(
    name: str, path: Path, *, num_classes: int | None, prep: Preprocessing
) -> tuple[nn.Module, TeacherInfo]:
    """Build ``name`` and load fine-tuned weights from ``path`` (see :func:`build_teacher`)."""
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file {path} does not exist (--teacher-weights)")
    sidecar = read_sidecar(path) or {}
    if sidecar.get("model") not in (None, name):
        raise ValueError(
            f"{path.with_suffix('.json')} describes a {sidecar['model']} but the teacher is "
            f"{name}; pass --teacher {sidecar['model']}"
        )
    state = load_state_dict_file(path)
    arch_kwargs = _arch_kwargs(name, prep, state)
    if num_classes is None:
        num_classes = sidecar.get("num_classes") or _infer_num_classes(name, state, arch_kwargs)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **arch_kwargs)
    _load_strict(model, state, source=str(path), name=name, num_classes=num_classes)
    names = sidecar.get("class_names")
    info = TeacherInfo(
        name=name,
        weights=str(path),
        weights_sha256=file_sha256(path),
        num_classes=num_classes,
        preprocessing=prep,
        class_names=tuple(names) if names else None,
    )
    return model.eval(), info


def _build_from_torchvision(
    name: str, *, num_classes: int | None, allow_download: bool, prep: Preprocessing
) -> tuple[nn.Module, TeacherInfo]:
    """Build ``name`` with torchvision's default weights from the hub cache."""
    weights = default_weights(name)
    categories = weights.meta.get("categories")
    head = len(categories) if categories else 1000
    if num_classes is not None and num_classes != head:
        raise ValueError(
            f"--num-classes {num_classes} needs --teacher-weights: the published {weights} head "
            f"has {head} classes; fine-tune with `deitpipe train-teacher` first"
        )
    path = _cached_weights_file(weights, allow_download=allow_download)
    state = load_state_dict_file(path)
    model = torchvision.models.get_model(
        name, weights=None, num_classes=head, **_arch_kwargs(name, prep, state)
    )
    _load_strict(model, state, source=str(path), name=name, num_classes=head)
    info = TeacherInfo(
        name=name,
        weights=str(weights),
        weights_sha256=file_sha256(path),
        num_classes=head,
        preprocessing=prep,
        class_names=tuple(categories) if categories else None,
    )
    return model.eval(), info


def _cached_weights_file(weights: torchvision.models.WeightsEnum, *, allow_download: bool) -> Path:
    """The hub-cache file of ``weights``, downloaded first when allowed and missing."""
    path = hub_cache_file(weights)
    if path.is_file():
        return path
    fix = (
        f"no weights for the teacher: put {weights} ({weights.url}) at {path}, "
        "or pass --teacher-weights FILE"
    )
    if not allow_download:
        raise FileNotFoundError(fix)
    path.parent.mkdir(parents=True, exist_ok=True)
    # torchvision file names end in the first hex digits of the file's SHA-256.
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        torch.hub.download_url_to_file(
            weights.url, str(path), hash_prefix=match.group(1) if match else None
        )
    except Exception as error:  # any network or hash failure ends in the same fix
        raise FileNotFoundError(f"{fix} (download failed: {error})") from error
    return path


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict with :func:`~deitpipe.common.weights.read_state_dict`, then undo
    the wrappings it leaves for torchvision models.

    ``read_state_dict`` unwraps "model", "state_dict", "model_ema" and "state_dict_ema" and one
    "module." prefix; on top of it the teacher removes any mix of "module."/"_orig_mod."
    (torch.compile) prefixes and renames old DenseNet keys ("norm.1" -> "norm1").

    Args:
        path: a ``torch.save`` file holding a state dict, or a checkpoint dict holding one.

    Returns:
        Flat ``{parameter name: tensor}``.

    Raises:
        ValueError: one line naming the file, when it is missing, not a torch file, or holds no
            state dict (OSError and MemoryError pass through).
    """
    return {_clean_key(k): v for k, v in read_state_dict(path).items()}


def _clean_key(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):  # each prefix is one dotted component
        key = key.split(".", 1)[1]
    match = _DENSENET_LEGACY_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def _arch_kwargs(name: str, prep: Preprocessing, state: Mapping[str, torch.Tensor]) -> dict:
    """Constructor arguments torchvision's builders add when they load weights themselves.

    Building with ``weights=None`` and loading the file ourselves (safely, weights_only) skips
    those builders, so the few architecture switches they set are mirrored here.
    """
    if name.startswith("vit_"):
        return {"image_size": prep.crop}  # position embeddings are sized for the input
    if name.startswith("maxvit_"):
        return {"input_size": (prep.crop, prep.crop)}
    if name in ("googlenet", "inception_v3"):
        # ImageNet-trained Inception weights expect their own input rescaling.
        aux = any(k.startswith(("aux1.", "aux2.", "AuxLogits.")) for k in state)
        return {"transform_input": True, "aux_logits": aux, "init_weights": False}
    return {}


def _infer_num_classes(name: str, state: Mapping[str, torch.Tensor], arch_kwargs: dict) -> int:
    """Head size read from the weight of the model's last Linear (or Conv2d) in ``state``."""
    # The meta device builds the module tree without allocating or initialising weights.
    try:
        with torch.device("meta"):
            probe = torchvision.models.get_model(name, weights=None, **arch_kwargs)
    except Exception:  # an initialiser that cannot run on meta: pay for a real build
        probe = torchvision.models.get_model(name, weights=None, **arch_kwargs)
    heads = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear)]
    heads = heads or [n for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)]
    key = f"{heads[-1]}.weight" if heads else None
    if key not in state:
        raise ValueError(
            f"cannot tell the number of classes of {name} weights ({key or 'head'} is missing); "
            "pass --num-classes"
        )
    return int(state[key].shape[0])


def _load_strict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    name: str,
    num_classes: int,
) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatches."""
    expected = model.state_dict()
    wrong = [
        f"{k} is {tuple(v.shape)} in the file but {tuple(expected[k].shape)} in the model"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    problems = wrong[:3]
    if missing:
        problems.append(f"missing key(s) {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {_first(unexpected)}")
    if problems:
        raise ValueError(
            f"teacher weights {source} do not fit {name} with {num_classes} classes: "
            f"{'; '.join(problems)}; check --teacher, or pass --num-classes matching the file"
        )
    model.load_state_dict(state, strict=True)


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
