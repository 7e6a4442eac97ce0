import math
import time

import pytest
import torch
from torch import nn

from modelpress.train import fit, match_teacher_loss, supervised_loss, task_loss
from helpers import labelled_batches


def data(n=8):
    return labelled_batches(n, rows=16, dim=4)


def test_fit_lowers_the_loss_and_restores_mode():
    torch.manual_seed(0)
    m = nn.Linear(4, 3).eval()
    calls = []
    out = fit(m, data(), supervised_loss, steps=60, lr=0.05, progress=lambda s, d, t: calls.append((s, d, t)))
    assert out["steps"] == 60 and out["last_loss"] < 0.5 * out["first_loss"]
    assert not m.training and calls[-1] == ("train", 60, 60)


def test_failure_restores_the_parameters():
    m = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    n = 0

    def loss(model, batch):
        nonlocal n
        n += 1
        if n == 5:
            raise RuntimeError("boom")
        return supervised_loss(model, batch)

    with pytest.raises(RuntimeError, match="boom"):
        fit(m, data(), loss, steps=10, lr=0.1)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_deadline_stops_early_and_bad_inputs():
    m = nn.Linear(4, 3)
    out = fit(m, data(), supervised_loss, steps=1000, deadline=time.monotonic() - 1)
    assert out["stopped_early"] and out["steps"] == 0
    with pytest.raises(ValueError, match="batches are empty"):
        fit(m, [], supervised_loss, steps=1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        fit(m, data(), supervised_loss, steps=1, optimizer="lion")
    with pytest.raises(ValueError, match="do not fit"):
        task_loss(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(FloatingPointError, match="diverged"):
        fit(m, data(), lambda model, b: model(b[0]).sum() * float("nan"), steps=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="clip_grad must be > 0 and finite \\(or None\\), got -1.0"):
        fit(m, data(), supervised_loss, steps=2, clip_grad=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0 and finite, got -0.1"):
        fit(m, data(), supervised_loss, steps=2, weight_decay=-0.1)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_match_teacher_pulls_the_student_to_the_teacher():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    xs = [x for x, _ in data()]
    gap = lambda: float(sum((student(x) - teacher(x)).pow(2).mean().detach() for x in xs))  # noqa: E731
    before = gap()
    fit(student, xs, match_teacher_loss(teacher), steps=200, lr=0.05)
    assert gap() < 0.05 * before


def test_boolean_targets_use_binary_cross_entropy():
    out = torch.tensor([2.0, -1.0])
    y = torch.tensor([True, False])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out, y.float())
    assert torch.allclose(task_loss(out, y), expected)
    assert torch.allclose(task_loss(out.reshape(2, 1), y), expected)


def test_class_targets_along_the_last_dimension_or_channels_first():
    """Logits [..., C] with targets [...] (classifiers, token classification [N, L, C]); segmentation logits
    [N, C, H, W] with targets [N, H, W], torch's image convention, also when both readings fit (C == H == W)."""
    torch.manual_seed(0)
    ce = torch.nn.functional.cross_entropy
    tokens, y = torch.randn(2, 5, 5), torch.randint(0, 5, (2, 5))
    assert torch.allclose(task_loss(tokens, y), ce(tokens.reshape(-1, 5), y.reshape(-1)))  # [N, L, C] first
    seg, t = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    assert torch.allclose(task_loss(seg, t), ce(seg, t))
    square, t = torch.randn(2, 4, 4, 4), torch.randint(0, 4, (2, 4, 4))
    assert torch.allclose(task_loss(square, t), ce(square, t))
    line, t = torch.randn(2, 3, 7), torch.randint(0, 3, (2, 7))  # a 1-D signal's [N, C, L]
    assert torch.allclose(task_loss(line, t), ce(line, t))


def test_parameter_groups_keep_their_own_learning_rate_under_the_schedule():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = [p.detach().clone() for p in m.parameters()]
    seen = []
    groups = [*m[0].parameters(), {"params": list(m[2].parameters()), "lr": 0.0}]
    fit(m, data(), supervised_loss, steps=4, lr=0.01, params=groups, schedule="cosine",
        on_step=lambda s, l, opt: seen.append([g["lr"] for g in opt.param_groups]))
    after = list(m.parameters())
    assert not torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])  # lr 0: untouched
    assert seen[0] == [0.01, 0.0] and seen[1][0] < 0.01 and all(s[1] == 0.0 for s in seen)


def test_warmup_raises_the_rate_linearly_then_the_cosine_decays_over_the_rest():
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    seen = []
    fit(m, data(), supervised_loss, steps=10, lr=0.1, schedule="cosine", warmup=4,
        on_step=lambda s, l, opt: seen.append(opt.param_groups[0]["lr"]))
    assert seen[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert seen[4] == pytest.approx(0.1)  # the cosine starts at the full rate after the warm-up
    assert seen[5] == pytest.approx(0.05 * (1 + math.cos(math.pi / 6)))  # 1 of the 6 cosine steps done
    assert all(a > b for a, b in zip(seen[4:], seen[5:]))
    const = []
    fit(m, data(), supervised_loss, steps=5, lr=0.1, schedule="constant", warmup=2,
        on_step=lambda s, l, opt: const.append(opt.param_groups[0]["lr"]))
    assert const == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="warmup must be in"):
        fit(m, data(), supervised_loss, steps=5, warmup=5)
