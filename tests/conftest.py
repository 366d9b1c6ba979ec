"""Fixtures that make small real data: images of several types and modes, image folders, shards."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import write_manifest
from deitpipe.shards.format.plan import plan_shards
from deitpipe.shards.format.writer import ShardFileWriter, encode_sample


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def smooth_rgb(height: int, width: int) -> Image.Image:
    """A smooth colour image (low-frequency ramps), so resampling differences stay small."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127.5 + 127.5 * np.sin(2 * np.pi * (x / width + y / height))
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8))


def halves_rgb(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


@pytest.fixture(scope="session")
def image_bytes() -> dict[str, bytes]:
    """Named traps: bytes of images (and non-images) a real data set contains."""
    rgb = smooth_rgb(48, 64)
    jpeg = encode(rgb, "JPEG", quality=95)
    rgba = Image.new("RGBA", (16, 12), (255, 0, 0, 255))
    rgba.paste((0, 255, 0, 0), (0, 0, 8, 12))  # left half fully transparent
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (5, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    deep = Image.fromarray(np.array([[0, 32896, 65535, 1000]], dtype=np.uint16))
    return {
        "rgb_jpeg": jpeg,
        "rgb_png": encode(rgb, "PNG"),
        "webp": encode(rgb, "WEBP", lossless=True),
        "gif": encode(rgb.convert("P"), "GIF"),
        "bmp": encode(rgb, "BMP"),
        "tiff": encode(rgb, "TIFF"),
        "ppm": encode(rgb, "PPM"),
        "cmyk_jpeg": encode(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG", quality=95),
        "grey_jpeg": encode(rgb.convert("L"), "JPEG"),
        "rgba_png": encode(rgba, "PNG"),
        "palette_png": encode(pal, "PNG", transparency=0),
        "grey16_png": encode(deep, "PNG"),
        "exif_jpeg": encode(halves_rgb(40, 20), "JPEG", quality=95, exif=exif),
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "zero": b"",
        "text": b"n01440764 tench, Tinca tinca\n",
    }


@pytest.fixture()
def image_folder(tmp_path: Path, image_bytes: dict[str, bytes]) -> Path:
    """An ImageFolder tree with the traps a real one has: wrong extensions, notes, hidden files."""
    root = tmp_path / "imgs"
    files = {
        "cat/a.jpg": image_bytes["rgb_jpeg"],
        "cat/b.JPEG": image_bytes["rgb_png"],  # PNG named .JPEG
        "cat/c.jpg": image_bytes["truncated_jpeg"],
        "cat/notes.txt": image_bytes["text"],
        "cat/.DS_Store": b"\0\0\0\1Bud1",
        "cat/sub/d.png": image_bytes["rgba_png"],
        "dog/e": image_bytes["cmyk_jpeg"],  # no extension
        "dog/f.jpg": image_bytes["zero"],
        "dog/labels.json": b"{}",
        "dog/.hidden/g.jpg": image_bytes["rgb_jpeg"],
        "README.md": b"# images\n",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "empty").mkdir()
    return root


def make_sample(index: int, *, views: int = 2, topk: int = 3, num_classes: int = 10, softmax: bool = False) -> dict:
    """Encoder arguments for one synthetic sample with random but valid teacher outputs."""
    rng = np.random.default_rng(index)
    img = smooth_rgb(20 + index, 30)
    probs = rng.dirichlet(np.ones(num_classes), size=views + 1).astype(np.float32)
    top = np.argsort(-probs, axis=1)[:, :topk]
    top_p = np.take_along_axis(probs, top, 1)
    arrays = {
        "box": np.tile(np.array([0, 0, img.height, img.width], np.int32), (views + 1, 1)),
        "flip": (rng.random(views + 1) < 0.5).astype(np.uint8),
        "hard": top[:, 0].astype(np.uint16),
        "topk": top.astype(np.uint16),
        "prob": top_p.astype(np.float16),
        "rest": (1 - top_p.sum(1)).astype(np.float16),
    }
    if softmax:
        arrays["softmax"] = probs.astype(np.float16)
    return dict(
        key=schema.sample_key(index),
        image_bytes=encode(img, "PNG"),
        image_ext="png",
        label=index % num_classes,
        meta={"path": f"synthetic/{index}.png", "height": img.height, "width": img.width},
        views=arrays,
    )


def write_shard_set(out_dir: Path, *, num_samples: int = 5, shard_size: int = 3, **kw: Any) -> list[dict]:
    """Write a small shard set with its manifest; returns the encoder arguments per sample."""
    samples = [make_sample(i, **kw) for i in range(num_samples)]
    entries = []
    for s, part in enumerate(plan_shards(num_samples, shard_size)):
        with ShardFileWriter(out_dir, schema.shard_name(s)) as w:
            for i in part:
                w.write(encode_sample(**samples[i]))
        entries.append({**w.record(), "first_index": part.start})
    write_manifest(
        out_dir,
        {"num_classes": kw.get("num_classes", 10), "views": kw.get("views", 2), "topk": kw.get("topk", 3),
         "full_softmax": kw.get("softmax", False), "shards": entries},
    )
    return samples


@pytest.fixture()
def shard_set(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Two shards (3 + 2 samples) with a manifest."""
    out = tmp_path / "shards"
    return out, write_shard_set(out)


@pytest.fixture()
def sample_maker():
    """:func:`make_sample` as a fixture, for tests that build their own samples."""
    return make_sample


@pytest.fixture()
def shard_set_writer():
    """:func:`write_shard_set` as a fixture."""
    return write_shard_set


@pytest.fixture()
def smooth_image():
    """:func:`smooth_rgb` as a fixture: ``smooth_image(height, width)`` -> RGB image."""
    return smooth_rgb


def write_digit_folder(root: Path, n: int = 8, *, size: tuple[int, int] = (16, 16), ext: str = "png") -> Path:
    """An ImageFolder ``root/<digit>/<i>.<ext>`` of the first ``n`` of scikit-learn's digits, RGB at
    ``size``, as PNG or (``ext="jpg"``) JPEG at quality 90."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(n):
        p = root / str(d.target[i]) / f"{i:03d}.{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((d.images[i] * 15).astype(np.uint8)).resize(size).convert("RGB")
        img.save(p, **({"quality": 90} if ext == "jpg" else {}))
    return root


def write_teacher(path: Path, num_classes: int = 10, *, side: int = 16) -> Path:
    """An untrained resnet18 teacher's weights at ``path`` with the sidecar label-teacher reads."""
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.get_model("resnet18", num_classes=num_classes).state_dict(), path)
    sidecar = {"model": "resnet18", "num_classes": num_classes, "resize": side, "crop": side,
               "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 API (moto's server) on loopback, on a port the system picks, for this session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """``s3://BUCKET`` of a fresh bucket; the AWS environment points every process at the server."""
    import re
    import uuid

    import pyarrow.fs as pafs

    for key, value in {"AWS_ENDPOINT_URL_S3": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    host = s3_endpoint.split("://", 1)[1]
    pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1", access_key="testing",
                      secret_key="testing", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}"


class RecordingBar:
    """A stand-in for ``pipeline.progress.Progress`` that records what it was told."""

    def __init__(self):
        self.began, self.updates, self.closed = None, [], False

    def begin(self, done_before=0):
        self.began = done_before

    def update(self, n, **info):
        self.updates.append((n, info))

    def close(self):
        self.closed = True


def run_cli(*args: Any):
    """``deitpipe ARGS`` in this process (click's runner), every argument as a string."""
    from click.testing import CliRunner

    from deitpipe.pipeline.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    """The single ``Error: ...`` line a failed command printed (and exit code 1); fails otherwise."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


def complete_shard_set(folder: Path, n: int = 16, *, shard_size: int = 8, **kw: Any) -> Path:
    """:func:`write_shard_set` (3 views, top-3, 10 classes) with a manifest train-student accepts:
    complete, with a teacher and class names."""
    write_shard_set(folder, num_samples=n, shard_size=shard_size, views=3, topk=3, num_classes=10, **kw)
    manifest = json.loads((folder / schema.MANIFEST_NAME).read_text())
    manifest.update(complete=True, teacher={"name": "resnet18"}, class_names=[str(i) for i in range(10)])
    (folder / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder
