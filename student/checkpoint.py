"""Loading DeiT weights: official checkpoints, timm state dicts, and resolution changes."""

from __future__ import annotations

import io
import os

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from deitpipe.shards import storage

# Wrappers under which training scripts store the weights (official DeiT: "model").
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")


def resample_pos_embed(
    pos_embed: torch.Tensor,
    *,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resize the patch part of a position embedding, keeping the prefix tokens as they are.

    timm's ``resample_abs_pos_embed``, set as facebookresearch/deit resizes for fine-tuning at
    384: bicubic, ``align_corners=False``, no antialiasing (timm's default antialias would change
    a downsampled grid).

    Args:
        pos_embed: (1, P + H*W, D).
        new_grid: target (H', W').
        num_prefix_tokens: P, 1 for the class token, 2 with the distillation token.
        old_grid: (H, W); inferred as square when omitted.
    Returns:
        (1, P + H'*W', D), same dtype.
    """
    if old_grid is None:
        patches = pos_embed.shape[1] - num_prefix_tokens
        side = int(round(patches ** 0.5))
        if side * side != patches:
            raise ValueError(f"pos_embed has {patches} patch tokens, not a square grid; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic",
                                  antialias=False)


_EXPECTED = ("expected the model's weights saved with torch.save(model.state_dict(), path), alone or under "
             + ", ".join(repr(k) for k in _WRAPPER_KEYS))


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
        for key in _WRAPPER_KEYS:
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


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    reset_heads: bool = False,
) -> nn.Module:
    """Load an official DeiT, timm or deitpipe checkpoint into ``model``, strictly.

    The position embedding is resampled when the checkpoint was trained at another resolution.

    Args:
        model: a ``DeiT``.
        path: the checkpoint file.
        reset_heads: keep the model's own (freshly initialised) ``head``/``head_dist`` instead of
            the checkpoint's, e.g. to fine-tune on another class count or from a headless backbone.
    Returns:
        ``model``, loaded.
    Raises:
        ValueError: one line naming the file, when it cannot be read (see :func:`read_state_dict`)
            or its names or shapes do not fit the model.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    is_head = (lambda k: k.split(".")[0] in ("head", "head_dist"))
    if reset_heads:  # also gives a headless backbone its heads
        state = {k: v for k, v in state.items() if not is_head(k)} | {k: v for k, v in own.items() if is_head(k)}
    heads = [k for k in state if is_head(k)]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        if any(k.split(".")[0] in ("dist_token", "head_dist") for k in missing + unexpected):
            fix = "is it a distilled model loaded into a plain one, or the reverse?"
        elif not unexpected and all(is_head(k) for k in missing):
            fix = "the file holds no classifier head; reset the heads to fine-tune from it"
        else:
            fix = "build the model with the variant and depth the checkpoint was trained with"
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} ({fix})")
    # pos_embed may differ in its token count: it is resampled below.
    shapes = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(v.shape)} in the model"
              for k, v in own.items() if k not in heads and state[k].shape != v.shape
              and not (k == "pos_embed" and state[k].ndim == 3 and state[k].shape[-1] == v.shape[-1])]
    if shapes:
        raise ValueError(
            f"checkpoint {path} does not fit the model: {shapes[0]}"
            f"{f' (and {len(shapes) - 1} more)' if len(shapes) > 1 else ''}; "
            "build the model with the variant and sizes the checkpoint was trained with"
        )
    bad = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the model"
           for k in heads if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(
            f"checkpoint {path} does not fit the model's heads: {'; '.join(bad)} "
            "(set num_classes to match, or reset the heads to fine-tune)"
        )
    if state["pos_embed"].shape != own["pos_embed"].shape:  # trained at another resolution
        grid = tuple(model.patch_embed.grid_size)
        patches = state["pos_embed"].shape[1] - model.num_prefix_tokens
        if patches < 1 or round(patches ** 0.5) ** 2 != patches:
            raise ValueError(f"checkpoint {path} has a pos_embed of {patches} patch tokens, not a square grid; "
                             "build the model with the img_size and patch_size it was trained with")
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], new_grid=grid,
                                                num_prefix_tokens=model.num_prefix_tokens)
    model.load_state_dict(state, strict=True)
    return model
