"""Forward throughput of deitpipe's DeiT against timm's on the same weights and input.

Prints images/s of both and the ratio (goal: >= 1.0). Run: python bench/student_forward.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from deitpipe.student import create_student


def images_per_second(model: torch.nn.Module, x: torch.Tensor, *, warmup: int, iters: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        return iters * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["deit_tiny_distilled_patch16_224",
                                                        "deit_small_distilled_patch16_224"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; best is kept")
    args = parser.parse_args()
    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    for name in args.models:
        ours = create_student(name).eval()
        ref = timm.create_model(name, pretrained=False).eval()
        ref.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(args.batch_size, 3, ours.config.img_size, ours.config.img_size)
        best = {"deitpipe": 0.0, "timm": 0.0}
        for _ in range(args.rounds):  # alternate so drift in machine load hits both
            best["deitpipe"] = max(best["deitpipe"], images_per_second(ours, x, warmup=2, iters=args.iters))
            best["timm"] = max(best["timm"], images_per_second(ref, x, warmup=2, iters=args.iters))
        ratio = best["deitpipe"] / best["timm"]
        print(json.dumps({"model": name, "batch": args.batch_size,
                          "deitpipe_img_s": round(best["deitpipe"], 1),
                          "timm_img_s": round(best["timm"], 1), "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
