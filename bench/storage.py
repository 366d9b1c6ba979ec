"""What a stored view costs on disk, and what storing only the top-k of the teacher's softmax loses.

Three measurements:
    payload   bytes per view by the schema (``schema.bytes_per_view``: box, flip, hard, top-k
              indices and float16 probabilities, rest), for C = 10 and 1000 and each K;
    on_disk   bytes per sample and per view in the tars of a real label-teacher output (schema
              version 2), and of the same samples rewritten in version 1: the whole tar, the
              tar without the image members, and the per-view members alone (version 2: the one
              ``views.npy``; version 1: box, flip, hard, topk, prob, rest). Tar and .npy headers
              included: every member costs a 512-byte header and is padded to 512 bytes;
    fidelity  for each K, over real teacher softmaxes of random views: how often the argmax of
              the reconstruction (stored top-k float16 + leftover spread uniformly, exactly
              ``reader.teacher_distribution``) equals the argmax of the full softmax, and
              KL(full softmax || reconstruction).

The 10-class teacher is trained first (``deitpipe.teacher.train``: resnet18 at 32 px on the
digits' training split, AdamW, 5 epochs: about 93% held-out), so its softmaxes are peaked the way
trained networks' are; its views are cut from the held-out digits. For 1000 classes, real ImageNet weights (``--imagenet-weights``, a state
dict with its sidecar) over real photos (``--imagenet-data``) give the realistic figure; without
them a random-init RegNet with logits scaled to a chosen mean top-1 probability stands in, which
is NOT a realistic distribution (its tail is far flatter than a trained network's), and its row
says so ("realistic": false).

Goals at K = 10: payload <= 64 B/view, mean KL <= 0.01, and per-view members <= 1.6 KB a sample
with 8 views (``--views 8``).

Run: python bench/storage.py            (trains the digits teacher: about a minute on 2 cores)
     python bench/storage.py --quick    (tiny settings)
     python bench/storage.py --on-disk-only --views 8   (only the on_disk rows, random-init teachers)
"""

from __future__ import annotations

import argparse
import math
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchutil import emit, header, photo_folder, save_random_teacher
from loader_cost import rewrite_shards
from deitpipe.pipeline.config import LabelConfig
from deitpipe.pipeline.label import label_teacher
from deitpipe.teacher.labelling import image_views
from deitpipe.shards.format import schema
from deitpipe.shards.format.reader import expand_urls, teacher_distribution
from deitpipe.shards.inputs import read_bytes, resolve_source
from deitpipe.teacher import build_teacher, normalize, summarize_probs

# Every per-view member of either schema version.
VIEW_MEMBERS = (schema.VIEWS,) + schema.V1_VIEW_MEMBERS + (schema.SOFTMAX,)


def train_digits_teacher(path: Path, args: argparse.Namespace) -> Path:
    """A real, trained 10-class teacher: resnet18 at 32 px on the digits' training split."""
    from deitpipe.teacher.train import TeacherTrainConfig, train_teacher

    data = "digits:train" if args.teacher_images >= 1200 else _first_digits(
        path.parent, args.teacher_images, split="train")
    result = train_teacher(TeacherTrainConfig(
        data=data, out=str(path), teacher=args.digits_teacher, epochs=args.teacher_epochs,
        optimizer=args.teacher_optimizer, img_size=32, image_size=32, val="digits:val", device="cpu",
        progress=False))
    emit({"row": "teacher", "model": args.digits_teacher, "epochs": args.teacher_epochs,
          "optimizer": args.teacher_optimizer, "images": args.teacher_images,
          "train_top1": result["train_top1"], "val_top1": result["val_top1"],
          "seconds": result["seconds"]})
    return path


def view_logits(weights: Path | None, name: str, data: str, *, views: int, images: int,
                image_size: int) -> torch.Tensor:
    """Teacher logits of the global view and ``views`` random views of the first ``images`` inputs."""
    model, info = build_teacher(name, weights_path=weights)
    source = resolve_source(data, image_size=image_size)
    pixels = [image_views(read_bytes(c), key=schema.sample_key(i), seed=0, views=views,
                          prep=info.preprocessing)[1] for i, c in enumerate(source.candidates[:images])]
    x = torch.from_numpy(np.concatenate(pixels))  # (images * (V+1), 3, S, S) uint8
    with torch.inference_mode():
        return torch.cat([model(normalize(x[i:i + 64], info.preprocessing)).float()
                          for i in range(0, len(x), 64)])


