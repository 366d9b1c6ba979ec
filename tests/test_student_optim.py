import pytest
import torch

from deitpipe.student.ema import build_ema
from deitpipe.student.model import create_student
from deitpipe.student.optim import bf16_autocast, build_optimizer, build_scheduler, param_groups, scaled_lr


def _tiny():
    torch.manual_seed(0)
    return create_student("deit_tiny_distilled_patch16_224", img_size=16, patch_size=4,
                          embed_dim=32, depth=2, num_heads=2, num_classes=4)


def test_param_groups_split_by_name():
    model = _tiny()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for name in ("pos_embed", "cls_token", "dist_token", "norm.weight", "head.bias",
                 "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias", "patch_embed.proj.bias"):
        assert name in no_decay["names"], name
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight",
                 "head.weight", "head_dist.weight"):
        assert name in decay["names"], name
    # Every trainable parameter lands in exactly one group.
    all_names = decay["names"] + no_decay["names"]
    assert sorted(all_names) == sorted(n for n, _ in model.named_parameters())
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out():
    model = _tiny()
    model.patch_embed.proj.weight.requires_grad_(False)
    names = [n for g in param_groups(model, weight_decay=0.05) for n in g["names"]]
    assert "patch_embed.proj.weight" not in names


def test_scaled_lr_is_linear_in_batch():
    assert scaled_lr(5e-4, 512) == pytest.approx(5e-4)
    assert scaled_lr(5e-4, 1024) == pytest.approx(1e-3)
    assert scaled_lr(5e-4, 64) == pytest.approx(6.25e-5)
    with pytest.raises(ValueError):
        scaled_lr(5e-4, 0)


def _schedule(epochs=4, steps=10, warmup=1, lr=1e-3, **kw):
    opt = build_optimizer(_tiny(), lr=lr)
    return opt, build_scheduler(opt, epochs=epochs, steps_per_epoch=steps, warmup_epochs=warmup, **kw)


def _lrs(opt, sched, n):
    out = []
    for _ in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_floor():
    opt, sched = _schedule(min_lr=1e-5, warmup_lr=1e-6)
    lrs = _lrs(opt, sched, 41)
    assert lrs[0] == pytest.approx([1e-6, 1e-6])
    assert lrs[5][0] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert lrs[10][0] == pytest.approx(1e-3)  # peak at the end of warmup
    assert max(l[0] for l in lrs) == pytest.approx(1e-3)
    after = [l[0] for l in lrs[10:]]
    assert all(a > b for a, b in zip(after, after[1:-1]))  # strictly decreasing until the end
    assert lrs[25][0] == pytest.approx((1e-3 + 1e-5) / 2)  # halfway down the cosine
    assert lrs[40][0] == pytest.approx(1e-5)
    assert all(l[0] == l[1] for l in lrs)


def test_no_warmup_starts_at_peak_and_floor_is_capped():
    opt, sched = _schedule(warmup=0, lr=1e-6, min_lr=1e-5)
    lrs = [l[0] for l in _lrs(opt, sched, 41)]
    assert lrs[0] == pytest.approx(1e-6)
    assert max(lrs) == pytest.approx(1e-6)  # a floor above the peak does not make it rise


def test_state_dict_resume_continues_identically():
    opt, sched = _schedule()
    _lrs(opt, sched, 13)
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    expected = _lrs(opt, sched, 20)

    opt2, sched2 = _schedule()
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert _lrs(opt2, sched2, 20) == expected


@pytest.mark.parametrize("kw, option", [
    (dict(warmup=5), "--warmup-epochs"),
    (dict(epochs=0), "--epochs"),
    (dict(min_lr=-1.0), "--min-lr"),
])
def test_scheduler_validation(kw, option):
    with pytest.raises(ValueError, match=option):
        _schedule(**kw)


def test_optimizer_validation():
    with pytest.raises(ValueError, match="--lr"):
        build_optimizer(_tiny(), lr=0.0)
    with pytest.raises(ValueError, match="--optimizer must be one of adamw, sgd"):
        build_optimizer(_tiny(), lr=1e-3, kind="adam")


def test_sgd_kind_keeps_the_decay_split():
    model = _tiny()
    opt = build_optimizer(model, lr=0.1, weight_decay=5e-4, kind="sgd", momentum=0.8, nesterov=True)
    assert isinstance(opt, torch.optim.SGD)
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    assert decay["momentum"] == 0.8 and decay["nesterov"] and decay["lr"] == 0.1
    want = param_groups(model, weight_decay=5e-4)
    assert [g["names"] for g in opt.param_groups] == [g["names"] for g in want]
    assert isinstance(build_optimizer(model, lr=1e-3), torch.optim.AdamW)  # the default kind


def test_bf16_autocast_only_on_cuda():
    x = torch.randn(2, 3)
    with bf16_autocast("cpu"):
        assert (x @ x.T).dtype == torch.float32  # the CPU stays in fp32: reproducible
    assert bf16_autocast(torch.device("cpu")).fast_dtype == torch.bfloat16


def test_ema_moves_towards_model():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = build_ema(model, decay=0.9)
    ema.update_parameters(model)  # first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 0.1))
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 0.19))
    state = ema.state_dict()
    again = build_ema(torch.nn.Linear(2, 1, bias=False), decay=0.9)
    again.load_state_dict(state)
    torch.testing.assert_close(again.module.weight, ema.module.weight)
    assert again.n_averaged.item() == 3
    with pytest.raises(ValueError, match="--ema-decay"):
        build_ema(model, decay=1.0)
