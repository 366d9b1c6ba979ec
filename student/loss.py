"""The DeiT distillation objective (Touvron et al. 2020, section 4).

    total = (1 - alpha) * CE(cls_logits, y) + alpha * D(dist_logits, teacher)

with ``D`` the soft term ``tau**2 * KL(p_T^tau || softmax(dist_logits / tau))`` or the hard term
``CE(dist_logits, argmax p_T)``. The teacher ran offline, so what reaches the loss is its
probability distribution ``p_T`` (tau = 1) for the exact view, not its logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DISTILLATION_TYPES = ("none", "soft", "hard")


def split_outputs(outputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model output as ``(cls_logits, dist_logits or None)``.

    A distilled DeiT in training returns a pair; a plain ViT (or any classifier) one tensor.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs, None
    cls_logits, dist_logits = outputs
    return cls_logits, dist_logits


def temper(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """Soften (tau > 1) or sharpen (tau < 1) a probability distribution: ``p^(1/tau)`` renormalised.

    For a full distribution this is exactly ``softmax(logits / tau)``. Stored teacher
    probabilities are reconstructed from a top-k with the missing mass spread over the rest, so
    the result is ``softmax(logits / tau)`` up to that approximation of the tail.

    Args:
        probs: (B, C) probabilities, rows summing to 1; zeros allowed.
        tau: temperature > 0.
    Returns:
        (B, C) probabilities.
    """
    if tau == 1.0:
        return probs
    # log(0) = -inf stays a zero after softmax, so an exactly-zero class never gains mass.
    return torch.softmax(torch.log(probs) / tau, dim=-1)


class DistillationLoss(nn.Module):
    """DeiT's loss: class head on the true labels, distillation head on the teacher.

    Choices, each documented where the paper leaves room:

    * Soft KL is averaged over the batch ("batchmean", the paper's per-sample KL), not over
      ``B * C`` as DeiT's ``losses.py`` does (``numel``); that code's soft term is therefore
      ``C`` times smaller than the formula at the same alpha.
    * ``label_smoothing`` applies to cross-entropies against the true labels only, never to the
      teacher's targets.
    * ``distillation="none"`` ignores alpha and the teacher: the loss is the class head's
      cross-entropy; a distilled model's second head is trained on the true labels too and the
      two cross-entropies are averaged (timm and DeiT's behaviour without a teacher, so the
      distillation head is not left random). ``"dist"`` is then a zero tensor.
    * A non-distilled model (one output tensor) with soft or hard distillation puts both terms
      on its single head: the paper's "usual distillation" baseline (table 3, class token).

    Args:
        distillation: "none", "soft" or "hard".
        alpha: weight of the distillation term, in [0, 1].
        tau: distillation temperature, > 0 (soft only).
        label_smoothing: epsilon for the true-label cross-entropy, in [0, 1).
    """

    def __init__(
        self,
        *,
        distillation: str,
        alpha: float = 0.5,
        tau: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if distillation not in DISTILLATION_TYPES:
            raise ValueError(
                f"--distillation must be one of {', '.join(DISTILLATION_TYPES)}, got {distillation!r}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
        if not tau > 0.0:
            raise ValueError(f"--tau must be > 0, got {tau}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
        self.distillation = distillation
        self.alpha = alpha
        self.tau = tau
        self.label_smoothing = label_smoothing

    def extra_repr(self) -> str:
        return (f"distillation={self.distillation}, alpha={self.alpha}, tau={self.tau}, "
                f"label_smoothing={self.label_smoothing}")

    def forward(
        self,
        cls_logits: torch.Tensor,
        dist_logits: torch.Tensor | None,
        labels: torch.Tensor,
        teacher_targets: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Loss and its parts.

        Args:
            cls_logits: (B, C) class-head logits.
            dist_logits: (B, C) distillation-head logits, or None for a non-distilled model.
            labels: (B,) int64 class indices, or (B, C) soft labels (mixup / cutmix).
            teacher_targets: (B, C) teacher probabilities; unused (may be None) for "none".
        Returns:
            ``{"loss": total to backpropagate, "cls": class-head CE, "dist": distillation term}``,
            scalar float32 tensors.
        """
        # Losses in float32 whatever the autocast dtype of the forward pass.
        cls_logits = cls_logits.float()
        dist_logits = None if dist_logits is None else dist_logits.float()
        labels = labels.long() if labels.ndim == 1 else labels.float()
        cls = F.cross_entropy(cls_logits, labels, label_smoothing=self.label_smoothing)
        if self.distillation == "none":
            if dist_logits is None:
                return {"loss": cls, "cls": cls, "dist": torch.zeros_like(cls)}
            second = F.cross_entropy(dist_logits, labels, label_smoothing=self.label_smoothing)
            return {"loss": (cls + second) / 2, "cls": cls, "dist": torch.zeros_like(cls)}
        if teacher_targets is None:
            raise ValueError(
                f"--distillation {self.distillation} needs teacher targets, but the batch has no "
                "'teacher' key; label the shards with a teacher or use --distillation none"
            )
        student = cls_logits if dist_logits is None else dist_logits
        teacher = teacher_targets.float()
        if self.distillation == "soft":
            dist = self._soft(student, teacher)
        else:
            dist = F.cross_entropy(student, teacher.argmax(dim=-1))
        loss = (1.0 - self.alpha) * cls + self.alpha * dist
        return {"loss": loss, "cls": cls, "dist": dist}

    def _soft(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        # KL(p_T^tau || q^tau) per sample, averaged over the batch; tau^2 keeps the gradient
        # scale independent of tau (Hinton et al. 2015).
        target = temper(teacher, self.tau)
        log_q = F.log_softmax(student / self.tau, dim=-1)
        kl = F.kl_div(log_q, target, reduction="batchmean", log_target=False)
        return kl * self.tau**2


__all__ = ["DISTILLATION_TYPES", "DistillationLoss", "split_outputs", "temper"]
