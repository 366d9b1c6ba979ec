"""Reading weights files safely: a state dict alone or inside a training checkpoint.

Both stages read their weights here: the student's DeiT checkpoints
(:func:`deitpipe.student.checkpoint.load_checkpoint`) and the teacher's torchvision weights
(:func:`deitpipe.teacher.models.load_state_dict_file`). ``torch.load(weights_only=True)`` never
unpickles code, so a weights file cannot run any.
"""

from __future__ import annotations

import io
import os

import torch

from deitpipe.shards import storage

# Wrappers under which training scripts store the weights (official DeiT: "model").
WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")

_EXPECTED = ("expected the model's weights saved with torch.save(model.state_dict(), path), alone or under "
             + ", ".join(repr(k) for k in WRAPPER_KEYS))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights from a file without unpickling code (``weights_only=True``).

    Accepts a plain state dict or a training checkpoint that keeps it under "model",
    "state_dict", "model_ema" or "state_dict_ema"; a DDP "module." prefix is removed.

    Args:
        path: the checkpoint file.
    Returns:
        ``{name: tensor}``.
    Raises:
        ValueError: one line naming the file, when it is missing, not a torch file, or holds
            something other than a state dict. OSError and MemoryError pass through.
    """
    path = os.fspath(path)
    if storage.is_dir(path):
        raise ValueError(f"checkpoint {path} is a directory; pass the weights file in it "
                         f"(e.g. {storage.join(path, 'student.pt')})")
    if not storage.is_file(path):
        raise ValueError(f"checkpoint {path} does not exist; pass the path of a weights file "
                         "(a run's student.pt or a DeiT .pth)")
    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_object_uri(path) else path
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - torch raises several types for a file it cannot read
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:200]
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {reason}); "
                         "it must be a torch.save file holding tensors only") from e
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} is not a state dict (got {type(obj).__name__}); {_EXPECTED}")
    if not obj:
        raise ValueError(f"checkpoint {path} holds an empty dict; {_EXPECTED}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"checkpoint {path} is not a state dict: under {k!r} it holds "
                             f"{type(v).__name__}, not a tensor (keys {list(obj)[:5]}); {_EXPECTED}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


__all__ = ["WRAPPER_KEYS", "read_state_dict"]
