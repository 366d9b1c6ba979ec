"""DeiT students: timm's ViT and distilled ViT, as the DeiT authors trained them.

The networks are timm's ``VisionTransformer`` (plain variants) and ``VisionTransformerDistilled``
(distilled variants), so parameter names, initialisation and numerics are timm's and the official
DeiT checkpoints'. deitpipe adds three things on top: a frozen ``DeiTConfig`` (saved in every
checkpoint as ``asdict(model.config)``), the paper's return rule for the distilled model (in
training both heads' logits, in eval their average) and ``token_similarity`` (paper, section 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn


@dataclass(frozen=True)
class DeiTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    distilled: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        positive = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                    "num_heads")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}; "
                "choose sizes such that img_size % patch_size == 0"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1


def _timm_kwargs(c: DeiTConfig) -> dict:
    # DeiT's drop_rate (timm 0.3.2, which DeiT used) dropped after the position embedding and
    # after each projection; today's timm names those two rates, and its drop_rate is the head's.
    return dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans,
                num_classes=c.num_classes, embed_dim=c.embed_dim, depth=c.depth,
                num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, pos_drop_rate=c.drop_rate,
                proj_drop_rate=c.drop_rate, attn_drop_rate=c.attn_drop_rate,
                drop_path_rate=c.drop_path_rate)


class DeiT(nn.Module):
    """What deitpipe adds to timm's ViT; every student is one (build them with ``create_student``)."""

    config: DeiTConfig

    @property
    def distilled(self) -> bool:
        return self.config.distilled

    @torch.no_grad()
    def token_similarity(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of the class and distillation tokens, layer by layer.

        Args:
            x: images, (B, C, H, W).
        Returns:
            (depth + 1,) tensor, batch mean: index 0 is the input embedding (tokens plus position
            embedding), index i the output of block i. The paper reports about 0.06 at the input
            and 0.93 at the last layer of a trained DeiT-B.
        """
        if not self.distilled:
            raise ValueError("token_similarity needs a distilled model (one with a dist_token)")
        # timm's forward_features up to the blocks, then the blocks one at a time.
        h = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))  # (B, 2 + N, D)
        sims = [F.cosine_similarity(h[:, 0], h[:, 1], dim=-1).mean()]
        for block in self.blocks:
            h = block(h)
            sims.append(F.cosine_similarity(h[:, 0], h[:, 1], dim=-1).mean())
        return torch.stack(sims)


class _DistilledDeiT(DeiT, VisionTransformerDistilled):
    def __init__(self, config: DeiTConfig) -> None:
        super().__init__(**_timm_kwargs(config))
        self.config = config
        # timm returns the pair only with distilled training on; DeiT trains that way. In eval
        # timm returns the average either way.
        self.set_distilled_training(True)


class _PlainDeiT(DeiT, VisionTransformer):
    def __init__(self, config: DeiTConfig) -> None:
        super().__init__(**_timm_kwargs(config))
        self.config = config


_BASE = {"tiny": dict(embed_dim=192, num_heads=3), "small": dict(embed_dim=384, num_heads=6),
         "base": dict(embed_dim=768, num_heads=12)}

# Named variants, as timm and the official checkpoints name them (timm registers 8 of these 12;
# the tiny and small ones at 384 are the same networks at another resolution).
VARIANTS: dict[str, dict] = {
    f"deit_{size}{'_distilled' if distilled else ''}_patch16_{res}": dict(
        **dims, depth=12, patch_size=16, img_size=res, distilled=distilled
    )
    for size, dims in _BASE.items()
    for distilled in (False, True)
    for res in (224, 384)
}

OVERRIDES = frozenset({"embed_dim", "depth", "num_heads", "mlp_ratio", "drop_rate",
                       "attn_drop_rate", "drop_path_rate", "img_size", "patch_size", "in_chans"})


def create_student(
    name: str,
    *,
    num_classes: int = 1000,
    img_size: int | None = None,
    patch_size: int | None = None,
    **overrides,
) -> DeiT:
    """Build a named DeiT variant, optionally reshaped for other data.

    Args:
        name: a key of ``VARIANTS``, e.g. ``deit_tiny_distilled_patch16_224``.
        num_classes: size of both heads.
        img_size, patch_size: input resolution and patch size (e.g. 32 and 4 for digits).
        **overrides: any of ``OVERRIDES`` (embed_dim, depth, num_heads, drop_path_rate, ...);
            None leaves the variant's value.
    Returns:
        An initialised ``DeiT``: timm's ``VisionTransformerDistilled`` for distilled variants,
        its ``VisionTransformer`` otherwise.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown student model {name!r}; choose one of: {', '.join(VARIANTS)}")
    unknown = sorted(set(overrides) - OVERRIDES)
    if unknown:
        raise ValueError(
            f"unknown override(s) {', '.join(unknown)} for {name}; allowed: {', '.join(sorted(OVERRIDES))}"
        )
    spec = dict(VARIANTS[name], num_classes=num_classes)
    if img_size is not None:
        spec["img_size"] = img_size
    if patch_size is not None:
        spec["patch_size"] = patch_size
    spec.update({k: v for k, v in overrides.items() if v is not None})
    config = DeiTConfig(**spec)
    return _DistilledDeiT(config) if config.distilled else _PlainDeiT(config)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(config: DeiTConfig) -> float:
    """Approximate forward FLOPs (multiply-add = 2) of one image, for MFU figures."""
    n = config.num_prefix_tokens + (config.img_size // config.patch_size) ** 2
    d = config.embed_dim
    per_block = 2 * n * (4 * d * d + 2 * d * int(d * config.mlp_ratio)) + 4 * n * n * d
    embed = 2 * (config.img_size // config.patch_size) ** 2 * d * config.in_chans * config.patch_size**2
    return config.depth * per_block + embed + 2 * d * config.num_classes * config.num_prefix_tokens


__all__ = ["DeiT", "DeiTConfig", "VARIANTS", "create_student", "num_params", "flops_per_image"]
