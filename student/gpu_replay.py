"""Stage two's input with the pixel work on the training device: replay stored views in batches.

``ShardReplay`` decodes, cuts and augments every image in DataLoader workers. Here the workers
only read: :class:`EncodedShardReplay` yields each sample's JPEG bytes with its stored view box,
flip and teacher target (same shard order, sample order, view choice and per-rank/per-worker
quotas as ``ShardReplay``, whose iteration it inherits). On the device, :func:`decode_and_cut`
decodes the batch's JPEGs in one ``torchvision.io.decode_jpeg`` call (nvJPEG on CUDA) and cuts
every view in one batched resampling; ``shards.format.randaugment.BatchAugment`` then applies the DeiT
augmentation to the whole batch. :class:`DeviceBatches` chains the three per step and, on CUDA,
prepares the next batch on a side stream while the current one trains.

The cut reproduces ``shards.format.image.cut_view`` (crop, antialiased bilinear resize, flip) value
for value: the resize is written as two matrices per sample, one per axis, holding the
triangle-filter weights of torchvision's uint8 antialiased resize in its fixed point, so
``rows @ image @ columns^T`` is that resize for the whole padded batch in two batched matmuls,
rounded between the passes as that kernel rounds. The EXIF orientation (which ``decode_jpeg``
applies on CPU only) is folded into the same matrices: a mirrored axis reverses a matrix's
columns, a transposed image swaps the two matrices and transposes the (square) output. On CPU
the views equal ``cut_view``'s (libjpeg-turbo decodes as Pillow does); on CUDA nvJPEG decodes
with its own IDCT and chroma upsampling.

Images ``decode_jpeg`` cannot take (PNG and other types, CMYK JPEGs) are decoded and cut in the
worker exactly as ``ShardReplay`` does; the batch step passes their pixels through.

On shards that store each view's whole augmentation, each sample also carries its record and its
mixing partner's encoded view, and the batch step renders the views with the label set's
``ViewRenderer`` instead of drawing an augmentation (``student.gpu_stored``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

from deitpipe.shards.format.augment import MIX_NONE, ViewRenderer, no_records, records_of
from deitpipe.shards.format.image import DEFAULT_MAX_PIXELS, ImageDecodeError, cut_view, decode_image
from deitpipe.shards.format.randaugment import BatchAugment, augment_generator
from deitpipe.student.data import Augment, ShardReplay, partner_rows
from deitpipe.student.gpu_stored import PARTNER, record_fields, render_stored, with_partners

_EXIF_ORIENTATION = 0x0112
_BATCH_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a JPEG with extra frames; the first is decoded
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap height and width
_REVERSED_ROWS = (3, 4, 6, 7)  # stored rows run against the displayed axis they land on
_REVERSED_COLS = (2, 3, 7, 8)  # stored columns likewise
_NO_PARTNER = {"data": torch.empty(0, dtype=torch.uint8), "jpeg": torch.tensor(True), "orientation": torch.tensor(1),
               "box": torch.zeros(4, dtype=torch.long), "flip": torch.tensor(False), "key": ""}
_LISTED = ("data", "key", PARTNER + "data", PARTNER + "key")  # per-sample values collate keeps as lists


def jpeg_layout(data: bytes) -> tuple[int, int, int] | None:
    """What the batched decoder needs to know of an image, read from its header only.

    Args:
        data: stored image bytes.
    Returns:
        ``(orientation, height, width)`` (the EXIF orientation as Pillow reads it, 1 when absent
        or invalid, and the size as stored, before the orientation) for an 8-bit greyscale or
        YCbCr/RGB JPEG, which ``decode_jpeg`` decodes as Pillow does; None for anything else
        (other types, CMYK, an unreadable header), which the worker decodes.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in _BATCH_JPEG_FORMATS or img.mode not in ("L", "RGB"):
                return None
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            width, height = img.size
    except Exception:  # noqa: BLE001 - whatever the header's fault, the worker's decode_image reports it
        return None
    if DEFAULT_MAX_PIXELS is not None and width * height > DEFAULT_MAX_PIXELS:
        return None  # the worker's decode_image raises the usual error
    return (orientation if orientation in range(1, 9) else 1), height, width


def _check_box(box: tuple[int, ...], height: int, width: int, key: str) -> None:
    top, left, h, w = box
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > height or left + w > width:
        raise ValueError(f"sample {key}: view box (top={top}, left={left}, height={h}, width={w}) is not "
                         f"inside the {height}x{width} image; boxes are in decoded (EXIF-transposed) pixels")


