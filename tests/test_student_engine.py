import numpy as np
import pytest
import torch
from timm.data import Mixup
from torch import nn

from deitpipe.student.ema import build_ema
from deitpipe.student.engine import MixupCutmix, evaluate, head_logits, train_one_epoch
from deitpipe.student.loss import DistillationLoss
from deitpipe.student.model import create_student
from deitpipe.student.optim import build_optimizer, build_scheduler

C = 4


def _tiny():
    torch.manual_seed(0)
    return create_student("deit_tiny_distilled_patch16_224", img_size=16, patch_size=4,
                          embed_dim=32, depth=2, num_heads=2, num_classes=C)


def _separable(n_batches=8, batch=16, seed=0):
    """Each class is a fixed random image plus noise, so every patch tells the class apart."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(C, 3, 16, 16, generator=g)
    batches = []
    for _ in range(n_batches):
        labels = torch.randint(0, C, (batch,), generator=g)
        images = templates[labels] + 0.5 * torch.randn(batch, 3, 16, 16, generator=g)
        teacher = torch.nn.functional.one_hot(labels, C).float() * 0.9 + 0.1 / C
        batches.append({"image": images, "label": labels, "teacher": teacher,
                        "teacher_hard": labels.clone()})
    return batches


# --- mixup / cutmix ------------------------------------------------------------------------

def _constant_batch(b=4, size=8):
    # Sample i is the constant image i + 1, so each pixel tells which sample it came from.
    images = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, size, size)
    labels = torch.arange(b) % C
    teacher = torch.softmax(torch.randn(b, C, generator=torch.Generator().manual_seed(0)), -1)
    return {"image": images.clone(), "label": labels, "teacher": teacher, "key": ["a"] * b}


def test_mixup_mixes_images_labels_and_teacher_with_one_lambda():
    batch = _constant_batch()
    mix = MixupCutmix(C, mixup_alpha=0.8, cutmix_alpha=0.0, seed=3)
    out = mix(batch)
    lam = (out["image"][0, 0, 0, 0] - 4.0).item() / (1.0 - 4.0)  # sample 0 mixes with sample 3
    assert 0.0 < lam < 1.0 and mix.last_lam == pytest.approx(lam, abs=1e-6)
    onehot = torch.nn.functional.one_hot(batch["label"], C).float()
    for i in range(4):
        j = 3 - i  # timm's partner: the batch flipped
        torch.testing.assert_close(out["image"][i], lam * batch["image"][i] + (1 - lam) * batch["image"][j])
        torch.testing.assert_close(out["label"][i], lam * onehot[i] + (1 - lam) * onehot[j])
        torch.testing.assert_close(out["teacher"][i],
                                   lam * batch["teacher"][i] + (1 - lam) * batch["teacher"][j])
    torch.testing.assert_close(out["label"].sum(-1), torch.ones(4))
    torch.testing.assert_close(out["teacher"].sum(-1), torch.ones(4))
    assert out["key"] is batch["key"]
    assert batch["image"][0, 0, 0, 0] == 1.0  # the input is not modified


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_lambda_is_the_pasted_area(seed):
    batch = _constant_batch(size=10)
    mix = MixupCutmix(C, mixup_alpha=0.0, cutmix_alpha=1.0, seed=seed)
    out = mix(batch)
    onehot = torch.nn.functional.one_hot(batch["label"], C).float()
    lam = mix.last_lam
    for i in range(4):
        kept = (out["image"][i] == i + 1).float().mean().item()  # pixels still from sample i
        pasted = (out["image"][i] == 4 - i).float().mean().item()  # from its partner 3 - i
        assert lam == pytest.approx(kept) and kept + pasted == pytest.approx(1.0)
        torch.testing.assert_close(out["label"][i], lam * onehot[i] + (1 - lam) * onehot[3 - i])
        torch.testing.assert_close(out["teacher"][i],
                                   lam * batch["teacher"][i] + (1 - lam) * batch["teacher"][3 - i])


def test_mixing_is_timms_for_the_same_draws():
    # timm draws from numpy's global RNG: give it the stream MixupCutmix(seed=7) draws from.
    mix = MixupCutmix(C, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.9, seed=7)
    ref = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.9, mode="batch",
                label_smoothing=0.0, num_classes=C)
    saved = np.random.get_state()
    np.random.set_state(np.random.RandomState(np.random.MT19937(7)).get_state())
    try:
        for step in range(6):
            batch = _constant_batch(size=10)
            batch["image"] = batch["image"] + torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(step))
            images, labels = ref(batch["image"].clone(), batch["label"])
            out = mix(batch)  # draws from its own stream: the global one stays timm's here
            torch.testing.assert_close(out["image"], images)
            torch.testing.assert_close(out["label"], labels)
    finally:
        np.random.set_state(saved)


def test_a_seed_fixes_the_draws_and_leaves_numpy_alone():
    def run(seed):
        mix, lams, outs = MixupCutmix(C, prob=0.7, seed=seed), [], []
        for _ in range(8):
            out = mix(_constant_batch(size=8))
            lams.append(mix.last_lam)
            outs.append(out)
        return lams, outs

    np.random.seed(0)
    state = np.random.get_state()
    (lams_a, outs_a), (lams_b, outs_b) = run(5), run(5)
    assert lams_a == lams_b and lams_a != run(6)[0]
    for a, b in zip(outs_a, outs_b):
        for key in ("image", "label", "teacher"):
            assert torch.equal(a[key], b[key])
    assert 1.0 in lams_a and any(lam < 1 for lam in lams_a)  # prob 0.7: some batches unmixed
    onehot = torch.nn.functional.one_hot(_constant_batch()["label"], C).float()
    for lam, out in zip(lams_a, outs_a):
        if lam == 1.0:
            assert torch.equal(out["label"], onehot) and torch.equal(out["image"], _constant_batch(size=8)["image"])
    after = np.random.get_state()
    assert after[0] == state[0] and (after[1] == state[1]).all() and after[2:] == state[2:]


def test_mixup_disabled_by_prob_returns_one_hot_labels():
    batch = _constant_batch()
    for mix in (MixupCutmix(C, prob=0.0, seed=0), MixupCutmix(C, mixup_alpha=0.0, cutmix_alpha=0.0)):
        out = mix(batch)
        torch.testing.assert_close(out["image"], batch["image"])
        assert out["teacher"] is batch["teacher"] and mix.last_lam == 1.0
        torch.testing.assert_close(out["label"], torch.nn.functional.one_hot(batch["label"], C).float())


def test_mixup_switches_between_kinds():
    mix = MixupCutmix(C, seed=1)
    kinds = set()
    for _ in range(20):
        out = mix(_constant_batch())
        # cutmix leaves pure pixels of sample 0 somewhere; mixup blends all of them.
        kinds.add(bool((out["image"][0] == 1.0).any()) if mix.last_lam < 1 else None)
    assert {True, False} <= kinds


def test_mixup_errors_name_the_options():
    with pytest.raises(ValueError, match="--mixup-switch must be in"):
        MixupCutmix(C, switch_prob=1.5)
    with pytest.raises(ValueError, match="--mixup and --cutmix must be >= 0"):
        MixupCutmix(C, mixup_alpha=-1)
    with pytest.raises(ValueError, match="even batch, got 3.*--batch-size"):
        MixupCutmix(C, seed=0)(_constant_batch(b=3))


# --- training ------------------------------------------------------------------------------

def test_training_learns_separable_data():
    model = _tiny()
    data = _separable(n_batches=6)
    loss_fn = DistillationLoss(distillation="hard", alpha=0.5)
    opt = build_optimizer(model, lr=5e-3, weight_decay=0.0)
    first = train_one_epoch(model, loss_fn, data, opt, device="cpu")
    for _ in range(3):
        last = train_one_epoch(model, loss_fn, data, opt, device="cpu")
    assert last["loss"] < 0.5 * first["loss"]
    assert set(last) >= {"loss", "cls", "dist", "lr", "images", "images_per_s", "steps"}
    assert last["images"] == 96 and last["steps"] == 6
    result = evaluate(model, data, device="cpu", num_classes=C)
    assert result["top1_cls"] > 90 and result["top1_dist"] > 90 and result["top1_avg"] > 90
    assert result["agree_teacher_avg"] == result["top1_avg"]  # teacher_hard == label here
    assert result["n"] == 96 and not model.training


def test_online_teacher_replaces_stored_targets():
    model = _tiny()
    data = _separable(n_batches=4)
    seen = []

    def teacher(images):
        seen.append(images)
        return torch.nn.functional.one_hot(torch.full((images.shape[0],), 2), C).float()

    loss_fn = DistillationLoss(distillation="hard", alpha=1.0)
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.0)
    for _ in range(4):
        train_one_epoch(model, loss_fn, data, opt, device="cpu", online_teacher=teacher)
    assert len(seen) == 16
    torch.testing.assert_close(seen[0], data[0]["image"])
    model.eval()
    with torch.no_grad():
        heads = head_logits(model, torch.cat([b["image"] for b in data]))
    assert (heads["dist"].argmax(-1) == 2).all()  # driven by the live teacher, not the labels


def test_steps_schedule_ema_and_progress():
    model = _tiny()
    data = _separable(n_batches=6, batch=4)
    opt = build_optimizer(model, lr=1e-3)
    sched = build_scheduler(opt, epochs=1, steps_per_epoch=6, warmup_epochs=1, warmup_lr=0.0)
    ema = build_ema(model, decay=0.5)
    calls = []
    result = train_one_epoch(
        model, DistillationLoss(distillation="none"), [{k: b[k] for k in ("image", "label")}
                                                       for b in data],
        opt, device="cpu", scheduler=sched, ema=ema, max_steps=4,
        progress=lambda step, info: calls.append((step, info["lr"], float(info["loss"]))))
    assert result["steps"] == 4 and result["images"] == 16
    assert sched.last_epoch == 4 and ema.n_averaged.item() == 4
    assert [c[0] for c in calls] == [1, 2, 3, 4]
    assert [c[1] for c in calls] == pytest.approx([0.0, 1e-3 / 6, 2e-3 / 6, 3e-3 / 6])
    assert result["lr"] == pytest.approx(3e-3 / 6)
    assert result["loss"] == pytest.approx(sum(c[2] for c in calls) / 4, rel=1e-5)
    assert not torch.equal(ema.module.head.weight, model.head.weight)


def test_grad_clip_bounds_the_update():
    model = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_one_epoch(model, DistillationLoss(distillation="soft"), _separable(n_batches=1), opt,
                    device="cpu", grad_clip=1e-3)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert 0 < step.norm().item() <= 1e-3 * 1.001


def test_bf16_autocast_and_mixup_in_the_loop():
    model = _tiny()
    opt = build_optimizer(model, lr=1e-3)
    result = train_one_epoch(model, DistillationLoss(distillation="soft", tau=2.0),
                             _separable(n_batches=2), opt, device="cpu",
                             autocast_dtype=torch.bfloat16, mixup=MixupCutmix(C, seed=0))
    assert result["steps"] == 2 and result["loss"] > 0


def test_non_finite_loss_is_reported():
    model = _tiny()
    data = _separable(n_batches=1)
    data[0]["image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        train_one_epoch(model, DistillationLoss(distillation="none"), data,
                        build_optimizer(model, lr=1e-3), device="cpu")


# --- evaluation ----------------------------------------------------------------------------

class FixedHeads(nn.Module):
    """Features are the batch's own rows; heads read token 0 and token 1 as logits."""

    def __init__(self, distilled=True):
        super().__init__()
        self.head = nn.Identity()
        self.head_dist = nn.Identity() if distilled else None

    def forward_features(self, x):
        return x  # (B, 2, C)

    def forward(self, x):
        return x[:, 0]


