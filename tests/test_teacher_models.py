"""Teacher construction, weight loading, sidecars and preprocessing resolution."""

from __future__ import annotations

import hashlib
import os
from urllib.parse import urlparse

import pytest
import torch
import torchvision

from deitpipe.teacher import (
    Preprocessing,
    build_teacher,
    default_preprocessing,
    file_sha256,
    load_state_dict_file,
    normalize,
    preprocessing_from_weights,
    read_sidecar,
    resolve_preprocessing,
    sidecar_path,
    write_sidecar,
)

ARCH = "regnet_y_400mf"
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(ARCH, weights=None, num_classes=NUM_CLASSES).eval()


@pytest.fixture
def weights_file(tmp_path, small_model):
    path = tmp_path / "teacher.pt"
    torch.save(small_model.state_dict(), path)
    return path


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache under tmp_path; returns its checkpoints directory."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = _images()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_plain_state_dict_round_trip(small_model, weights_file):
    model, info = build_teacher(ARCH, weights_path=weights_file)
    assert not model.training
    assert _same_outputs(model, small_model)
    assert info.num_classes == NUM_CLASSES  # inferred from fc.weight
    assert info.weights == str(weights_file)
    assert info.weights_sha256 == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert info.class_names is None
    # No sidecar: the preprocessing of torchvision's default weights for the architecture.
    weights = torchvision.models.get_model_weights(ARCH).DEFAULT
    assert info.preprocessing == preprocessing_from_weights(weights)


def test_wrapped_and_prefixed_checkpoint(tmp_path, small_model):
    path = tmp_path / "ckpt.pth"
    state = {f"module.{k}": v for k, v in small_model.state_dict().items()}
    torch.save({"model": state, "epoch": 3, "args": {"lr": 0.1}}, path)
    model, info = build_teacher(ARCH, weights_path=path, num_classes=NUM_CLASSES)
    assert _same_outputs(model, small_model)
    assert info.num_classes == NUM_CLASSES


def test_state_dict_under_state_dict_key(tmp_path, small_model):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": small_model.state_dict()}, path)
    model, _ = build_teacher(ARCH, weights_path=path)
    assert _same_outputs(model, small_model)


def test_wrong_num_classes_names_key_and_shapes(weights_file, small_model):
    in_features = small_model.fc.in_features
    with pytest.raises(ValueError) as error:
        build_teacher(ARCH, weights_path=weights_file, num_classes=5)
    message = str(error.value)
    assert "\n" not in message
    assert "fc.weight" in message
    assert f"({NUM_CLASSES}, {in_features})" in message
    assert f"(5, {in_features})" in message
    assert "--num-classes" in message


def test_wrong_architecture_is_reported(weights_file):
    with pytest.raises(ValueError, match="do not fit resnet18"):
        build_teacher("resnet18", weights_path=weights_file)


