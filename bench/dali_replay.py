"""Replaying stored views with NVIDIA DALI against deitpipe's batched torchvision path.

Both paths take the same inputs: photo-like 500x375 JPEGs (quality 90, as in
bench/gpu_replay.py), and for each one view drawn as label-teacher draws them
(``random_view_boxes``, 8 views per image, replayed view chosen by ``epoch_view_index``): a box
``(top, left, height, width)`` in decoded pixels and a horizontal flip. Each path turns a batch
of JPEG bytes into (B, 3, S, S) uint8 views on the device:

    torchvision  ``student.gpu_replay.decode_and_cut``: one ``decode_jpeg`` call (nvJPEG on
                 CUDA, libjpeg-turbo on the CPU) and one batched antialiased resampling;
    dali         a DALI pipeline, decoder "mixed" on CUDA (nvJPEG, the hardware JPEG decoder
                 where the GPU has one) and "cpu" otherwise, in one of two variants:
                   image_slice  ``fn.decoders.image_slice`` decodes just the box (ROI decoding),
                                then ``fn.resize`` (linear, antialiased) to S x S;
                   resize_roi   ``fn.decoders.image`` decodes the whole image and ``fn.resize``
                                reads the box as its region of interest;
                 then ``fn.crop_mirror_normalize`` flips per sample and lays out CHW.

Timing: the inputs of every batch are prepared first (as DataLoader workers would hand them
over: bytes, header fields, boxes); one batch warms each path up (kernels, decoder handles,
allocations), then ``--rounds`` passes over all batches are timed batch by batch between two
synchronisations. Reported per path: images/s; per DALI variant: its ratio to the torchvision
path and its mean (and largest) absolute pixel difference from ``shards.format.image.cut_view`` on
the Pillow-decoded image (the views the teacher labelled) and from ``decode_and_cut``'s views; and
the torchvision path's own difference from ``cut_view``. On the CPU, DALI's box decoding equals
Pillow's decode bit for bit, and the views differ from ``cut_view`` by the rounding of the
resize alone (mean about 0.17, at most 2 levels); on CUDA both paths add nvJPEG's decoding.

DALI is not a dependency of deitpipe: without ``nvidia.dali`` the script prints one line saying
so and exits 0. DALI's wheel (nvidia-dali-cuda120) decodes through nvImageCodec
(nvidia-nvimgcodec-cu12), which loads nvJPEG from the nvidia-nvjpeg-cu12 wheel installed beside
it (one pip call: the wheels share the ``nvidia`` folder). Without nvJPEG it says on stderr that
it cannot load it (nor nvJPEG2000, nvTIFF): harmless for the "cpu" decoder, which the CPU runs
here used, but the "mixed" decoder needs nvJPEG to decode on the GPU, so a CUDA run's stderr
should not say so. Installed apart from the project's environment:

    pip install --no-deps --target /tmp/dali-site nvidia-dali-cuda120==2.4.0 \\
        'nvidia-nvimgcodec-cu12>=0.9,<0.10' nvidia-nvjpeg-cu12 'astunparse>=1.6,<=1.6.3' \\
        'gast>=0.3.3,<=0.7.0' optree nvtx makefun 'libcst~=1.8'
    export PYTHONPATH=/tmp/dali-site

Run: python bench/dali_replay.py                    (CUDA when present: decoder "mixed")
     python bench/dali_replay.py --quick            (32 images, batch 16, one round)
     python bench/dali_replay.py --device cpu       (decoder "cpu", both paths on the CPU)
     python bench/dali_replay.py --variants image_slice --fancy-upsampling
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from benchutil import emit, header, photo_jpeg, sync
from deitpipe.shards.format.image import cut_view, decode_image
from deitpipe.shards.format.schema import sample_key
from deitpipe.shards.format.views import epoch_view_index, random_view_boxes
from deitpipe.student.gpu_replay import decode_and_cut, jpeg_layout

VARIANTS = ("image_slice", "resize_roi")


def import_dali() -> SimpleNamespace:
    """DALI's modules this benchmark uses.

    Returns:
        A namespace with ``dali`` (the package), ``fn``, ``types``, ``Pipeline`` and
        ``feed_ndarray`` (DALI's copy of a DALI tensor into a torch tensor).
    Raises:
        ImportError: ``nvidia.dali`` (or its PyTorch plugin) is not importable.
    """
    import nvidia.dali as dali
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import feed_ndarray

    return SimpleNamespace(dali=dali, fn=fn, types=types, Pipeline=Pipeline, feed_ndarray=feed_ndarray)


def dali_windows(boxes: np.ndarray | torch.Tensor | Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """deitpipe's view boxes as DALI's crop windows.

    A stored box is ``(top, left, height, width)`` in integer pixels of the decoded image, EXIF
    orientation applied (``shards.format.image``). DALI's slice and ROI arguments take the "WH" axis
    order, so the anchor is ``(left, top)`` and the shape ``(width, height)``; they stay int32
    because DALI reads integer windows as absolute pixels (float ones as fractions of the image).

    Args:
        boxes: (N, 4) boxes ``(top, left, height, width)``.
    Returns:
        ``(anchors, shapes)``: two (N, 2) int32 arrays, ``(left, top)`` and ``(width, height)``.
    Raises:
        ValueError: a box is not four integers with top, left >= 0 and height, width >= 1.
    """
    box = np.asarray(boxes.cpu() if isinstance(boxes, torch.Tensor) else boxes)
    if box.ndim != 2 or box.shape[1] != 4 or (box.size and not np.issubdtype(box.dtype, np.integer)):
        raise ValueError(f"boxes must be (N, 4) integer (top, left, height, width), got {box.dtype} {box.shape}")
    box = box.astype(np.int64)
    bad = (box[:, 0] < 0) | (box[:, 1] < 0) | (box[:, 2] < 1) | (box[:, 3] < 1)
    if bad.any():
        raise ValueError(f"view box {tuple(box[int(np.argmax(bad))])} has a negative corner or an empty side")
    anchors = np.ascontiguousarray(box[:, [1, 0]], dtype=np.int32)
    shapes = np.ascontiguousarray(box[:, [3, 2]], dtype=np.int32)
    return anchors, shapes


def _dali_device(device: torch.device | str) -> tuple[torch.device, int | None]:
    """The torch device and DALI's ``device_id`` for it (None: a CPU-only pipeline, no GPU needed)."""
    device = torch.device(device)
    if device.type == "cuda":
        return device, device.index if device.index is not None else torch.cuda.current_device()
    if device.type != "cpu":
        raise ValueError(f"DALI runs on cpu or cuda, got device {device}")
    return device, None


class DaliViews:
    """A built DALI pipeline that cuts one view of each JPEG of a batch, as ``cut_view`` does.

    Args:
        size: side S of the square views.
        device: "cuda" (decoder "mixed": nvJPEG and the hardware decoder, resize on the GPU) or
            "cpu" (decoder "cpu": libjpeg-turbo, resize on the CPU, no GPU needed).
        batch_size: the largest batch a call takes.
        num_threads: DALI's CPU worker threads (decoding on "cpu", Huffman decoding on "mixed").
        roi_decode: True: ``fn.decoders.image_slice`` decodes only the box; False:
            ``fn.decoders.image`` decodes the whole image and ``fn.resize`` reads the box as
            its region of interest.
        fancy_upsampling: on "mixed", upsample chroma as libjpeg-turbo (and so Pillow) does
            (``jpeg_fancy_upsampling``); the "cpu" decoder always does.
    """

    def __init__(self, *, size: int, device: torch.device | str, batch_size: int, num_threads: int,
                 roi_decode: bool = True, fancy_upsampling: bool = False) -> None:
        d = import_dali()
        self._feed_ndarray = d.feed_ndarray
        self.device, device_id = _dali_device(device)
        self.size, self.batch_size, self.roi_decode = size, batch_size, roi_decode
        mixed = self.device.type == "cuda"
        decoder_args: dict[str, Any] = {"device": "mixed" if mixed else "cpu", "output_type": d.types.RGB,
                                        "adjust_orientation": True}  # boxes are in EXIF-oriented pixels
        if mixed:
            decoder_args["jpeg_fancy_upsampling"] = fancy_upsampling
        # Depth 1: every call feeds its batch and gets that batch's views back, as decode_and_cut
        # does per step; DALI still decodes and resizes the samples of a batch in parallel.
        self.pipe = d.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                               prefetch_queue_depth=1)
        with self.pipe:
            data = d.fn.external_source(name="jpeg", dtype=d.types.UINT8, ndim=1)
            flip = d.fn.external_source(name="flip", dtype=d.types.INT32, ndim=0)
            resize_args: dict[str, Any] = {"size": [size, size], "interp_type": d.types.INTERP_LINEAR,
                                           "antialias": True}  # cut_view: bilinear, antialiased
            if roi_decode:
                anchor = d.fn.external_source(name="anchor", dtype=d.types.INT32, ndim=1)
                shape = d.fn.external_source(name="shape", dtype=d.types.INT32, ndim=1)
                images = d.fn.decoders.image_slice(data, anchor, shape, axis_names="WH", **decoder_args)
            else:
                images = d.fn.decoders.image(data, **decoder_args)
                resize_args.update(roi_start=d.fn.external_source(name="roi_start", dtype=d.types.FLOAT, ndim=1),
                                   roi_end=d.fn.external_source(name="roi_end", dtype=d.types.FLOAT, ndim=1),
                                   roi_relative=False)
            views = d.fn.resize(images, **resize_args)
            # The flip follows the resize, as in cut_view; uint8 in and out with the default mean 0
            # and std 1 leaves the values as they are.
            views = d.fn.crop_mirror_normalize(views, mirror=flip, dtype=d.types.UINT8, output_layout="CHW")
            self.pipe.set_outputs(views)
        self.pipe.build()

    def inputs(self, jpegs: Sequence[bytes], boxes: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
               flips: np.ndarray | torch.Tensor | Sequence[bool]) -> dict[str, list[np.ndarray]]:
        """One batch as the pipeline's external sources take it (host arrays, no copies of the bytes).

        Args:
            jpegs: encoded images, at most ``batch_size``.
            boxes: (B, 4) ``(top, left, height, width)`` in decoded pixels.
            flips: (B,) horizontal flips.
        Returns:
            Per external source, B arrays.
        Raises:
            ValueError: the lengths differ, the batch is empty or too large, or a box is malformed.
        """
        flips = [bool(f) for f in (flips.tolist() if isinstance(flips, (np.ndarray, torch.Tensor)) else flips)]
        if not 0 < len(jpegs) <= self.batch_size or len(boxes) != len(jpegs) or len(flips) != len(jpegs):
            raise ValueError(f"a batch takes 1 to {self.batch_size} images with a box and a flip each, got "
                             f"{len(jpegs)} images, {len(boxes)} boxes, {len(flips)} flips")
        anchors, shapes = dali_windows(boxes)
        out = {"jpeg": [np.frombuffer(j, dtype=np.uint8) for j in jpegs],
               "flip": [np.array(f, dtype=np.int32) for f in flips]}
        if self.roi_decode:
            out.update(anchor=list(anchors), shape=list(shapes))
        else:  # resize's region of interest: absolute (y, x) corners, the tensor's (H, W) order
            start = anchors[:, ::-1].astype(np.float32)
            out.update(roi_start=list(start), roi_end=list(start + shapes[:, ::-1].astype(np.float32)))
        return out

    def run(self, inputs: dict[str, list[np.ndarray]]) -> torch.Tensor:
        """Decode and cut one batch prepared by :meth:`inputs`.

        Args:
            inputs: from :meth:`inputs`.
        Returns:
            (B, 3, S, S) uint8 views on this pipeline's device, in batch order.
        """
        (views,) = self.pipe.run(**inputs)  # host-synchronous: the views are complete
        out = torch.empty((len(inputs["jpeg"]), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        # A copy into torch's memory: DALI may reuse its output buffers on the next run.
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._feed_ndarray(views.as_tensor(), out, cuda_stream=stream)
        return out

    def __call__(self, jpegs: Sequence[bytes], boxes: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
                 flips: np.ndarray | torch.Tensor | Sequence[bool]) -> torch.Tensor:
        """:meth:`inputs` then :meth:`run`."""
        return self.run(self.inputs(jpegs, boxes, flips))


def dali_decode_and_cut(jpegs: Sequence[bytes], boxes: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
                        flips: np.ndarray | torch.Tensor | Sequence[bool], *, size: int,
                        device: torch.device | str, batch_size: int, num_threads: int, roi_decode: bool = True,
                        fancy_upsampling: bool = False) -> torch.Tensor:
    """DALI's counterpart of ``decode_and_cut``: one view of each JPEG, cut as ``cut_view`` cuts it.

    Builds a :class:`DaliViews` pipeline and runs it over the images ``batch_size`` at a time.

    Args:
        jpegs: N encoded JPEGs (other types DALI decodes work too; the boxes refer to the
            decoded, EXIF-oriented image, as deitpipe stores them).
        boxes: (N, 4) ``(top, left, height, width)`` in decoded pixels, inside the image.
        flips: (N,) horizontal flips of the views.
        size: side S of the square views.
        device: "cuda" (decoder "mixed") or "cpu" (decoder "cpu").
        batch_size: images per pipeline run.
        num_threads: DALI's CPU worker threads.
        roi_decode: decode only the box (``image_slice``), else the whole image.
        fancy_upsampling: libjpeg-turbo's chroma upsampling on "mixed".
    Returns:
        (N, 3, S, S) uint8 on ``device``.
    Raises:
        ImportError: DALI is not installed.
        ValueError: mismatched lengths or a malformed box.
        RuntimeError: DALI's error for bytes it cannot decode or a box outside its image.
    """
    if len(boxes) != len(jpegs) or len(flips) != len(jpegs) or not jpegs:
        raise ValueError(f"need one box and one flip per image, got {len(jpegs)} images, {len(boxes)} boxes, "
                         f"{len(flips)} flips")
    pipe = DaliViews(size=size, device=device, batch_size=batch_size, num_threads=num_threads,
                     roi_decode=roi_decode, fancy_upsampling=fancy_upsampling)
    parts = [pipe(jpegs[i:i + batch_size], boxes[i:i + batch_size], flips[i:i + batch_size])
             for i in range(0, len(jpegs), batch_size)]
    return torch.cat(parts)


def torchvision_batch(jpegs: Sequence[bytes], boxes: np.ndarray, flips: np.ndarray, *,
                      first_index: int = 0) -> dict[str, Any]:
    """The batch ``decode_and_cut`` takes (what ``gpu_replay.collate`` gives), from the same inputs.

    Args:
        jpegs: encoded JPEGs.
        boxes: (B, 4) boxes in decoded pixels.
        flips: (B,) flips.
        first_index: sample index of the first image (for the keys).
    Returns:
        "data", "jpeg", "orientation", "box", "flip", "key", as ``EncodedShardReplay`` yields them.
    Raises:
        ValueError: an image the batched decoder does not take (not an RGB or greyscale JPEG).
    """
    orientation = []
    for i, data in enumerate(jpegs):
        layout = jpeg_layout(data)
        if layout is None:
            raise ValueError(f"image {first_index + i} is not a JPEG that decode_jpeg takes")
        orientation.append(layout[0])
    return {"data": [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs],
            "jpeg": torch.ones(len(jpegs), dtype=torch.bool), "orientation": torch.tensor(orientation),
            "box": torch.as_tensor(np.asarray(boxes), dtype=torch.long),
            "flip": torch.as_tensor(np.asarray(flips)).bool(),
            "key": [sample_key(first_index + i) for i in range(len(jpegs))]}


def replay_views(images: Sequence[bytes], *, seed: int = 0, epoch: int = 0, views: int = 8,
                 ) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor]]:
    """Each image's replayed view, drawn as label-teacher and the student's replay draw it.

    Args:
        images: encoded images; image i has the key ``sample_key(i)``.
        seed: the run seed of both stages.
        epoch: the epoch whose view is replayed.
        views: random views stored per image (row 0, the global view, is never replayed).
    Returns:
        ``(boxes (N, 4) int64, flips (N,) bool, decoded)``: the views, and each image decoded by
        ``decode_image`` as a (3, H, W) uint8 tensor (for ``cut_view``).
    """
    boxes, flips, decoded = [], [], []
    for i, data in enumerate(images):
        img = decode_image(data)
        key = sample_key(i)
        drawn, drawn_flips = random_view_boxes(seed=seed, key=key, num_views=views, height=img.height,
                                               width=img.width)
        row = epoch_view_index(seed=seed, epoch=epoch, key=key, num_views=views) - 1  # stored row 0: global view
        boxes.append(drawn[row])
        flips.append(bool(drawn_flips[row]))
        decoded.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return np.asarray(boxes, dtype=np.int64), np.asarray(flips, dtype=bool), decoded


