import pytest
import torch
import torch.nn.functional as F

from deitpipe.student import (
    VARIANTS,
    DeiT,
    create_student,
    load_checkpoint,
    resample_pos_embed,
)

timm = pytest.importorskip("timm")

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
    ours = create_student("deit_small_distilled_patch16_224")
    ref = timm.create_model("deit_small_distilled_patch16_224", pretrained=False)
    ref.load_state_dict(ours.state_dict(), strict=True)
    fresh = create_student("deit_small_distilled_patch16_224")
    fresh.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


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


def test_224_checkpoint_loads_into_384_model(tmp_path):
    src = create_student("deit_tiny_distilled_patch16_224")
    path = tmp_path / "deit_224.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)  # official checkpoint layout
    dst = load_checkpoint(create_student("deit_tiny_distilled_patch16_384"), path)
    assert dst.pos_embed.shape == (1, 2 + 24 * 24, 192)
    assert torch.equal(dst.pos_embed[:, :2], src.pos_embed[:, :2])
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
    assert model.blocks[0].drop_path.p == 0.0 and model.blocks[-1].drop_path.p == 0.5


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
    with pytest.raises(ValueError, match="distilled"):
        create_student("deit_tiny_patch16_224").token_similarity(torch.randn(1, 3, 224, 224))


def test_small_images_and_isinstance():
    model = create_student("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32,
                           patch_size=4, embed_dim=96, depth=4, num_heads=3)
    assert isinstance(model, DeiT)
    assert model.pos_embed.shape == (1, 2 + 64, 96)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
