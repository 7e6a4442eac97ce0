"""BatchNorm folding: the pure fold, pairs found on the fx graph (and on nn.Sequential when tracing fails),
outputs unchanged, and the cases that must not be folded."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.algorithms.fold_bn import find_pairs, fold, fold_bn_, sequential_chains, trace


def randomize_bn_(model, seed=0):
    """Non-trivial running statistics and affine parameters (a fresh BN is the identity in eval)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


class ConvNet(nn.Module):
    """Conv-BN-ReLU x2 + Linear (conv1 without bias, conv2 with)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):  # [B, 3, H, W] -> [B, 5]
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def dw_net():
    """Depthwise-separable variant as nested Sequentials (like the digits zoo model)."""
    def cbr(cin, cout, k, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(cbr(3, 8, 3), cbr(8, 8, 3, groups=8), cbr(8, 16, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 5))


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it; the Sequential inside still folds."""

    def __init__(self):
        super().__init__()
        self.body = dw_net()

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        return self.body(x)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fold_matches_batchnorm_on_a_matrix():
    torch.manual_seed(0)
    lin, bn = nn.Linear(6, 8), randomize_bn_(nn.BatchNorm1d(8))
    w, b = fold(lin.weight, lin.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    x = torch.randn(32, 6)
    assert rel_err(F.linear(x, w, b), bn(lin(x))) < 1e-6
    # affine-free BN and a layer without bias
    w2, b2 = fold(lin.weight, None, bn.running_mean, bn.running_var, 1e-3)
    ref = (x @ lin.weight.T - bn.running_mean) / torch.sqrt(bn.running_var + 1e-3)
    assert rel_err(F.linear(x, w2, b2), ref) < 1e-6
    with pytest.raises(ValueError, match="do not match"):
        fold(lin.weight, None, torch.zeros(3), torch.ones(3), 1e-5)


@pytest.mark.parametrize("build, pairs", [
    (ConvNet, [("conv1", "bn1"), ("conv2", "bn2")]),
    (dw_net, [("0.0", "0.1"), ("1.0", "1.1"), ("2.0", "2.1")]),
    (Untraceable, [("body.0.0", "body.0.1"), ("body.1.0", "body.1.1"), ("body.2.0", "body.2.1")]),
])
def test_fold_bn_keeps_eval_output(build, pairs):
    torch.manual_seed(0)
    model = randomize_bn_(build())
    x = torch.randn(4, 3, 6, 6)
    ref = model(x)
    assert mp.fold_bn_(model) == pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for conv_name, bn_name in pairs:
        assert isinstance(model.get_submodule(bn_name), nn.Identity)
        assert model.get_submodule(conv_name).bias is not None  # created where absent
    assert rel_err(model(x), ref) <= 1e-5
    assert fold_bn_(model) == []  # nothing left to fold


def test_untraceable_model_falls_back_to_sequential():
    assert trace(Untraceable()) is None
    chains = sequential_chains(Untraceable())
    assert [n for n, _ in chains[0]][:4] == ["body.0.0", "body.0.1", "body.0.2", "body.1.0"]


@pytest.mark.parametrize("layer, bn, shape", [
    (nn.Linear(6, 8), nn.BatchNorm1d(8), (5, 6)),
    (nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), (5, 4, 7)),
])
def test_linear_and_conv1d(layer, bn, shape):
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(layer, bn, nn.ReLU()))
    x = torch.randn(*shape)
    ref = model(x)
    assert fold_bn_(model) == [("0", "1")]
    assert rel_err(model(x), ref) <= 1e-5


class NotFoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)  # conv output also used by the residual
        self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics
        self.c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # a ReLU in between

    def forward(self, x):
        y = self.a(x)
        y = self.bn_a(y) + y
        y = self.bn_b(self.b(y))
        return self.bn_c(F.relu(self.c(y)))


def test_pairs_that_must_not_fold():
    model = randomize_bn_(NotFoldable())
    assert find_pairs(model) == []
    shared = nn.Conv2d(4, 4, 1)  # one conv used twice: folding would change its other use
    seq = randomize_bn_(nn.Sequential(shared, nn.BatchNorm2d(4), shared))
    assert fold_bn_(seq) == []


def test_non_finite_weights_are_refused_and_nothing_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="folding '3' into '2' gives NaN or infinite weights"):
        fold_bn_(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[3], nn.BatchNorm2d)