def reference_views(decoded: Sequence[torch.Tensor], boxes: np.ndarray, flips: np.ndarray, *,
                    size: int) -> torch.Tensor:
    """``cut_view`` of each decoded image: (N, 3, S, S) uint8 on the CPU."""
    return torch.stack([cut_view(img, tuple(int(v) for v in box), bool(flip), size)
                        for img, box, flip in zip(decoded, boxes, flips)])


def pixel_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean and largest absolute difference of two uint8 view batches, in intensity levels."""
    diff = (a.cpu().to(torch.int16) - b.cpu().to(torch.int16)).abs()
    return {"mean": diff.float().mean().item(), "max": int(diff.max().item())}


def timed(step: Callable[[Any], torch.Tensor], batches: Sequence[Any], *, rounds: int,
          device: torch.device) -> tuple[float, torch.Tensor]:
    """Images/s of ``step`` over ``rounds`` passes of ``batches`` after one warm-up batch.

    Args:
        step: one prepared batch -> its (B, 3, S, S) views on ``device``.
        batches: prepared batches.
        rounds: timed passes over all batches.
        device: where ``step`` works (synchronised around each batch on CUDA).
    Returns:
        ``(images_per_s, views)``: the rate, and the last pass's views on the CPU in order.
    """
    step(batches[0])  # warm-up: kernels, decoder state, allocations
    seconds, images, views = 0.0, 0, []
    for r in range(rounds):
        for batch in batches:
            sync(device)
            start = time.perf_counter()
            out = step(batch)
            sync(device)
            seconds += time.perf_counter() - start
            images += out.shape[0]
            if r == rounds - 1:
                views.append(out.cpu())
    return images / seconds, torch.cat(views)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where both paths run (auto: cuda if present); DALI's decoder is mixed on cuda")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch of both paths")
    parser.add_argument("--images", type=int, default=512, help="distinct JPEGs (one view each)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over all images (after a warm-up batch)")
    parser.add_argument("--img-size", type=int, default=224, help="view side")
    parser.add_argument("--threads", type=int, default=None, help="DALI's CPU threads (default: torch's)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"DALI variants, comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--fancy-upsampling", action="store_true",
                        help="on mixed: libjpeg-turbo's chroma upsampling (jpeg_fancy_upsampling)")
    parser.add_argument("--quick", action="store_true", help="32 images, batch 16, one round")
    args = parser.parse_args()
    try:
        d = import_dali()
    except ImportError as exc:
        emit({"skipped": f"nvidia.dali is not importable ({exc}); install DALI to run this comparison"})
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants takes {', '.join(VARIANTS)}, got {args.variants!r}")
    if args.quick:
        args.images, args.batch_size, args.rounds = 32, 16, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    threads = args.threads or torch.get_num_threads()
    header(device=device, batch=args.batch_size, images=args.images, dali=d.dali.__version__,
           dali_decoder="mixed" if device.type == "cuda" else "cpu", dali_threads=threads)

    rng = np.random.default_rng(0)
    jpegs = [photo_jpeg(rng, height=375, width=500, quality=90) for _ in range(args.images)]
    boxes, flips, decoded = replay_views(jpegs)
    reference = reference_views(decoded, boxes, flips, size=args.img_size)
    spans = [slice(i, i + args.batch_size) for i in range(0, args.images, args.batch_size)]

    batches = [torchvision_batch(jpegs[s], boxes[s], flips[s], first_index=s.start) for s in spans]
    if device.type == "cuda":  # as a DataLoader with pin_memory=True hands them over
        batches = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    tv_rate, tv_views = timed(lambda b: decode_and_cut(b, img_size=args.img_size, device=device), batches,
                              rounds=args.rounds, device=device)
    tv_diff = pixel_difference(tv_views, reference)
    emit({"path": "torchvision", "device": str(device), "batch": args.batch_size, "images_per_s": tv_rate,
          "mean_abs_diff_vs_cut_view": tv_diff["mean"], "max_abs_diff_vs_cut_view": tv_diff["max"]})

    for variant in variants:
        pipe = DaliViews(size=args.img_size, device=device, batch_size=args.batch_size, num_threads=threads,
                         roi_decode=variant == "image_slice", fancy_upsampling=args.fancy_upsampling)
        inputs = [pipe.inputs(jpegs[s], boxes[s], flips[s]) for s in spans]
        rate, views = timed(pipe.run, inputs, rounds=args.rounds, device=device)
        vs_ref, vs_tv = pixel_difference(views, reference), pixel_difference(views, tv_views)
        emit({"path": "dali", "variant": variant, "decoder": "mixed" if device.type == "cuda" else "cpu",
              "device": str(device), "batch": args.batch_size, "threads": threads,
              "fancy_upsampling": args.fancy_upsampling if device.type == "cuda" else True, "images_per_s": rate,
              "ratio_dali_over_torchvision": rate / tv_rate,
              "mean_abs_diff_vs_cut_view": vs_ref["mean"], "max_abs_diff_vs_cut_view": vs_ref["max"],
              "mean_abs_diff_vs_decode_and_cut": vs_tv["mean"], "max_abs_diff_vs_decode_and_cut": vs_tv["max"]})
        del pipe  # release the pipeline's buffers and threads before the next variant


if __name__ == "__main__":
    main()
