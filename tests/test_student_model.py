from dataclasses import asdict

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from deitpipe.student import (
    VARIANTS,
    DeiT,
    DeiTConfig,
    create_student,
    load_checkpoint,
    resample_pos_embed,
)

PARITY = ["deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
          "deit_tiny_patch16_224"]


def _pair(name, **kw):
    torch.manual_seed(0)
    ours = create_student(name, **kw)
    ref = timm.create_model(name, pretrained=False, **kw)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("name", PARITY)
def test_eval_parity_with_timm(name):
    ours, ref = _pair(name)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (2, 1000)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_mode_returns_both_heads_equal_to_timm():
    ours, ref = _pair("deit_tiny_distilled_patch16_224")
    ours.train(), ref.train()
    ref.set_distilled_training(True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cls_a, dist_a = ours(x)
        cls_b, dist_b = ref(x)
    torch.testing.assert_close(cls_a, cls_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dist_a, dist_b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cls_a, dist_a)  # two distinct heads


def test_eval_output_is_average_of_heads():
    model = create_student("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4,
                           depth=2, num_classes=10)
    x = torch.randn(3, 3, 32, 32)
    model.train()
    with torch.no_grad():
        feats = model.forward_features(x)
        cls_logits, dist_logits = model.forward_head(feats)
        model.eval()
        avg = model(x)
    torch.testing.assert_close(avg, (cls_logits + dist_logits) / 2)


def test_timm_loads_our_state_dict_and_we_load_timm():
    ours = create_student("deit_tiny_distilled_patch16_224")
    ref = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    ref.load_state_dict(ours.state_dict(), strict=True)
    fresh = create_student("deit_tiny_distilled_patch16_224")
    fresh.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


@pytest.mark.parametrize("name", sorted(set(VARIANTS) & set(timm.list_models("deit_*"))))
def test_every_variant_timm_registers_has_its_names_and_shapes(name):
    with torch.device("meta"):
        ours, ref = create_student(name), timm.create_model(name, pretrained=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert isinstance(ours, type(ref)) and isinstance(ours, DeiT)


def test_students_are_timm_models_with_their_config():
    distilled = create_student("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32, patch_size=4,
                               depth=2)
    plain = create_student("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2)
    assert isinstance(distilled, VisionTransformerDistilled) and distilled.distilled
    assert isinstance(plain, VisionTransformer) and not isinstance(plain, VisionTransformerDistilled)
    assert not plain.distilled and isinstance(plain, DeiT)
    assert distilled.config == DeiTConfig(img_size=32, patch_size=4, num_classes=10, depth=2)
    assert asdict(distilled.config)["img_size"] == 32 and distilled.num_classes == 10
    assert distilled.no_weight_decay() >= {"pos_embed", "cls_token", "dist_token"}


def test_plain_variant_has_one_head_and_no_dist_token():
    model = create_student("deit_tiny_patch16_224", num_classes=7)
    keys = model.state_dict().keys()
    assert "dist_token" not in keys and not any(k.startswith("head_dist") for k in keys)
    assert model.pos_embed.shape == (1, 1 + 196, 192)
    model.train()
    out = model(torch.randn(1, 3, 224, 224))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 7)


def test_variant_table_dims():
    for size, dim, heads in (("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12)):
        for res in (224, 384):
            spec = VARIANTS[f"deit_{size}_distilled_patch16_{res}"]
            assert (spec["embed_dim"], spec["num_heads"], spec["depth"]) == (dim, heads, 12)
            assert spec["img_size"] == res and spec["distilled"]
            assert not VARIANTS[f"deit_{size}_patch16_{res}"]["distilled"]
    assert len(VARIANTS) == 12


def test_resample_keeps_prefix_and_matches_bicubic():
    pos = torch.randn(1, 2 + 14 * 14, 16)
    out = resample_pos_embed(pos, new_grid=(24, 24), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 24 * 24, 16)
    assert torch.equal(out[:, :2], pos[:, :2])
    grid = pos[:, 2:].reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 2:], want.permute(0, 2, 3, 1).reshape(1, 576, 16))
    assert resample_pos_embed(pos, new_grid=(14, 14), num_prefix_tokens=2) is pos


def test_resample_down_is_plain_bicubic_without_antialias():
    # DeiT interpolates without antialiasing; timm's resample_abs_pos_embed antialiases by default.
    pos = torch.randn(1, 1 + 8 * 8, 4)
    out = resample_pos_embed(pos, new_grid=(3, 5), num_prefix_tokens=1)
    grid = pos[:, 1:].reshape(1, 8, 8, 4).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(3, 5), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 15, 4))
    assert torch.equal(out[:, :1], pos[:, :1])
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(pos[:, :-1], new_grid=(4, 4), num_prefix_tokens=1)


