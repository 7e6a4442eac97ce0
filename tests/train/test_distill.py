import math

import pytest
import torch
from torch import nn

from modelpress.train import DistillConfig, Distiller, attention_kd, distill_loss, feature_kd, fit


def test_logit_kd_matches_the_hand_computed_value():
    s, t, T = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]]), 2.0
    ps = [math.exp(v / T) for v in (1.0, 0.0, -1.0)]
    pt = [math.exp(v / T) for v in (0.0, 2.0, 0.0)]
    ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt))
    assert distill_loss(s, t, T, "kl").item() == pytest.approx(T * T * kl, rel=1e-6)
    assert distill_loss(t, t, T).item() == pytest.approx(0, abs=1e-7)


def test_binary_kd_matches_the_hand_computed_value():
    s, t = torch.tensor([0.5, -1.0]), torch.tensor([2.0, -1.0])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    kl = [sig(b) * math.log(sig(b) / sig(a)) + (1 - sig(b)) * math.log((1 - sig(b)) / (1 - sig(a)))
          for a, b in zip((0.5, -1.0), (2.0, -1.0))]
    assert distill_loss(s, t).item() == pytest.approx(sum(kl) / 2, rel=1e-6)  # auto: one logit per row
    assert distill_loss(s.reshape(2, 1), t.reshape(2, 1), kind="binary").item() == pytest.approx(sum(kl) / 2, rel=1e-6)


def test_embedding_losses_and_shape_checks():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert distill_loss(a, b, kind="cosine").item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2, rel=1e-6)
    assert distill_loss(a, b, kind="mse").item() == pytest.approx((0 + 1 + 0 + 1) / 4)
    with pytest.raises(ValueError, match="differ in shape"):
        distill_loss(a, b[:1])
    with pytest.raises(ValueError, match="unknown distillation loss"):
        distill_loss(a, b, kind="l7")


def test_attention_and_feature_kd_hand_values():
    t = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])  # [B, H, T, T]
    s = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]])
    kl = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 1.0 * math.log(1.0 / 0.5)) / 2
    assert attention_kd([s], [t]).item() == pytest.approx(kl, rel=1e-6)
    proj = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1]]))
    fs, ft = torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[1.0], [2.0], [4.0]]])  # conv-like [N, C, L]
    assert feature_kd(fs, ft, proj, channel_dim=1).item() == pytest.approx(1.0 / 3)


def _pair(width=16):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    student = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))
    return teacher.eval(), student


def test_distiller_runs_the_teacher_and_projects_features():
    teacher, student = _pair()
    cfg = DistillConfig(task=0.0, output=1.0, temperature=2.0, feature=1.0, layers={"1": "1"})
    x = torch.randn(64, 8)
    with Distiller(teacher, student, cfg, example=x[:2]) as d:
        assert list(d.projections) == ["1"] and d.projections["1"].in_features == 16
        loss = d.loss(student, x)
        expected = distill_loss(student(x), teacher(x), 2.0) + feature_kd(
            torch.relu(student[0](x)), torch.relu(teacher[0](x)), d.projections["1"])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        before = d.loss(student, x).item()
        params = list(student.parameters()) + list(d.parameters())
        fit(student, [x], d.loss, steps=100, lr=0.01, params=params)
        assert d.loss(student, x).item() < 0.5 * before
    assert not student._forward_pre_hooks and not student[1]._forward_hooks  # hooks removed


def test_cnn_block_features_are_projected_along_channels():
    """A feature taken from a CNN block (conv + BatchNorm, output [N, C, H, W]) of a narrower student: the widths
    come from the blocks' last layers without an example, and the projection maps the student's channels."""
    def cnn(width):
        block = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        return nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))

    torch.manual_seed(0)
    teacher, student = cnn(16).eval(), cnn(8).eval()
    x = torch.randn(5, 3, 6, 6)
    with Distiller(teacher, student, DistillConfig(task=0.0, output=0.0, feature=1.0, layers={"0": "0"})) as d:
        p = d.projections["0"]
        assert (p.in_features, p.out_features) == (8, 16)
        loss = d.loss(student, x)
        s, t = student[0](x), teacher[0](x)
        expected = nn.functional.mse_loss(p(s.movedim(1, -1)).movedim(-1, 1), t)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_patch_embedding_feature_is_channels_last():
    """A module holding a convolution whose output is [N, L, C] (a ViT patch embedding): the width is C, and a
    custom block without declared width needs example= (it names the layers)."""
    class Embed(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.proj = nn.Conv2d(3, width, 4, stride=4)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)  # [N, 16 patches, width]

    teacher, student = nn.Sequential(Embed(32)), nn.Sequential(Embed(16))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="cannot tell the output widths of '0' / '0': pass example="):
        Distiller(teacher, student, DistillConfig(task=0.0, output=0.0, feature=1.0, layers={"0": "0"}))
    with Distiller(teacher, student, DistillConfig(task=0.0, output=0.0, feature=1.0, layers={"0": "0"}),
                   example=x) as d:
        p = d.projections["0"]
        assert (p.in_features, p.out_features) == (16, 32)
        assert d.loss(student, x).item() == pytest.approx(
            nn.functional.mse_loss(p(student[0](x)), teacher[0](x)).item(), rel=1e-5)


def test_a_1d_convolution_block_feature_is_channels_first():
    """[N, C, L] from a block of Conv1d + BatchNorm1d (a TCN, an audio front end): the channels are dim 1."""
    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(4, width, 3, padding=1), nn.BatchNorm1d(width)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    teacher, student = nn.Sequential(Block(16)).eval(), nn.Sequential(Block(8)).eval()
    x = torch.randn(2, 4, 50)
    with Distiller(teacher, student, DistillConfig(task=0.0, output=0.0, feature=1.0, layers={"0": "0"}),
                   example=x) as d:
        p = d.projections["0"]
        assert (p.in_features, p.out_features) == (8, 16)
        expected = nn.functional.mse_loss(p(student[0](x).movedim(1, -1)).movedim(-1, 1), teacher[0](x))
        assert d.loss(student, x).item() == pytest.approx(expected.item(), rel=1e-5)


def test_distiller_task_term_on_labelled_batches_and_errors():
    teacher, student = _pair()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    d = Distiller(teacher, student, DistillConfig(task=0.5, output=1.0))
    loss = d.loss(student, (x, y))
    expected = distill_loss(student(x), teacher(x)) + 0.5 * nn.functional.cross_entropy(student(x), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    d.close()
    with pytest.raises(ValueError, match="needs `layers`"):
        DistillConfig(feature=1.0)
    with pytest.raises(ValueError, match="has no layer"):
        Distiller(teacher, student, DistillConfig(feature=1.0, layers={"9": "1"}))


def test_attention_distillation_on_a_tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50)
    torch.manual_seed(0)
    teacher, student = BertModel(cfg).eval(), BertModel(cfg).eval()  # eval: no attention dropout
    ids = torch.randint(0, 50, (2, 7))
    d = Distiller(teacher, student, DistillConfig(task=0, attention=1.0))
    assert student.config._attn_implementation == "eager"
    out = student(input_ids=ids)
    loss = d.kd_loss(out)
    ref_s = student(input_ids=ids, output_attentions=True).attentions
    ref_t = teacher(input_ids=ids, output_attentions=True).attentions
    assert loss.item() == pytest.approx(attention_kd(list(ref_s), list(ref_t)).item(), rel=1e-5) and loss > 0
    d.close()
    assert student.config._attn_implementation == "sdpa"
