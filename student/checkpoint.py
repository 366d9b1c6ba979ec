"""Loading DeiT weights: official checkpoints, timm state dicts, and resolution changes.

Files are read by :func:`~deitpipe.common.weights.read_state_dict` (``weights_only=True``), which
the teacher shares; it is re-exported here under its student name.
"""

from __future__ import annotations

import os

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from deitpipe.common.weights import read_state_dict

__all__ = ["load_checkpoint", "read_state_dict", "resample_pos_embed"]


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
    missing = [k for k in own if k not in state]  # in the model's order: blocks.4 before blocks.10
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(_another_model(path, own, state, missing, unexpected))
    # pos_embed may differ in its token count: it is resampled below.
    shapes = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(v.shape)} in the model"
              for k, v in own.items() if k not in heads and state[k].shape != v.shape
              and not _resamplable(k, state[k], v)]
    if shapes:
        raise ValueError(
            f"checkpoint {path} does not fit the model: {shapes[0]}"
            f"{f' (and {len(shapes) - 1} more)' if len(shapes) > 1 else ''}; {_size_difference(state, own)}"
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
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # what the checks above do not foresee still ends in one line
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())
        raise ValueError(f"checkpoint {path} does not fit the model: {detail[:200]}; "
                         "build the model with the variant and sizes the checkpoint was trained with") from e
    return model


def _resamplable(key: str, theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    """A position embedding of another token count but the same width: resampled, not refused."""
    return key == "pos_embed" and theirs.ndim == 3 and theirs.shape[-1] == ours.shape[-1]


def _sizes(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """What a DeiT state dict tells of its model: depth, embed_dim, patch_size, distilled (None: untold)."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    proj, cls_token = state.get("patch_embed.proj.weight"), state.get("cls_token")
    return {"depth": max(blocks) + 1 if blocks else None,
            "embed_dim": cls_token.shape[-1] if cls_token is not None else None,
            "patch_size": proj.shape[-1] if proj is not None and proj.ndim == 4 else None,
            "distilled": "dist_token" in state if cls_token is not None else None}


def _size_difference(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> str:
    """The fix for sizes that differ, e.g. ``"build it as the file's: depth 4 not 6"``."""
    a, b = _sizes(theirs), _sizes(ours)
    names = [k for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]]
    if not names:
        return "build the model with the variant and sizes the checkpoint was trained with"
    told = {True: "distilled", False: "plain"}
    return "build it as the file's: " + ", ".join(
        f"{told[a[k]]} not {told[b[k]]}" if k == "distilled" else f"{k} {a[k]} not {b[k]}" for k in names)


def _another_model(path: str | os.PathLike, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                   missing: list[str], unexpected: list[str]) -> str:
    """One line for a checkpoint whose names differ from the model's: counts, a few names, the fix.

    Torch's own message lists every key over many lines; this one names the first of each kind,
    e.g. ``checkpoint a.pt is for another model: 24 missing keys (blocks.4.norm1.weight, ...);
    build it as the file's: depth 4 not 6``.
    """
    def few(names: list[str]) -> str:
        return f"{names[0]}{', ...' if len(names) > 1 else ''}"

    shapes = [k for k, v in own.items() if k in state and state[k].shape != v.shape
              and not _resamplable(k, state[k], v)]
    parts = [f"{len(missing)} missing keys ({few(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({few(unexpected)})" if unexpected else "",
             f"{len(shapes)} of other shape ({shapes[0]}: {tuple(state[shapes[0]].shape)} vs "
             f"{tuple(own[shapes[0]].shape)})" if shapes else ""]
    is_head = (lambda k: k.split(".")[0] in ("head", "head_dist"))
    if not unexpected and all(is_head(k) for k in missing):
        fix = "the file holds no classifier head; reset the heads to fine-tune from it"
    else:
        fix = _size_difference(state, own)
    return f"checkpoint {path} is for another model: {', '.join(p for p in parts if p)}; {fix}"
