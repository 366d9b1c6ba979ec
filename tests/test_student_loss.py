import math

import pytest
import torch

from deitpipe.student.loss import DistillationLoss, split_outputs, temper

# Two samples, three classes; expected values below come from the textbook formulas in plain
# Python, not from torch.
CLS = [[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]
DIST = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
LABELS = [1, 2]
TEACHER = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]


def _log_softmax(row, tau=1.0):
    z = [v / tau for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def _ce(rows, targets, eps=0.0):
    """Mean over rows of -sum_c t_c log q_c with t smoothed as (1 - eps) t + eps / C."""
    total = 0.0
    for row, t in zip(rows, targets):
        c = len(row)
        t = [1.0 if j == t else 0.0 for j in range(c)] if isinstance(t, int) else t
        t = [(1 - eps) * v + eps / c for v in t]
        total -= sum(tj * lq for tj, lq in zip(t, _log_softmax(row)))
    return total / len(rows)


def _soft_kl(rows, teacher, tau):
    total = 0.0
    for row, p in zip(rows, teacher):
        pt = [v ** (1 / tau) for v in p]
        pt = [v / sum(pt) for v in pt]
        lq = _log_softmax(row, tau)
        total += sum(a * (math.log(a) - b) for a, b in zip(pt, lq) if a > 0)
    return total / len(rows) * tau**2


def _inputs(requires_grad=False):
    cls = torch.tensor(CLS, requires_grad=requires_grad)
    dist = torch.tensor(DIST, requires_grad=requires_grad)
    return cls, dist, torch.tensor(LABELS), torch.tensor(TEACHER)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_soft_matches_hand_computed_kl(tau):
    loss = DistillationLoss(distillation="soft", alpha=0.5, tau=tau)
    parts = loss(*_inputs())
    cls, kl = _ce(CLS, LABELS), _soft_kl(DIST, TEACHER, tau)
    assert parts["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert parts["dist"].item() == pytest.approx(kl, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(0.5 * cls + 0.5 * kl, rel=1e-5)


def test_tau_squared_scaling_and_batchmean():
    # tau^2 * KL, averaged over the batch (not over B * C as DeiT's losses.py does).
    p = _soft_kl(DIST, TEACHER, 4.0) / 16.0
    parts = DistillationLoss(distillation="soft", alpha=1.0, tau=4.0)(*_inputs())
    assert parts["dist"].item() == pytest.approx(16.0 * p, rel=1e-5)
    assert parts["dist"].item() != pytest.approx(16.0 * p / 3, rel=1e-2)


def test_hard_is_ce_on_teacher_argmax():
    parts = DistillationLoss(distillation="hard", alpha=0.5)(*_inputs())
    dist = _ce(DIST, [0, 2])  # argmax of the teacher rows
    assert parts["dist"].item() == pytest.approx(dist, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(0.5 * _ce(CLS, LABELS) + 0.5 * dist, rel=1e-5)


@pytest.mark.parametrize("distillation", ["soft", "hard"])
def test_alpha_extremes(distillation):
    only_cls = DistillationLoss(distillation=distillation, alpha=0.0)(*_inputs())
    only_dist = DistillationLoss(distillation=distillation, alpha=1.0)(*_inputs())
    assert only_cls["loss"].item() == pytest.approx(only_cls["cls"].item())
    assert only_dist["loss"].item() == pytest.approx(only_dist["dist"].item())
    assert only_cls["cls"].item() != pytest.approx(only_cls["dist"].item())


@pytest.mark.parametrize("distillation", ["soft", "hard"])
def test_label_smoothing_applies_to_class_head_only(distillation):
    plain = DistillationLoss(distillation=distillation)(*_inputs())
    smooth = DistillationLoss(distillation=distillation, label_smoothing=0.1)(*_inputs())
    assert smooth["cls"].item() == pytest.approx(_ce(CLS, LABELS, eps=0.1), rel=1e-5)
    assert smooth["cls"].item() != pytest.approx(plain["cls"].item(), rel=1e-3)
    assert smooth["dist"].item() == pytest.approx(plain["dist"].item(), rel=1e-6)


def test_soft_labels_from_mixup():
    lam = 0.3
    soft = [[0.0, lam, 1 - lam], [0.0, 1 - lam, lam]]
    cls, dist, _, teacher = _inputs()
    parts = DistillationLoss(distillation="hard", label_smoothing=0.1)(
        cls, dist, torch.tensor(soft), teacher)
    assert parts["cls"].item() == pytest.approx(_ce(CLS, soft, eps=0.1), rel=1e-5)
    onehot = torch.nn.functional.one_hot(torch.tensor(LABELS), 3).float()
    a = DistillationLoss(distillation="soft")(cls, dist, onehot, teacher)
    b = DistillationLoss(distillation="soft")(*_inputs())
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)


def test_gradient_reaches_both_heads():
    cls, dist, labels, teacher = _inputs(requires_grad=True)
    DistillationLoss(distillation="soft", alpha=0.5)(cls, dist, labels, teacher)["loss"].backward()
    assert cls.grad.abs().sum() > 0 and dist.grad.abs().sum() > 0
    cls, dist, labels, teacher = _inputs(requires_grad=True)
    DistillationLoss(distillation="hard", alpha=0.0)(cls, dist, labels, teacher)["loss"].backward()
    assert dist.grad.abs().sum() == 0


def test_none_trains_both_heads_on_labels_and_ignores_teacher():
    cls, dist, labels, _ = _inputs(requires_grad=True)
    parts = DistillationLoss(distillation="none", alpha=0.9, label_smoothing=0.1)(
        cls, dist, labels, None)
    expected = (_ce(CLS, LABELS, 0.1) + _ce(DIST, LABELS, 0.1)) / 2
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert parts["cls"].item() == pytest.approx(_ce(CLS, LABELS, 0.1), rel=1e-5)
    assert parts["dist"].item() == 0.0
    parts["loss"].backward()
    assert dist.grad.abs().sum() > 0


def test_plain_tensor_output():
    cls_logits, dist_logits = split_outputs(torch.tensor(CLS))
    assert dist_logits is None
    none = DistillationLoss(distillation="none")(cls_logits, None, torch.tensor(LABELS), None)
    assert none["loss"].item() == pytest.approx(_ce(CLS, LABELS), rel=1e-5)
    # A single-head model distils through its only head (the paper's "usual distillation").
    soft = DistillationLoss(distillation="soft", alpha=0.5)(
        cls_logits, None, torch.tensor(LABELS), torch.tensor(TEACHER))
    assert soft["dist"].item() == pytest.approx(_soft_kl(CLS, TEACHER, 1.0), rel=1e-5)


def test_temper_equals_softmax_of_scaled_logits_and_keeps_zeros():
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    tempered = temper(torch.softmax(logits, -1), 3.0)
    torch.testing.assert_close(tempered, torch.softmax(logits / 3.0, -1))
    sparse = temper(torch.tensor([[0.9, 0.1, 0.0]]), 2.0)
    assert sparse[0, 2] == 0 and sparse.sum().item() == pytest.approx(1.0)
    parts = DistillationLoss(distillation="soft", tau=2.0)(
        torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([0]), torch.tensor([[0.9, 0.1, 0.0]]))
    assert torch.isfinite(parts["loss"])


def test_missing_teacher_is_a_clear_error():
    cls, dist, labels, _ = _inputs()
    with pytest.raises(ValueError, match="teacher"):
        DistillationLoss(distillation="hard")(cls, dist, labels, None)


@pytest.mark.parametrize("kwargs, option", [
    (dict(distillation="medium"), "--distillation"),
    (dict(distillation="soft", alpha=1.5), "--alpha"),
    (dict(distillation="soft", alpha=-0.1), "--alpha"),
    (dict(distillation="soft", tau=0.0), "--tau"),
    (dict(distillation="soft", label_smoothing=1.0), "--label-smoothing"),
])
def test_invalid_options(kwargs, option):
    with pytest.raises(ValueError, match=option):
        DistillationLoss(**kwargs)


def test_bf16_logits_give_float32_loss():
    cls, dist, labels, teacher = _inputs()
    parts = DistillationLoss(distillation="soft")(cls.bfloat16(), dist.bfloat16(), labels, teacher)
    assert all(v.dtype == torch.float32 for v in parts.values())
