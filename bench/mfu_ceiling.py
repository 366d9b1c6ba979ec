"""How high can DeiT training MFU go on a GPU? A roofline estimate from counts measured here.

Measured on this machine, exactly for the library's model: per training step (forward and
backward) at the given batch, the FLOPs (``torch.utils.flop_counter``: matmuls and attention) and
the bytes of the activations autograd saves for backward under bfloat16 autocast
(``torch.autograd.graph.saved_tensors_hooks``). Both grow linearly with the batch, so they are
counted at ``--count-batch`` and twice that, and the difference scaled (what does not grow with
the batch, autocast's bf16 copies of the weights, is kept apart).

Modelled, with the GPU's data-sheet figures: a step takes at least

    t_compute = FLOPs / (peak * gemm_efficiency)
    t_memory  = (traffic_factor * saved bytes + optimizer bytes) / HBM bandwidth

and, since a PyTorch step runs its elementwise kernels (LayerNorm, GELU, residual adds, dropout
paths) between its GEMMs rather than under them, the two add up. ``traffic_factor`` = 4: each
saved activation is written in the forward and read in the backward, and its gradient is
written and read once. The MFU ceiling is FLOPs / peak / (t_compute + t_memory).

This is a model, not a GPU measurement: it says which goals a standard PyTorch step can reach,
and why a narrow model (DeiT-S, width 384) sits lower than a wide one (DeiT-B, width 768):
FLOPs grow with width squared, activation traffic with width.

Run: python bench/mfu_ceiling.py                  (DeiT-Ti/S/B at 224, batch 512, H100 SXM)
     python bench/mfu_ceiling.py --quick          (tiny model, seconds)
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchutil import emit, header
from deitpipe.student.loss import DistillationLoss
from deitpipe.student.model import create_student, flops_per_image, num_params

# Dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s), NVIDIA data sheets.
GPUS = {"H100-SXM": (989.0, 3.35), "H200": (989.0, 4.8), "A100-SXM": (312.0, 2.04)}


def _count(model: torch.nn.Module, batch: int) -> tuple[float, float]:
    """FLOPs and saved-tensor bytes of one bf16-autocast training step at ``batch``."""
    size = model.config.img_size
    x = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 1000, (batch,))
    teacher = torch.softmax(torch.randn(batch, 1000), -1)
    loss_fn = DistillationLoss(distillation="soft", alpha=0.5, tau=1.0, label_smoothing=0.1)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            saved[0] += t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cls_logits, dist_logits = model(x)
            loss = loss_fn(cls_logits.float(), dist_logits.float(), labels, teacher)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()), float(saved[0])


def step_counts(name: str, *, batch: int, overrides: dict) -> dict:
    """Per-image FLOPs and saved-activation bytes of a training step, and the per-step bytes that
    do not grow with the batch (autocast's bf16 copies of the weights).

    Counted at ``batch`` and ``2 * batch``: the difference is what one more image costs.
    """
    torch.manual_seed(0)
    model = create_student(name, num_classes=1000, drop_path_rate=0.1, **overrides).train()
    (f1, s1), (f2, s2) = _count(model, batch), _count(model, 2 * batch)
    cfg = model.config
    tokens = cfg.num_prefix_tokens + (cfg.img_size // cfg.patch_size) ** 2
    # The CPU's fused attention kernel has no FLOP formula in the counter: QK^T and AV, 4 n^2 d per
    # block forward, counted 3x for training as every other op is.
    attention = 3 * cfg.depth * 4 * tokens**2 * cfg.embed_dim
    per_image_flops = (f2 - f1) / batch + attention
    return {"flops_per_image": per_image_flops, "saved_bytes_per_image": (s2 - s1) / batch,
            "saved_bytes_fixed": s1 - (s2 - s1), "params": num_params(model),
            "flops_over_3x_forward_formula": per_image_flops / (3 * flops_per_image(cfg))}


def ceiling(counts: dict, *, batch: int, peak_tflops: float, hbm_tbs: float, gemm_efficiency: float,
            traffic_factor: float) -> dict:
    flops = counts["flops_per_image"] * batch
    # fp32 master weights, grads, two Adam moments read and written, bf16 copies: ~ 8 x 4 bytes each
    optimizer_bytes = counts["params"] * 32
    traffic = (traffic_factor * counts["saved_bytes_per_image"] * batch + 2 * counts["saved_bytes_fixed"]
               + optimizer_bytes)
    t_compute = flops / (peak_tflops * 1e12 * gemm_efficiency)
    t_memory = traffic / (hbm_tbs * 1e12)
    return {"step_tflop": flops / 1e12, "traffic_gb": traffic / 1e9, "t_compute_ms": 1e3 * t_compute,
            "t_memory_ms": 1e3 * t_memory,
            "mfu_ceiling": flops / (peak_tflops * 1e12) / (t_compute + t_memory)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_tiny_distilled_patch16_224",
                                                        "deit_small_distilled_patch16_224",
                                                        "deit_base_distilled_patch16_224"])
    parser.add_argument("--batch", type=int, default=512, help="batch the ceiling is for")
    parser.add_argument("--count-batch", type=int, default=2, help="counted here at this batch and twice it")
    parser.add_argument("--gpu", default="H100-SXM", choices=sorted(GPUS))
    parser.add_argument("--gemm-efficiency", type=float, nargs="+", default=[1.0, 0.7],
                        help="fraction of the peak the GEMMs reach (1.0: the hard bound)")
    parser.add_argument("--traffic-factor", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="a tiny model at 32 px")
    args = parser.parse_args()
    overrides = {}
    if args.quick:
        args.models, args.count_batch, args.batch = ["deit_tiny_distilled_patch16_224"], 1, 8
        overrides = dict(img_size=32, patch_size=8, depth=2)
    peak, hbm = GPUS[args.gpu]
    header(gpu=args.gpu, peak_tflops=peak, hbm_tbs=hbm, batch=args.batch)
    for name in args.models:
        counts = step_counts(name, batch=args.count_batch, overrides=overrides)
        emit({"model": name, "gflop_per_image": counts["flops_per_image"] / 1e9,
              "flops_over_3x_forward_formula": counts["flops_over_3x_forward_formula"],
              "saved_mb_per_image": counts["saved_bytes_per_image"] / 1e6,
              "saved_mb_fixed": counts["saved_bytes_fixed"] / 1e6})
        for eff in args.gemm_efficiency:
            emit({"model": name, "batch": args.batch, "gpu": args.gpu, "gemm_efficiency": eff,
                  **ceiling(counts, batch=args.batch, peak_tflops=peak, hbm_tbs=hbm, gemm_efficiency=eff,
                            traffic_factor=args.traffic_factor)})


if __name__ == "__main__":
    main()
