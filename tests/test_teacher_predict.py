"""Teacher prediction: the stored summary of a softmax and the Ray-style batch predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from deitpipe.teacher import (
    Preprocessing,
    TeacherPredictor,
    build_teacher,
    predict_probs,
    summarize_probs,
    write_sidecar,
)

ARCH = "regnet_y_400mf"
NUM_CLASSES = 10
SIZE = 32
PREP = Preprocessing(resize=36, crop=SIZE, mean=(0.45, 0.45, 0.4), std=(0.25, 0.22, 0.23))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """Weights of a small random teacher plus a sidecar; returns (path, reference model)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(ARCH, weights=None, num_classes=NUM_CLASSES).eval()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(model.state_dict(), path)
    write_sidecar(path, {"model": ARCH, "num_classes": NUM_CLASSES, **PREP.to_dict()})
    return path, model


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


def _probs(n: int, c: int, *, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    logits = torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale
    return logits.softmax(dim=-1)


def _reconstruct(out, num_classes: int) -> np.ndarray:
    """Full distribution from top-k + rest, spreading rest evenly over the other classes."""
    n, k = out.topk.shape
    full = np.zeros((n, num_classes), dtype=np.float64)
    others = max(num_classes - k, 1)
    full += out.rest.astype(np.float64)[:, None] / others
    rows = np.arange(n)[:, None]
    full[rows, out.topk.astype(np.int64)] = out.prob.astype(np.float64)
    return full


def test_summarize_probs_invariants():
    probs = _probs(64, 100)
    out = summarize_probs(probs, topk=5, full_softmax=False, index_dtype=np.uint16)
    assert out.hard.dtype == np.int64 and out.hard.shape == (64,)
    assert out.topk.dtype == np.uint16 and out.topk.shape == (64, 5)
    assert out.prob.dtype == np.float16 and out.rest.dtype == np.float16
    assert out.softmax is None and "softmax" not in out.columns()
    np.testing.assert_array_equal(out.hard, probs.argmax(dim=-1).numpy())
    # Sorted by falling probability, and the probabilities are those of the indices.
    assert np.all(np.diff(out.prob.astype(np.float32), axis=1) <= 0)
    gathered = np.take_along_axis(probs.numpy(), out.topk.astype(np.int64), axis=1)
    np.testing.assert_allclose(out.prob, gathered, rtol=1e-3, atol=1e-4)
    total = out.prob.astype(np.float32).sum(axis=1) + out.rest.astype(np.float32)
    np.testing.assert_allclose(total, 1.0, atol=2e-3)
    assert np.all(out.rest >= 0)


def test_reconstruction_is_close_in_kl():
    probs = _probs(64, 100, scale=6.0).double().numpy()
    out = summarize_probs(torch.from_numpy(probs).float(), topk=10, full_softmax=False,
                          index_dtype=np.int32)
    approx = _reconstruct(out, 100)
    kl = np.sum(probs * (np.log(probs) - np.log(np.maximum(approx, 1e-12))), axis=1)
    assert kl.mean() < 0.05
    # Keeping every class loses only float16 rounding.
    every = summarize_probs(torch.from_numpy(probs).float(), topk=100, full_softmax=False,
                            index_dtype=np.int32)
    exact = _reconstruct(every, 100)
    kl = np.sum(probs * (np.log(probs) - np.log(np.maximum(exact, 1e-12))), axis=1)
    assert kl.mean() < 1e-3


def test_topk_clamps_to_num_classes():
    probs = _probs(8, 3)
    out = summarize_probs(probs, topk=5, full_softmax=False, index_dtype=np.uint16)
    assert out.topk.shape == (8, 3)
    np.testing.assert_array_equal(np.sort(out.topk, axis=1), np.tile([0, 1, 2], (8, 1)))
    assert np.all(out.rest.astype(np.float32) < 2e-3)


def test_full_softmax_is_kept():
    probs = _probs(8, 20)
    out = summarize_probs(probs, topk=3, full_softmax=True, index_dtype=np.uint16)
    assert out.softmax.dtype == np.float16 and out.softmax.shape == (8, 20)
    np.testing.assert_allclose(out.softmax.astype(np.float32), probs.numpy(), atol=1e-3)
    assert set(out.columns()) == {"hard", "topk", "prob", "rest", "softmax"}


def test_summarize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cannot hold"):
        summarize_probs(_probs(2, 300), topk=5, full_softmax=False, index_dtype=np.int8)
    with pytest.raises(ValueError, match="topk"):
        summarize_probs(_probs(2, 5), topk=0, full_softmax=False, index_dtype=np.int32)


def test_summarize_empty_batch():
    out = summarize_probs(torch.empty(0, 7), topk=3, full_softmax=True, index_dtype=np.uint16)
    assert out.hard.shape == (0,) and out.topk.shape == (0, 3) and out.softmax.shape == (0, 7)


def test_predict_probs_matches_direct_forward(teacher_file):
    _, model = teacher_file
    pixels = _pixels(7)
    probs = predict_probs(model, pixels, PREP, device="cpu", batch_size=3)
    assert probs.shape == (7, NUM_CLASSES) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(7))
    with torch.no_grad():
        direct = model(_normalized(pixels)).softmax(dim=-1)
    torch.testing.assert_close(probs, direct, atol=1e-5, rtol=1e-4)