def test_224_checkpoint_loads_into_384_model(tmp_path):
    src = create_student("deit_tiny_distilled_patch16_224")
    path = tmp_path / "deit_224.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)  # official checkpoint layout
    dst = load_checkpoint(create_student("deit_tiny_distilled_patch16_384"), path)
    assert dst.pos_embed.shape == (1, 2 + 24 * 24, 192)
    assert torch.equal(dst.pos_embed[:, :2], src.pos_embed[:, :2])
    want = resample_pos_embed(src.pos_embed.detach(), new_grid=(24, 24), num_prefix_tokens=2)
    assert torch.equal(dst.pos_embed.detach(), want)
    assert torch.equal(dst.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    dst.eval()
    assert dst(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_load_checkpoint_reports_head_mismatch_by_name(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save(create_student("deit_tiny_distilled_patch16_224").state_dict(), path)
    model = create_student("deit_tiny_distilled_patch16_224", num_classes=10)
    with pytest.raises(ValueError, match=r"head\.weight \(1000, 192\).*\(10, 192\)"):
        load_checkpoint(model, path)
    load_checkpoint(model, path, reset_heads=True)  # fine-tuning to 10 classes
    assert model.head.weight.shape == (10, 192)


def test_load_checkpoint_names_a_pos_embed_it_cannot_resample(tmp_path):
    kw = dict(num_classes=10, img_size=32, patch_size=4, depth=1)
    state = create_student("deit_tiny_distilled_patch16_224", **kw).state_dict()
    state["pos_embed"] = state["pos_embed"][:, :-1]  # 63 patch tokens
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"odd\.pth has a pos_embed of 63 patch tokens, not a square grid"):
        load_checkpoint(create_student("deit_tiny_distilled_patch16_224", **kw), path)


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": object()}}, path)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(create_student("deit_tiny_patch16_224"), path)


def test_backward_reaches_every_parameter():
    model = create_student("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8,
                           depth=2, num_classes=5)
    model.train()
    cls_logits, dist_logits = model(torch.randn(4, 3, 32, 32))
    (cls_logits.logsumexp(-1).sum() + dist_logits.logsumexp(-1).sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_drop_path_is_identity_in_eval_and_active_in_training():
    model = create_student("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                           num_classes=5, drop_path_rate=0.5)
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
    assert not torch.allclose(a, b)
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)  # rate 0 in the first block
    assert model.blocks[-1].drop_path1.drop_prob == 0.5


def test_factory_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown student model 'deit_huge'"):
        create_student("deit_huge")
    with pytest.raises(ValueError, match="img_size 30 is not divisible by patch_size 4"):
        create_student("deit_tiny_patch16_224", img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown override"):
        create_student("deit_tiny_patch16_224", widht=3)
    with pytest.raises(ValueError, match="embed_dim 100 is not divisible by num_heads 3"):
        create_student("deit_tiny_patch16_224", embed_dim=100)


def test_token_similarity_shape_and_range():
    model = create_student("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4,
                           depth=3, num_classes=10).eval()
    sims = model.token_similarity(torch.randn(2, 3, 32, 32))
    assert sims.shape == (4,)
    assert ((sims >= -1) & (sims <= 1)).all()
    # at the input the two tokens differ only by their own embeddings plus position embedding
    cls = model.cls_token[0, 0] + model.pos_embed[0, 0]
    dist = model.dist_token[0, 0] + model.pos_embed[0, 1]
    torch.testing.assert_close(sims[0], F.cosine_similarity(cls, dist, dim=0))
    # after block i: timm's own intermediates, tokens 0 and 1, averaged over the batch
    x = torch.randn(2, 3, 32, 32)
    outs = model.forward_intermediates(x, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True)
    want = torch.stack([F.cosine_similarity(p[:, 0], p[:, 1], dim=-1).mean() for _, p in outs])
    torch.testing.assert_close(model.token_similarity(x)[1:], want)
    with pytest.raises(ValueError, match="distilled"):
        create_student("deit_tiny_patch16_224").token_similarity(torch.randn(1, 3, 224, 224))


def test_small_images_and_isinstance():
    model = create_student("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32,
                           patch_size=4, embed_dim=96, depth=4, num_heads=3)
    assert isinstance(model, DeiT)
    assert model.pos_embed.shape == (1, 2 + 64, 96)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