def test_evaluate_hand_made_case():
    cls = torch.tensor([[9., 8, 7, 6, 5, 0], [0, 9, 8, 7, 6, 5], [9, 0, 1, 0, 0, 0]])
    dist = torch.tensor([[0., 9, 0, 0, 0, 0], [0, 9, 0, 0, 0, 0], [0, 0, 9, 8, 7, 6]])
    labels = torch.tensor([0, 0, 2])
    batch = {"image": torch.stack([cls, dist], dim=1), "label": labels,
             "teacher_hard": torch.tensor([1, 1, 2])}
    r = evaluate(FixedHeads(), [batch], device="cpu", num_classes=6)
    assert r["n"] == 3
    assert r["top1_cls"] == pytest.approx(100 / 3)  # only sample 0
    assert r["top5_cls"] == pytest.approx(200 / 3)  # samples 0 and 2
    assert r["top1_dist"] == pytest.approx(100 / 3)  # only sample 2
    assert r["agree_teacher_dist"] == pytest.approx(100.0)
    assert r["agree_teacher_cls"] == pytest.approx(100 / 3)  # sample 1 predicts 1
    # avg logits: argmax 1, 1 and 2 (sample 2: [4.5, 0, 5, 4, 3.5, 3])
    assert r["top1_avg"] == pytest.approx(100 / 3)
    assert r["agree_teacher_avg"] == pytest.approx(100.0)


def test_evaluate_single_head_and_missing_teacher():
    logits = torch.tensor([[1., 0, 0], [0, 1, 0]])
    batch = {"image": torch.stack([logits, logits], 1), "label": torch.tensor([0, 0])}
    r = evaluate(FixedHeads(distilled=False), [batch], device="cpu", num_classes=3)
    assert r == {"top1": 50.0, "n": 2}