def test_checkpoint_without_state_dict(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"epoch": 1, "lr": 0.5}, path)
    with pytest.raises(ValueError, match="is not a state dict") as error:
        build_teacher(ARCH, weights_path=path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_compiled_ddp_and_ema_checkpoints_load(tmp_path, small_model):
    # read_state_dict unwraps "state_dict_ema" and one "module."; the teacher also removes the
    # "_orig_mod." of torch.compile, in either order.
    for i, prefix in enumerate(("module._orig_mod.", "_orig_mod.module.", "_orig_mod.")):
        path = tmp_path / f"ckpt{i}.pth"
        state = {prefix + k: v for k, v in small_model.state_dict().items()}
        torch.save({"state_dict_ema": state, "epoch": 3}, path)
        assert load_state_dict_file(path).keys() == small_model.state_dict().keys()
        model, _ = build_teacher(ARCH, weights_path=path)
        assert _same_outputs(model, small_model)


def test_unreadable_weights_file_is_one_line(tmp_path):
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read checkpoint") as error:
        build_teacher(ARCH, weights_path=path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_teacher(ARCH, weights_path=tmp_path / "nope.pt")


def test_unknown_name_is_one_clear_line():
    with pytest.raises(ValueError) as error:
        build_teacher("regnet_y_16gff")
    message = str(error.value)
    assert "\n" not in message
    assert "unknown teacher 'regnet_y_16gff'" in message
    assert "regnet_y_16gf" in message  # close match suggested
    assert "list_models" in message


def test_no_weights_and_empty_hub_cache_names_the_file(empty_hub):
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    expected = empty_hub / os.path.basename(urlparse(weights.url).path)
    with pytest.raises(FileNotFoundError) as error:
        build_teacher("resnet18")
    message = str(error.value)
    assert "\n" not in message
    assert str(expected) in message
    assert "--teacher-weights" in message


def test_failed_download_gives_the_same_fix(empty_hub, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="network is unreachable") as error:
        build_teacher("resnet18", allow_download=True)
    assert str(empty_hub) in str(error.value)


def test_num_classes_without_weights_file_is_refused(empty_hub):
    with pytest.raises(ValueError, match="1000 classes"):
        build_teacher("resnet18", num_classes=10)


def test_hub_cache_file_is_loaded(empty_hub):
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(num_classes=1000).eval()
    empty_hub.mkdir(parents=True)
    cached = empty_hub / os.path.basename(urlparse(weights.url).path)
    torch.save(reference.state_dict(), cached)

    model, info = build_teacher("resnet18")
    assert _same_outputs(model, reference)
    assert info.weights == str(weights)
    assert info.weights_sha256 == file_sha256(cached)
    assert info.num_classes == 1000
    assert info.class_names == tuple(weights.meta["categories"])
    assert info.preprocessing == preprocessing_from_weights(weights)


def test_sidecar_round_trip_drives_build(weights_file):
    names = [f"class {i}" for i in range(NUM_CLASSES)]
    data = {
        "model": ARCH,
        "num_classes": NUM_CLASSES,
        "class_names": names,
        "crop": 48,
        "resize": 56,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bicubic",
    }
    written = write_sidecar(weights_file, data)
    assert written == sidecar_path(weights_file) == weights_file.with_name("teacher.json")
    assert read_sidecar(weights_file) == data
    # Nothing but the two files: the temporary file was renamed into place.
    assert sorted(p.name for p in weights_file.parent.iterdir()) == ["teacher.json", "teacher.pt"]

    _, info = build_teacher(ARCH, weights_path=weights_file)
    assert info.class_names == tuple(names)
    assert info.preprocessing == Preprocessing(
        resize=56, crop=48, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic"
    )
    # Overrides win over the sidecar, field by field.
    prep = resolve_preprocessing(name=ARCH, weights_path=weights_file, overrides={"crop": 40})
    assert (prep.crop, prep.resize, prep.interpolation) == (40, 56, "bicubic")


def test_sidecar_num_classes_is_used(weights_file):
    write_sidecar(weights_file, {"model": ARCH, "num_classes": 7})
    # The file's head has 10 classes: the sidecar's 7 is what was asked for.
    with pytest.raises(ValueError, match=r"\(7, "):
        build_teacher(ARCH, weights_path=weights_file)
    model, info = build_teacher(ARCH, weights_path=weights_file, num_classes=NUM_CLASSES)
    assert info.num_classes == NUM_CLASSES  # the option wins over the sidecar


def test_sidecar_with_input_size_key(weights_file):
    write_sidecar(weights_file, {"input_size": 64})
    prep = resolve_preprocessing(name=ARCH, weights_path=weights_file, overrides={})
    assert prep.crop == 64


def test_sidecar_for_another_model_is_refused(weights_file):
    write_sidecar(weights_file, {"model": "resnet50"})
    with pytest.raises(ValueError, match="--teacher resnet50"):
        build_teacher(ARCH, weights_path=weights_file)


def test_no_sidecar_reads_none(weights_file):
    assert read_sidecar(weights_file) is None


def test_write_sidecar_replaces_only_its_own(weights_file):
    foreign = sidecar_path(weights_file)
    foreign.write_text('{"input_size": 64, "written_by": "another tool"}')
    with pytest.raises(ValueError, match="teacher.json was not written by deitpipe") as error:
        write_sidecar(weights_file, {"model": ARCH})
    assert "\n" not in str(error.value)
    assert foreign.read_text() == '{"input_size": 64, "written_by": "another tool"}'
    assert read_sidecar(weights_file) == {"input_size": 64}  # still read: it describes the weights
    foreign.unlink()
    write_sidecar(weights_file, {"model": ARCH})
    write_sidecar(weights_file, {"model": ARCH, "num_classes": 7})  # its own: replaced
    assert read_sidecar(weights_file) == {"model": ARCH, "num_classes": 7}


def test_preprocessing_from_weights_reads_torchvision_metadata():
    weights = torchvision.models.get_model_weights("regnet_y_16gf").DEFAULT
    transform = weights.transforms()
    prep = preprocessing_from_weights(weights)
    assert prep.resize == transform.resize_size[0]
    assert prep.crop == transform.crop_size[0]
    assert prep.mean == pytest.approx(tuple(transform.mean))
    assert prep.std == pytest.approx(tuple(transform.std))
    assert prep.interpolation == transform.interpolation.value
    assert resolve_preprocessing(name="regnet_y_16gf", weights_path=None, overrides={}) == prep


def test_preprocessing_of_another_weights_member():
    # A weights member with a different eval transform than the default one.
    swag = torchvision.models.RegNet_Y_16GF_Weights.IMAGENET1K_SWAG_E2E_V1
    prep = preprocessing_from_weights(swag)
    assert prep.crop == swag.transforms().crop_size[0]
    assert prep.interpolation == swag.transforms().interpolation.value


def test_default_preprocessing_is_imagenet():
    prep = default_preprocessing()
    assert (prep.resize, prep.crop, prep.interpolation) == (256, 224, "bilinear")
    assert prep.mean == (0.485, 0.456, 0.406)
    assert prep.std == (0.229, 0.224, 0.225)


def test_preprocessing_dict_round_trip_and_validation():
    prep = Preprocessing(resize=72, crop=64, mean=[0.1, 0.2, 0.3], std=[1, 2, 3])
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    assert isinstance(prep.mean, tuple) and isinstance(prep.std[0], float)
    bad = [
        dict(resize=0, crop=64),
        dict(resize=72, crop=6.5),
        dict(resize=72, crop=64, mean=(0.1, 0.2)),
        dict(resize=72, crop=64, std=(1.0, 0.0, 1.0)),
        dict(resize=72, crop=64, interpolation="lanczos"),
    ]
    for fields in bad:
        kwargs = {"mean": (0.5,) * 3, "std": (0.5,) * 3, **fields}
        with pytest.raises(ValueError):
            Preprocessing(**kwargs)
    with pytest.raises(ValueError, match="missing"):
        Preprocessing.from_dict({"crop": 64})
    with pytest.raises(ValueError, match="unknown preprocessing override"):
        resolve_preprocessing(name=ARCH, weights_path=None, overrides={"size": 3})


def test_normalize_matches_formula():
    prep = Preprocessing(resize=40, crop=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    out = normalize(pixels, prep, "cpu")
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (pixels.float() / 255 - mean) / std)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    # Rendered views (mixed, erased) come as float32 in [0, 1] units: the same formula without 255.
    torch.testing.assert_close(normalize(pixels.float() / 255, prep, "cpu"), out)
    with pytest.raises(ValueError, match="uint8 or float32"):
        normalize(pixels.double(), prep, "cpu")
    with pytest.raises(ValueError, match="uint8 or float32"):
        normalize(pixels[:, :2], prep, "cpu")
