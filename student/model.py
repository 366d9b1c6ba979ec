"""DeiT: a ViT with a class token and, when distilled, a distillation token.

Reads like the paper (Touvron et al. 2020, fig. 2): patches are embedded by a strided conv, the
class and distillation tokens are prepended, a learned position embedding is added over all
2 + N tokens, pre-norm transformer blocks follow, and two linear heads read the two tokens. In
training the distilled model returns both heads' logits; in eval their average.

Parameter names follow timm's ``deit_*`` models and the official DeiT checkpoints exactly, so
state dicts move between the three strictly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from deitpipe.student.checkpoint import resample_pos_embed


class PatchEmbed(nn.Module):
    """Image to patch tokens with one conv of kernel = stride = patch size."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D/H)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0
        )  # (B, H, N, D/H)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as timm and the official checkpoints
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample; identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


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


class DeiT(nn.Module):
    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.num_classes = c.num_classes
        self.num_prefix_tokens = c.num_prefix_tokens
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.distilled else None
        num_tokens = self.num_prefix_tokens + self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, c.embed_dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        rates = torch.linspace(0, c.drop_path_rate, c.depth).tolist()  # stochastic depth decay
        self.blocks = nn.Sequential(*[
            Block(c.embed_dim, c.num_heads, mlp_ratio=c.mlp_ratio, drop=c.drop_rate,
                  attn_drop=c.attn_drop_rate, drop_path=rates[i])
            for i in range(c.depth)
        ])
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.head = nn.Linear(c.embed_dim, c.num_classes)
        self.head_dist = nn.Linear(c.embed_dim, c.num_classes) if c.distilled else None
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's default ViT init: truncated normal 0.02 for linears and tokens.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def distilled(self) -> bool:
        return self.dist_token is not None

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay (timm's convention)."""
        return {"pos_embed", "cls_token", "dist_token"}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1)  # (B, P + N, D), P = 1 or 2
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self._embed(x)))  # (B, P + N, D)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.head_dist is None:
            return x[:, 0] if pre_logits else self.head(x[:, 0])
        if pre_logits:
            return (x[:, 0] + x[:, 1]) / 2
        cls_logits, dist_logits = self.head(x[:, 0]), self.head_dist(x[:, 1])  # (B, C) each
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

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
        if self.dist_token is None:
            raise ValueError("token_similarity needs a distilled model (one with a dist_token)")
        h = self._embed(x)
        sims = [F.cosine_similarity(h[:, 0], h[:, 1], dim=-1).mean()]
        for block in self.blocks:
            h = block(h)
            sims.append(F.cosine_similarity(h[:, 0], h[:, 1], dim=-1).mean())
        return torch.stack(sims)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint trained at another resolution: resample its position embedding.
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            grid = self.patch_embed.grid_size
            state_dict[key] = resample_pos_embed(
                state_dict[key], new_grid=(grid, grid), num_prefix_tokens=self.num_prefix_tokens
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_BASE = {"tiny": dict(embed_dim=192, num_heads=3), "small": dict(embed_dim=384, num_heads=6),
         "base": dict(embed_dim=768, num_heads=12)}

# Named variants, as timm and the official checkpoints name them.
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
        **overrides: any of ``OVERRIDES`` (embed_dim, depth, num_heads, drop_path_rate, ...).
    Returns:
        An initialised ``DeiT``.
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
    return DeiT(DeiTConfig(**spec))


def config_from_dict(d: dict) -> DeiTConfig:
    """Rebuild a ``DeiTConfig`` from ``asdict(config)`` as stored in checkpoints."""
    names = {f.name for f in fields(DeiTConfig)}
    return replace(DeiTConfig(), **{k: v for k, v in d.items() if k in names})


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(config: DeiTConfig) -> float:
    """Approximate forward FLOPs (multiply-add = 2) of one image, for MFU figures."""
    n = config.num_prefix_tokens + (config.img_size // config.patch_size) ** 2
    d = config.embed_dim
    per_block = 2 * n * (4 * d * d + 2 * d * int(d * config.mlp_ratio)) + 4 * n * n * d
    embed = 2 * (config.img_size // config.patch_size) ** 2 * d * config.in_chans * config.patch_size**2
    return config.depth * per_block + embed + 2 * d * config.num_classes * config.num_prefix_tokens


__all__ = ["DeiT", "DeiTConfig", "VARIANTS", "create_student", "config_from_dict", "num_params",
           "flops_per_image"]
