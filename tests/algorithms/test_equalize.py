"""Cross-layer equalization: the scale rule, ranges of grouped/depthwise convs, pairs found (and refused),
float outputs unchanged, equal ranges after CLE, and lower per-tensor quantization error."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.algorithms import equalize as eq
from modelpress.recipe import EqualizeStep, Recipe


def conv_bn_relu_net():
    """Conv-BN-ReLU x2 + Linear, BatchNorms already folded away."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    mp.fold_bn_(m)
    return m


class DWNet(nn.Module):
    """stem -> depthwise -> pointwise -> max pool -> conv, with functional ReLUs (fx graph)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.last = nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.pw(F.relu(self.dw(F.relu(self.stem(x))))))
        x = self.last(F.max_pool2d(x, 2)).relu()
        return self.fc(x.mean(dim=(2, 3)))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_scales_balance_ranges():
    g = torch.Generator().manual_seed(0)
    r1, r2 = torch.rand(8, generator=g) * 10, torch.rand(8, generator=g)
    s = eq.equalization_scales(r1, r2)
    torch.testing.assert_close((r1 / s).float(), (r2 * s).float())
    torch.testing.assert_close((r1 / s).float(), torch.sqrt(r1 * r2))
    s0 = eq.equalization_scales(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert s0.tolist() == [1.0, 1.0]  # dead channels are left alone


@pytest.mark.parametrize("cin, cout, groups", [(8, 12, 1), (8, 12, 4), (8, 8, 8), (8, 16, 8)])
def test_in_ranges_and_scale_in_follow_the_grouping(cin, cout, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, groups=groups)
    w, per_in, per_out = conv.weight.detach(), cin // groups, cout // groups
    expected = torch.stack([w[(c // per_in) * per_out:(c // per_in + 1) * per_out, c % per_in].abs().max()
                            for c in range(cin)])
    torch.testing.assert_close(eq.in_ranges(w, groups), expected)
    s = torch.rand(cin) + 0.5
    x = torch.randn(2, cin, 5, 5)
    scaled = F.conv2d(x, eq.scale_in(w, s, groups), groups=groups)
    torch.testing.assert_close(scaled, F.conv2d(x * s.view(1, -1, 1, 1), w, groups=groups), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build, pairs", [
    (conv_bn_relu_net, [("0", "3")]),
    (DWNet, [("stem", "dw"), ("dw", "pw"), ("pw", "last")]),
])
def test_equalize_keeps_float_output_and_balances_ranges(build, pairs):
    model = build().eval()
    x = torch.randn(4, 3, 8, 8)
    ref = model(x)
    assert mp.equalize_(model, iterations=200) == pairs
    assert rel_err(model(x), ref) <= 1e-5
    for a, b in pairs:
        first, second = model.get_submodule(a), model.get_submodule(b)
        r1, r2 = eq.out_ranges(first.weight), eq.in_ranges(second.weight, second.groups)
        assert ((r1 - r2).abs() / r1.max()).max() < 1e-4


def test_one_pair_step_gives_equal_ranges():
    model = conv_bn_relu_net()
    first, second = model[0], model[3]
    r1, r2 = eq.out_ranges(first.weight), eq.in_ranges(second.weight)
    s = eq.equalize_pair_(first, second)
    torch.testing.assert_close(eq.out_ranges(first.weight).double(), r1.double() / s, rtol=1e-5, atol=0)
    torch.testing.assert_close(eq.in_ranges(second.weight).double(), r2.double() * s, rtol=1e-5, atol=0)
    torch.testing.assert_close(r1.double() / s, r2.double() * s, rtol=1e-4, atol=0)


class Refused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))
        self.e = nn.Linear(8, 8)

    def forward(self, x):
        x = self.b(F.relu6(self.a(x)))  # ReLU6 is not positive-homogeneous
        x = self.c(F.gelu(x))  # neither is GELU
        y = self.d(x)
        return self.e(F.relu(y)) + y  # d's output is used twice


def test_non_homogeneous_or_shared_outputs_are_skipped():
    assert eq.find_pairs(Refused()) == [("c", "d")]  # only the plain consecutive pair
    lin = nn.Sequential(nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 8), nn.LeakyReLU(0.1), nn.Linear(8, 4))
    assert eq.find_pairs(lin) == [("2", "4")]
    # pooling between Linear layers would mix features: not a pair
    assert eq.find_pairs(nn.Sequential(nn.Linear(8, 8), nn.MaxPool1d(2), nn.Linear(4, 4))) == []


def badly_scaled_net():
    """conv1's output channels spread over four decades (compensated in conv2: same float function)."""
    model = conv_bn_relu_net()
    c = 10 ** torch.linspace(-2, 2, 8)
    with torch.no_grad():
        model[0].weight.mul_(c.view(-1, 1, 1, 1))
        model[0].bias.mul_(c)
        model[3].weight.div_(c.view(1, -1, 1, 1))
    return model


@pytest.mark.parametrize("spec", ["int8:tensor", "int4:tensor"])
def test_equalization_reduces_per_tensor_quantization_error(spec):
    model = badly_scaled_net()
    x = torch.randn(16, 3, 8, 8)
    ref = model(x)

    def err(m):
        q = mp.quantize_(copy.deepcopy(m), spec)
        return (q(x) - ref).pow(2).mean().item()

    before = err(model)
    mp.equalize_(model)
    assert rel_err(model(x), ref) <= 1e-5
    after = err(model)
    assert after < 0.1 * before, (before, after)


def test_untraceable_model_uses_sequential_pairs():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = conv_bn_relu_net()

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -self.body(x)

    model = Untraceable()
    assert eq.find_pairs(model) == [("body.0", "body.3")]


def test_recipe_step():
    step = EqualizeStep.from_options({"iterations": 5})
    assert step.to_dict() == {"equalize": {"iterations": 5}}
    assert EqualizeStep.from_options({}).iterations == 20
    with pytest.raises(ValueError, match="unknown option"):
        EqualizeStep.from_options({"iters": 5})
    with pytest.raises(ValueError, match="positive integer"):
        EqualizeStep(0)
    r = Recipe.from_dict({"steps": [{"fold_bn": {}}, {"equalize": {"iterations": 3}}]})
    assert Recipe.from_dict(r.to_dict()) == r
