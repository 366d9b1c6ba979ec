"""What a launcher costs: the same short train-student run under --launcher local and ray.

Trains a tiny student for a few epochs on a synthetic shard set, once per launcher, and prints
the wall time of each and the difference (Ray's start-up: the local Ray instance, Ray Train's
controller and worker group), plus whether both logged the same losses.

Run: python bench/launch_overhead.py [--epochs 2] [--samples 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import write_shard_set  # noqa: E402 - the test suite's small shard sets

from deitpipe.pipeline.config import TrainConfig  # noqa: E402
from deitpipe.pipeline.train import train_student  # noqa: E402
from deitpipe.shards.format import schema  # noqa: E402
from deitpipe.student.runfiles import read_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_shard_set(shards, num_samples=args.samples, shard_size=64, views=3, topk=3, num_classes=10)
        manifest = json.loads((shards / schema.MANIFEST_NAME).read_text())
        manifest.update(complete=True, teacher={"name": "resnet18"}, class_names=[str(i) for i in range(10)])
        (shards / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
        seconds, losses = {}, {}
        for launcher in ("local", "ray"):
            out = Path(tmp) / launcher
            config = TrainConfig(shards=str(shards), out=str(out), epochs=args.epochs, batch_size=16, lr=5e-3,
                                 img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, progress=False,
                                 cpus_per_worker=1, launcher=launcher)
            start = time.perf_counter()
            result = train_student(config)
            seconds[launcher] = time.perf_counter() - start
            losses[launcher] = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
            print(json.dumps({"launcher": launcher, "seconds": round(seconds[launcher], 2),
                              "epochs": result["epochs_done"], "loss": round(result["last"]["loss"], 6)}), flush=True)
        same = all(abs(a - b) <= 1e-5 for a, b in zip(losses["local"], losses["ray"]))
        print(json.dumps({"ray_minus_local_s": round(seconds["ray"] - seconds["local"], 2),
                          "ray_over_local": round(seconds["ray"] / seconds["local"], 2), "same_losses": same}))


if __name__ == "__main__":
    main()