def _normalized(pixels: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(PREP.mean).view(1, 3, 1, 1)
    std = torch.tensor(PREP.std).view(1, 3, 1, 1)
    return (torch.from_numpy(pixels.copy()).float() / 255 - mean) / std


def test_predictor_passes_columns_through_and_labels_like_the_model(teacher_file):
    path, model = teacher_file
    predictor = TeacherPredictor(name=ARCH, weights_path=str(path), topk=3, device="cpu",
                                 batch_size=4)
    assert predictor.info.preprocessing == PREP  # from the sidecar
    pixels = _pixels(10, seed=1)
    pixels.setflags(write=False)  # Arrow-backed Ray batches are read-only
    keys = np.array([f"s{i:09d}" for i in range(10)])
    views = np.arange(10, dtype=np.int32) % 3
    out = predictor({"pixels": pixels, "key": keys, "view": views})

    assert set(out) == {"key", "view", "hard", "topk", "prob", "rest"}
    assert out["key"] is keys and out["view"] is views
    with torch.no_grad():
        direct = model(_normalized(pixels)).argmax(dim=-1).numpy()
    np.testing.assert_array_equal(out["hard"], direct)
    assert out["topk"].shape == (10, 3) and out["topk"].dtype == np.uint16
    np.testing.assert_array_equal(out["topk"][:, 0], out["hard"])


def test_predictor_full_softmax_and_empty_batch(teacher_file):
    path, _ = teacher_file
    predictor = TeacherPredictor(name=ARCH, weights_path=path, topk=20, full_softmax=True,
                                 device="auto")
    out = predictor({"pixels": _pixels(3), "label": np.array([1, 2, 3])})
    assert out["softmax"].shape == (3, NUM_CLASSES)
    assert out["topk"].shape == (3, NUM_CLASSES)  # clamped to the head size
    empty = predictor({"pixels": np.zeros((0, 3, SIZE, SIZE), np.uint8), "label": np.array([])})
    assert empty["hard"].shape == (0,) and empty["softmax"].shape == (0, NUM_CLASSES)


def test_predictor_requires_pixels(teacher_file):
    path, _ = teacher_file
    predictor = TeacherPredictor(name=ARCH, weights_path=path, device="cpu")
    with pytest.raises(KeyError, match="pixels"):
        predictor({"image": _pixels(2)})


def test_build_then_predict_agree_with_predictor(teacher_file):
    path, _ = teacher_file
    model, info = build_teacher(ARCH, weights_path=path)
    pixels = _pixels(5, seed=3)
    probs = predict_probs(model, pixels, info.preprocessing, device="cpu", batch_size=8)
    out = TeacherPredictor(name=ARCH, weights_path=path, device="cpu")({"pixels": pixels})
    np.testing.assert_array_equal(out["hard"], probs.argmax(dim=-1).numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu(teacher_file):
    path, _ = teacher_file
    pixels = _pixels(64, seed=4)
    cpu = TeacherPredictor(name=ARCH, weights_path=path, device="cpu", full_softmax=True)
    gpu = TeacherPredictor(name=ARCH, weights_path=path, device="cuda", full_softmax=True)
    assert gpu.device.type == "cuda"
    a, b = cpu({"pixels": pixels}), gpu({"pixels": pixels})
    # bfloat16 keeps ~3 significant digits: probabilities agree closely, labels almost always.
    np.testing.assert_allclose(
        a["softmax"].astype(np.float32), b["softmax"].astype(np.float32), atol=0.03
    )
    assert (a["hard"] == b["hard"]).mean() >= 0.9


def test_confident_rows_keep_their_tail_mass():
    # top-1 rounds to 1.0 in float16; the leftover must still carry the other classes' mass
    probs = torch.tensor([[0.99995, 0.00003, 0.00002] + [0.0] * 7])
    out = summarize_probs(probs, topk=1, full_softmax=False)
    assert float(out.prob[0, 0]) == 1.0
    assert float(out.rest[0]) == pytest.approx(5e-5, rel=1e-2)