class EncodedShardReplay(ShardReplay):
    """``ShardReplay`` whose samples carry the encoded JPEG and its view box instead of pixels.

    Takes ``ShardReplay``'s arguments (``augment`` is ignored: the batch step augments).

    Each sample: "data" (JPEG bytes as an (N,) uint8 tensor, or for an image ``decode_jpeg``
    cannot take, its view already cut as (3, S, S) uint8), "jpeg" (which of the two),
    "orientation" (EXIF, 1..8), "box" (4,) int64 top/left/height/width in displayed pixels,
    "flip", "label", "key", and unless teacher_labels is "none", "teacher" (C,) float32 and
    "teacher_hard". With ``stored_augment``, also "view", the record's fields and the partner's
    (:meth:`replay`).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["augment"] = Augment(rand_augment=None, random_erasing=0.0)
        super().__init__(**kwargs)
        if self.interpolation != "bilinear":
            raise ValueError(f"the batched loader cuts views with bilinear interpolation only, got "
                             f"{self.interpolation!r}; use the worker loader for other interpolations")

    def example(self, sample: dict) -> dict[str, Any]:
        view, encoded = self._encoded(sample, None)
        return {**encoded, **self.targets(sample, view)}

    def replay(self, samples: list[dict], views: list[int], emit: int) -> list[dict[str, Any]]:
        """``ShardReplay.replay``'s first ``emit`` samples encoded, for the batch step to render:
        each also with its view ("view"), its record (``gpu_stored.record_fields``) and its
        mixing partner's encoded view and record under ``partner_`` names, whether or not the
        partner lands in the same batch (an unmixed sample carries an empty partner)."""
        records = np.stack([records_of(s)[v] for s, v in zip(samples, views)])
        partner = partner_rows(samples, records)
        encoded = [self._encoded(s, v)[1] for s, v in zip(samples, views)]  # each is emitted or lends
        out = []
        for k in range(emit):
            record, p = records[k].copy(), int(partner[k])
            if p < 0:
                record["mix_key"] = MIX_NONE  # rendered unmixed, as ShardReplay does without its partner
                lent = {**_NO_PARTNER, **record_fields(no_records(1)[0])}
            else:
                lent = {**encoded[p], **record_fields(records[p])}
            out.append({**encoded[k], "view": torch.tensor(views[k]),
                        **record_fields(record), **{PARTNER + name: value for name, value in lent.items()},
                        **self.targets(samples[k], views[k], partner=samples[p] if p >= 0 else None,
                                       lam=float(records["lam"][k]))})
        return out

    def _encoded(self, sample: dict, view: int | None) -> tuple[int, dict[str, Any]]:
        """``sample``'s view (this epoch's when ``view`` is None) as the batch step cuts it:
        (the view's row, {"data", "jpeg", "orientation", "box", "flip", "key"})."""
        data = sample["image"]
        layout = jpeg_layout(data)
        img = None
        if layout is None:
            img = decode_image(data)
            height, width, orientation = img.height, img.width, 1
        else:
            orientation, height, width = layout
            if orientation in _TRANSPOSED:
                height, width = width, height
        if view is None:
            view, box, flip = self.view_of(sample, height=height, width=width)
        else:
            box, flip = tuple(int(x) for x in sample["box"][view]), bool(sample["flip"][view])
        _check_box(box, height, width, sample["key"])
        if img is None:
            pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            pixels = cut_view(img, box, flip, self.img_size, interpolation=self.interpolation)
        return view, {"data": pixels, "jpeg": torch.tensor(img is None), "orientation": torch.tensor(orientation),
                      "box": torch.tensor(box, dtype=torch.long), "flip": torch.tensor(flip), "key": sample["key"]}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for :class:`EncodedShardReplay`: "data" and "key" (and a mixing
    partner's) stay lists (the byte strings differ in length), every other key is stacked."""
    out: dict[str, Any] = {name: [s[name] for s in samples] for name in _LISTED if name in samples[0]}
    for name in samples[0]:
        if name not in out:
            out[name] = torch.stack([s[name] for s in samples])
    return out


def decode_and_cut(batch: dict[str, Any], *, img_size: int, device: torch.device | str) -> torch.Tensor:
    """Decode a collated batch's JPEGs and cut each stored view, all on ``device``.

    Args:
        batch: from :func:`collate` (tensors on the CPU, pinned or not).
        img_size: side S of the square views.
        device: where to decode (nvJPEG on CUDA) and cut.
    Returns:
        (B, 3, S, S) uint8 views on ``device``, in batch order: what ``cut_view`` gives on the
        Pillow-decoded image, up to rounding of the resize and, on CUDA, nvJPEG's decoding.
    Raises:
        ImageDecodeError: naming the sample whose bytes do not decode.
    """
    device = torch.device(device)
    flags = batch["jpeg"].tolist()
    jpegs = [i for i, f in enumerate(flags) if f]
    cut = [i for i, f in enumerate(flags) if not f]
    if jpegs:
        images, oriented = _decode([batch["data"][i] for i in jpegs], [batch["key"][i] for i in jpegs], device)
        orientation = [1 if j in oriented else o for j, o in enumerate(batch["orientation"][jpegs].tolist())]
        rows = torch.tensor(jpegs, device=device)
        views = resample_views(images, box=batch["box"].to(device, non_blocking=True)[rows],
                               flip=batch["flip"].to(device, non_blocking=True)[rows],
                               orientation=orientation, size=img_size)
        if not cut:
            return views
    out = torch.empty((len(flags), 3, img_size, img_size), dtype=torch.uint8, device=device)
    if jpegs:
        out[rows] = views
    if cut:
        pixels = torch.stack([batch["data"][i] for i in cut])
        out[torch.tensor(cut, device=device)] = pixels.to(device, non_blocking=True)
    return out


def _decode(data: list[torch.Tensor], keys: list[str], device: torch.device) -> tuple[list[torch.Tensor], set[int]]:
    """The images as stored, decoded in one call; should that call fail, one by one, and those
    ``decode_jpeg`` refuses by Pillow (returned oriented already: their positions come second)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device), set()
        except RuntimeError:
            pass
        images, oriented = [], set()
        for j, (tensor, key) in enumerate(zip(data, keys)):
            try:
                images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    img = decode_image(tensor.numpy().tobytes())
                except ImageDecodeError as exc:
                    raise ImageDecodeError(f"sample {key}: {exc}") from None
                images.append(pil_to_tensor(img).to(device))
                oriented.add(j)
        return images, oriented


def resample_views(images: list[torch.Tensor], *, box: torch.Tensor, flip: torch.Tensor,
                   orientation: list[int], size: int) -> torch.Tensor:
    """Cut one view from each decoded image in batched resampling (see the module doc).

    Args:
        images: n (3, h_i, w_i) uint8 images as stored (EXIF orientation not applied), on one device.
        box: (n, 4) top, left, height, width in displayed (oriented) pixels.
        flip: (n,) bool horizontal flip of the view.
        orientation: n EXIF orientations 1..8 (host values: they choose the order of the passes).
        size: side S of the square output.
    Returns:
        (n, 3, S, S) uint8 on the images' device.
    """
    dev = images[0].device
    box, flip = box.to(dev), flip.to(dev)
    groups = [[i for i, o in enumerate(orientation) if (o in _TRANSPOSED) == t] for t in (False, True)]
    if not groups[1] or not groups[0]:
        return _resample_group(images, box, flip, orientation, size, transposed=bool(groups[1]))
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=dev)
    for transposed, members in zip((False, True), groups):
        index = torch.tensor(members, device=dev)
        out[index] = _resample_group([images[i] for i in members], box[index], flip[index],
                                     [orientation[i] for i in members], size, transposed=transposed)
    return out


def _resample_group(images: list[torch.Tensor], box: torch.Tensor, flip: torch.Tensor, orientation: list[int],
                    size: int, *, transposed: bool) -> torch.Tensor:
    """:func:`resample_views` for images that all are, or all are not, transposed by their
    orientation, so that one pass order serves all: the displayed x axis first, as torchvision's
    uint8 resize, with the intermediate rounded to integers."""
    dev = images[0].device
    # Integer sums of up to 2^30: exact in float64, whatever the TF32 setting (and DGEMM is fast on
    # H100/H200); float32 on CPUs, twice as fast, where about one value in 10^3 rounds one level off.
    dtype = torch.float64 if dev.type == "cuda" else torch.float32
    heights = torch.tensor([t.shape[-2] for t in images], device=dev, dtype=dtype)
    widths = torch.tensor([t.shape[-1] for t in images], device=dev, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # strided nested tensors are a prototype API
        padded = torch.nested.to_padded_tensor(torch.nested.nested_tensor(images, dtype=dtype), 0.0)
    n, _, rows, cols = padded.shape
    top, left, height, width = box.to(dtype).unbind(1)
    y = dict(start=top, length=height, flip=torch.zeros_like(flip), size=size)
    x = dict(start=left, length=width, flip=flip, size=size)
    reversed_rows = torch.tensor([o in _REVERSED_ROWS for o in orientation], device=dev)
    reversed_cols = torch.tensor([o in _REVERSED_COLS for o in orientation], device=dev)
    # Stored rows run along the displayed y axis, or along x for a transposed image.
    row_w, row_bits = _axis_weights(rows, heights, reversed_rows, **(x if transposed else y))  # (n, S, H)
    col_w, col_bits = _axis_weights(cols, widths, reversed_cols, **(y if transposed else x))  # (n, S, W)
    if not transposed:  # columns (x) first: (n, 3H, W) @ (n, W, S), then (n, S, H) @ (n, H, 3S)
        half = _fixed_point(torch.bmm(padded.view(n, 3 * rows, cols), col_w.transpose(1, 2)), col_bits)
        half = half.view(n, 3, rows, size).permute(0, 2, 1, 3).reshape(n, rows, 3 * size)
        out = _fixed_point(torch.bmm(row_w, half), row_bits).view(n, size, 3, size).permute(0, 2, 1, 3)
    else:  # rows (x) first: (n, S, H) @ (n, H, 3W), then (n, 3S, W) @ (n, W, S)
        half = padded.permute(0, 2, 1, 3).reshape(n, rows, 3 * cols)
        half = _fixed_point(torch.bmm(row_w, half), row_bits).view(n, size * 3, cols)
        out = _fixed_point(torch.bmm(half, col_w.transpose(1, 2)), col_bits).view(n, size, 3, size)
        out = out.permute(0, 2, 3, 1)  # (n, x, c, y) -> (n, c, y, x)
    return out.to(torch.uint8).contiguous()


def _axis_weights(length_padded: int, extent: torch.Tensor, reversed_: torch.Tensor, *, start: torch.Tensor,
                  length: torch.Tensor, flip: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of an antialiased bilinear resize of ``[start, start + length)`` of the displayed
    axis to ``size``, over the N stored pixels of the axis (``extent`` of them real, numbered
    backwards where ``reversed_``): torchvision's triangle filter, widened by the downscale
    factor and renormalised over the pixels inside the box, then in the fixed point of its uint8
    kernel (``_compute_indices_int16_weights_aa``: as many fraction bits, up to 22, as keep the
    largest weight of the axis in int16).

    Returns:
        (n, S, N) integer-valued weights and (n,) their fraction bits.
    """
    dtype, dev = extent.dtype, extent.device
    stored = torch.arange(length_padded, device=dev, dtype=dtype)[None, :]
    coord = torch.where(reversed_[:, None], extent[:, None] - 1 - stored, stored) - start[:, None]  # (n, N)
    inside = (stored < extent[:, None]) & (coord >= 0) & (coord < length[:, None])
    out_index = torch.arange(size, device=dev, dtype=dtype)[None, :]
    out_index = torch.where(flip[:, None], size - 1 - out_index, out_index)
    scale = (length / size)[:, None, None]
    centre = (out_index[:, :, None] + 0.5) * scale  # (n, S, 1) in box pixels
    stretch = torch.where(scale >= 1, scale, torch.ones_like(scale))
    weights = (1 - ((coord[:, None, :] + 0.5 - centre) / stretch).abs()).clamp(min=0) * inside[:, None, :]
    weights = weights / weights.sum(-1, keepdim=True)
    largest = weights.amax((1, 2))[:, None]
    bits = torch.arange(22, device=dev, dtype=dtype)[None, :]
    fits = torch.floor(0.5 + largest * 2 ** (bits + 1)) >= 2 ** 15
    bits = torch.where(fits.any(1), fits.to(torch.uint8).argmax(1).to(dtype), torch.full_like(largest[:, 0], 22))
    return torch.floor(0.5 + weights * 2 ** bits[:, None, None]), bits


def _fixed_point(total: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """A pass's integer sums ``sum(w * v)`` (n, ...) in the uint8 kernel's arithmetic:
    ``(sum + 2^(b-1)) >> b``, saturated to 0..255."""
    scale = (2 ** bits).view(-1, *[1] * (total.ndim - 1))
    return torch.floor((total + scale / 2) / scale).clamp_(0, 255)


def prepare_batch(batch: dict[str, Any], *, img_size: int, device: torch.device | str,
                  augment: BatchAugment | None, generator: torch.Generator | None,
                  renderer: ViewRenderer | None = None) -> dict[str, Any]:
    """A collated batch as the training step takes it, on ``device``.

    Args:
        batch: from :func:`collate`.
        img_size: the student's input side.
        device: the training device.
        augment: the batched DeiT augmentation, or None for plain ToDtype (no normalisation). On
            a batch with stored augmentation only its RandAugment and erasing are used, on top
            of the stored ones (``gpu_stored.render_stored``).
        generator: the augmentation's draws (:func:`shards.format.randaugment.augment_generator`).
        renderer: the label set's ``ViewRenderer``, which a batch with stored augmentation
            (records in the batch) is rendered with.
    Returns:
        "image" (B, 3, S, S) float32 (normalised by ``augment``, or by the label set's mean and
        std when rendered), "label" (B,) or (B, C), and when present "teacher" (B, C) and
        "teacher_hard" (B,), all on ``device``: what ``MixupCutmix`` and ``train_one_epoch`` take.
    Raises:
        ValueError: a batch with stored augmentation and no ``renderer``.
    """
    device = torch.device(device)
    if "mix_key" in batch:
        if renderer is None:
            raise ValueError("this batch carries stored augmentation records; pass the label set's renderer "
                             "(DeviceBatches(renderer=ViewRenderer(spec)))")
        cut, records, partner = with_partners(batch)
        views = decode_and_cut(cut, img_size=img_size, device=device)
        image = render_stored(views, records, partner, keep=len(batch["key"]), renderer=renderer,
                              augment=augment, generator=generator)
    else:
        views = decode_and_cut(batch, img_size=img_size, device=device)
        image = augment(views, generator=generator) if augment is not None else views.float() / 255
    out = {"image": image}
    for name in ("label", "teacher", "teacher_hard"):
        if name in batch:
            out[name] = batch[name].to(device, non_blocking=True)
    return out


def prefetch(batches: Iterable[Any], *, device: torch.device | str,
             transform: Callable[[Any, int], Any]) -> Iterator[Any]:
    """Yield ``transform(batch, step)`` for each batch, one batch ahead on a side stream on CUDA.

    On CUDA the next batch's copies (non-blocking from the pinned memory a DataLoader with
    ``pin_memory=True`` gives) and ``transform``'s kernels are queued on a side stream while the
    caller's stream runs the current step; the caller's stream waits for a batch's own event
    only, and the batch's tensors are marked as used there so the allocator keeps them. On
    other devices this is ``transform`` applied in turn.
    """
    device = torch.device(device)
    if device.type != "cuda":
        for step, batch in enumerate(batches):
            yield transform(batch, step)
        return
    side = torch.cuda.Stream(device=device)
    ahead = None
    for step, batch in enumerate(batches):
        with torch.cuda.stream(side):
            ready = transform(batch, step)
            done = torch.cuda.Event()
            done.record(side)
        if ahead is not None:
            yield _hand_over(*ahead)
        ahead = (ready, done)
    if ahead is not None:
        yield _hand_over(*ahead)


def _hand_over(batch: Any, done: torch.cuda.Event) -> Any:
    stream = torch.cuda.current_stream()
    stream.wait_event(done)
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_cuda:
            value.record_stream(stream)
    return batch


class DeviceBatches:
    """One epoch of training batches: a loader over :class:`EncodedShardReplay` (with
    :func:`collate`), decoded, cut and augmented on the device, one batch ahead.

    Args:
        loader: the DataLoader.
        img_size: the student's input side.
        device: the training device.
        augment: the batched augmentation (None: views scaled to [0, 1], no normalisation); on
            shards with stored augmentation, what is added on top of it (:func:`prepare_batch`).
        seed, epoch, rank: the augmentation's draws per step come from
            ``augment_generator(seed, epoch, rank, step)``, so an epoch replays exactly.
        renderer: the label set's ``ViewRenderer`` on shards with stored augmentation, else None.
    """

    def __init__(self, loader: Iterable[dict[str, Any]], *, img_size: int, device: torch.device | str,
                 augment: BatchAugment | None, seed: int, epoch: int, rank: int,
                 renderer: ViewRenderer | None = None) -> None:
        self.loader, self.img_size, self.device, self.augment = loader, img_size, torch.device(device), augment
        self.renderer = renderer
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return prefetch(self.loader, device=self.device, transform=self._prepare)

    def _prepare(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        generator = augment_generator(seed=self.seed, epoch=self.epoch, rank=self.rank, step=step,
                                      device=self.device)
        return prepare_batch(batch, img_size=self.img_size, device=self.device, augment=self.augment,
                             generator=generator, renderer=self.renderer)


__all__ = ["DeviceBatches", "EncodedShardReplay", "collate", "decode_and_cut", "jpeg_layout", "prefetch",
           "prepare_batch", "resample_views"]