def scale_to_confidence(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Multiply logits by the factor that makes the mean top-1 probability ``target`` (bisection)."""
    low, high = 1e-3, 1e4
    for _ in range(60):
        mid = math.sqrt(low * high)
        mean_top = (logits * mid).softmax(-1).max(-1).values.mean().item()
        low, high = (mid, high) if mean_top < target else (low, mid)
    return logits * math.sqrt(low * high)


# Floor of the reconstruction inside the KL. A stored rest of 0 gives the tail classes exactly 0
# while the full softmax still has mass there (KL = inf); with the floor such rows count what the
# lost mass costs, and ``tail_mass_lost`` reports that mass itself.
KL_FLOOR = 1e-12


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || max(q, KL_FLOOR)) per row, float64."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, KL_FLOOR))), 0.0)
    return terms.sum(-1)


def reconstruct(stored: dict, rows: int, num_classes: int) -> np.ndarray:
    return np.stack([teacher_distribution(stored, i, num_classes) for i in range(rows)]).astype(np.float64)


def fidelity(probs: torch.Tensor, topk: int) -> dict:
    """Top-1 agreement and KL(full || reconstruction) of top-k storage over softmax rows."""
    num_classes = probs.shape[1]
    out = summarize_probs(probs, topk=topk, full_softmax=False, index_dtype=schema.class_dtype(num_classes))
    stored = {"key": "bench", "topk": out.topk, "prob": out.prob, "rest": out.rest}
    recon = reconstruct(stored, len(probs), num_classes)
    full = probs.double().numpy()
    full = full / full.sum(-1, keepdims=True)
    kl = kl_rows(full, recon)
    lost = np.where(recon == 0, full, 0.0).sum(-1)  # mass of classes the reconstruction zeroed
    # The same top-k, with the leftover mass from the float32 probabilities instead of
    # 1 - sum(float16 top-k): what the float16 rounding of the top probabilities costs.
    exact_rest = 1.0 - probs.topk(min(topk, num_classes), -1).values.double().sum(-1)
    alt = {**stored, "rest": exact_rest.clamp_min(0).numpy()}
    kl_alt = kl_rows(full, reconstruct(alt, len(probs), num_classes))
    return {
        "top1_agree": float((recon.argmax(-1) == full.argmax(-1)).mean()),
        "kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)), "kl_max": float(kl.max()),
        "rows_tail_lost": float((lost > 0).mean()), "tail_mass_lost_mean": float(lost.mean()),
        "kl_mean_rest_from_fp32": float(kl_alt.mean()),
    }


def fidelity_rows(case: str, logits: torch.Tensor, ks: list[int], *, realistic: bool) -> None:
    probs = logits.softmax(-1)
    top = probs.max(-1).values
    for k in sorted({min(k, probs.shape[1]) for k in ks}):
        row = {"row": "fidelity", "case": case, "realistic": realistic, "num_classes": probs.shape[1],
               "topk": k, "rows": len(probs), "mean_top1_prob": float(top.mean()),
               "median_top1_prob": float(top.median()), **fidelity(probs, k)}
        emit(row)


def on_disk(urls: list[str], *, views: int) -> dict:
    """Bytes per sample and per view of shards, split into image, per-view members and the rest."""
    total = image = view_members = samples = 0
    for url in urls:
        total += Path(url).stat().st_size
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                footprint = 512 + -(-member.size // 512) * 512  # header + data padded to 512
                suffix = member.name.split(".", 1)[1]
                if suffix in schema.IMAGE_EXTENSIONS:
                    image += footprint
                    samples += 1
                elif suffix in VIEW_MEMBERS:
                    view_members += footprint
    per = samples * (views + 1)
    return {"samples": samples, "tar_bytes_per_sample": total / samples,
            "tar_bytes_per_sample_without_image": (total - image) / samples,
            "view_member_bytes_per_sample": view_members / samples,
            "tar_bytes_per_view": total / per, "tar_bytes_per_view_without_image": (total - image) / per,
            "view_member_bytes_per_view": view_members / per, "image_bytes_per_sample": image / samples}


def on_disk_rows(out: Path, *, num_classes: int, views: int) -> None:
    """The on_disk rows of one label-teacher output, as written (version 2) and rewritten (version 1)."""
    written = expand_urls(str(out))
    sets = {schema.SCHEMA_VERSION: written}
    sets.update({v: rewrite_shards(written, out.with_name(f"{out.name}-v{v}"), schema_version=v)
                 for v in schema.READABLE_VERSIONS if v != schema.SCHEMA_VERSION})
    for version, urls in sorted(sets.items(), reverse=True):
        emit({"row": "on_disk", "schema_version": version, "num_classes": num_classes, "topk": 10,
              "views": views, "payload_bytes_per_view": schema.bytes_per_view(num_classes, 10, False),
              **on_disk(urls, views=views)})


def fidelity_section(work: Path, args: argparse.Namespace) -> Path:
    """The fidelity rows: the trained digits teacher, then the 1000-class case. Returns the digits weights."""
    digits_weights = train_digits_teacher(work / "digits-teacher.pt", args)
    logits = view_logits(digits_weights, args.digits_teacher, "digits:val", views=args.views,
                         images=args.digits_images, image_size=32)
    fidelity_rows(f"digits {args.digits_teacher} trained", logits, args.topk, realistic=True)
    if args.imagenet_weights:
        data = args.imagenet_data or str(photo_folder(work / "photos", images=args.imagenet_images))
        logits = view_logits(Path(args.imagenet_weights), args.imagenet_teacher, data, views=args.views,
                             images=args.imagenet_images, image_size=32)
        case, realistic = f"{args.imagenet_teacher} {Path(args.imagenet_weights).name}", bool(args.imagenet_data)
    else:
        stand_in = save_random_teacher(work / "stand-in", args.imagenet_teacher, num_classes=1000)
        data = str(photo_folder(work / "photos", images=args.imagenet_images))
        logits = view_logits(stand_in, args.imagenet_teacher, data, views=args.views,
                             images=args.imagenet_images, image_size=32)
        logits = scale_to_confidence(logits, args.stand_in_confidence)
        case, realistic = f"{args.imagenet_teacher} random init, logits scaled", False
    fidelity_rows(case, logits, args.topk, realistic=realistic)
    return digits_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--digits-teacher", default="resnet18")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--teacher-optimizer", default="adamw", choices=["adamw", "sgd"],
                        help="adamw reaches ~93%% held-out in 5 epochs; sgd at its lr 0.1 needs more")
    parser.add_argument("--teacher-images", type=int, default=1200, help="digits it trains on")
    parser.add_argument("--digits-images", type=int, default=597, help="held-out digits whose views are scored")
    parser.add_argument("--imagenet-weights", default=None,
                        help="real 1000-class teacher weights (state dict + sidecar) for a realistic row")
    parser.add_argument("--imagenet-teacher", default="regnet_y_400mf", help="its torchvision name")
    parser.add_argument("--imagenet-data", default=None, help="ImageFolder of real photos for that teacher")
    parser.add_argument("--imagenet-images", type=int, default=64)
    parser.add_argument("--stand-in-confidence", type=float, default=0.7,
                        help="mean top-1 probability the random-init stand-in is scaled to")
    parser.add_argument("--on-disk-only", action="store_true",
                        help="only the on_disk rows; random-init teachers (the bytes do not depend on the weights)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny settings that run in seconds")
    args = parser.parse_args()
    if args.quick:
        args.teacher_epochs, args.digits_images, args.imagenet_images, args.views = 1, 24, 4, 2
        args.teacher_images = 64
        args.imagenet_teacher = "regnet_y_400mf"
    header(views=args.views, topk=args.topk)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        for c in (10, 1000):
            for k in sorted({min(k, c) for k in args.topk}):
                emit({"row": "payload", "num_classes": c, "topk": k,
                      "bytes_per_view": schema.bytes_per_view(c, k, False),
                      "with_full_softmax": schema.bytes_per_view(c, k, True)})

        if args.on_disk_only:
            digits_weights = save_random_teacher(work / "stand-in", args.digits_teacher, num_classes=10,
                                                 crop=32, resize=32)
        else:
            digits_weights = fidelity_section(work, args)

        # On-disk bytes of real label-teacher outputs (K = 10, the default) for 10 and 1000 classes.
        wide = save_random_teacher(work / "stand-in", "regnet_y_400mf", num_classes=1000, crop=32, resize=32)
        images = min(args.digits_images, 597)
        from deitpipe.pipeline.raysession import ray_session

        with ray_session(None):
            for c, name, weights in ((10, args.digits_teacher, digits_weights), (1000, "regnet_y_400mf", wide)):
                out = work / f"shards-{c}"
                label_teacher(LabelConfig(data=_first_digits(work, images, split="val"), out=str(out), teacher=name,
                                          teacher_weights=str(weights), views=args.views, topk=10,
                                          image_size=32, progress=False, device="cpu", overwrite=True))
                on_disk_rows(out, num_classes=c, views=args.views)
        emit({"goal_payload_bytes_per_view": 64, "payload_c1000_k10": schema.bytes_per_view(1000, 10, False),
              "goal_kl": 0.01, "goal_view_member_bytes_per_sample_at_8_views": 1600})
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _first_digits(work: Path, count: int, *, split: str) -> str:
    """An ImageFolder of the first ``count`` digits of ``split`` ("train" or "val")."""
    root = work / f"digits-{split}-{count}"
    if not root.exists():
        source = resolve_source(f"digits:{split}", image_size=32)
        for i, cand in enumerate(source.candidates[:count]):
            d = root / source.class_names[cand.label]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:06d}.png").write_bytes(read_bytes(cand))
    return str(root)


if __name__ == "__main__":
    main()
