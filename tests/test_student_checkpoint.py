"""Loading a checkpoint of another architecture: one line that names the file and what differs."""

from __future__ import annotations

import pytest
import torch

from deitpipe.student import create_student, load_checkpoint

NAME = "deit_tiny_distilled_patch16_224"
SMALL = dict(num_classes=10, img_size=32, patch_size=4, embed_dim=96, num_heads=3)


def _saved(tmp_path, **kw):
    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    torch.save(create_student(kw.pop("name", NAME), **{**SMALL, **kw}).state_dict(), path)
    return path


def _error(model, path) -> str:
    with pytest.raises(ValueError) as error:
        load_checkpoint(model, path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    assert "Error(s) in loading state_dict" not in message
    return message


def test_another_depth_and_width_is_one_short_line(tmp_path):
    path = _saved(tmp_path, depth=4)
    message = _error(create_student(NAME, **{**SMALL, "embed_dim": 192, "depth": 6}), path)
    assert message.startswith(f"checkpoint {path} is for another model: 24 missing keys (blocks.4.norm1.weight, ...)")
    assert "of other shape (cls_token: (1, 1, 96) vs (1, 1, 192))" in message
    assert message.endswith("build it as the file's: depth 4 not 6, embed_dim 96 not 192")
    assert len(message) - len(str(path)) < 200


def test_a_deeper_checkpoint_names_its_extra_blocks(tmp_path):
    path = _saved(tmp_path, depth=4)
    message = _error(create_student(NAME, **SMALL, depth=2), path)
    assert "24 unexpected (blocks.2.norm1.weight, ...)" in message and "missing" not in message
    assert message.endswith("depth 4 not 2")


def test_another_width_names_the_first_shape(tmp_path):
    path = _saved(tmp_path, depth=2)
    message = _error(create_student(NAME, **{**SMALL, "embed_dim": 192, "depth": 2}), path)
    assert "does not fit the model: cls_token (1, 1, 96) in the file vs (1, 1, 192) in the model" in message
    assert message.endswith("build it as the file's: embed_dim 96 not 192")


def test_a_distilled_checkpoint_in_a_plain_model(tmp_path):
    path = _saved(tmp_path, depth=2)
    message = _error(create_student("deit_tiny_patch16_224", **SMALL, depth=2), path)
    assert "3 unexpected (dist_token, ...)" in message and message.endswith("distilled not plain")


def test_a_model_of_another_kind_is_named_by_its_counts(tmp_path):
    path = tmp_path / "convnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)
    message = _error(create_student(NAME, **SMALL, depth=1), path)
    assert "2 unexpected (conv1.weight, ...)" in message and "missing keys (cls_token, ...)" in message
    assert message.endswith("build the model with the variant and sizes the checkpoint was trained with")


def test_the_same_architecture_still_loads(tmp_path):
    path = _saved(tmp_path, depth=2)
    model = load_checkpoint(create_student(NAME, **SMALL, depth=2), path)
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"],
                       torch.load(path, weights_only=True)["blocks.1.mlp.fc2.weight"])
