"""Exact fusions: outputs equal to float rounding (relative error <= 1e-6), recorded and reloaded."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.recipe.structure import recorded
from modelpress.transforms.fuse import find_pairs, fuse_weights


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _init(m, seed=0):
    torch.manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    return m.eval()


@pytest.mark.parametrize("bias1,bias2", [(True, True), (False, True), (True, False), (False, False)])
def test_linear_chain_fuses_exactly(bias1, bias2):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 24, bias=bias1), nn.Linear(24, 12, bias=bias2), nn.Identity(),
                      nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(32, 16)
    ref = m(x)
    out = mp.fuse_(m, allow_growth=True)
    assert out["fused"] == [["0", "1"], ["0", "3"]]  # three Linears in a row become one
    assert isinstance(m[1], nn.Identity) and isinstance(m[3], nn.Identity) and isinstance(m[5], nn.Linear)
    assert m[0].bias is not None and m[0].weight.shape == (8, 16)
    assert rel(m(x), ref) <= 1e-6


def test_conv_then_pointwise_conv_fuses_exactly_and_non_exact_pairs_stay():
    m = _init(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8),
                            nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                            nn.Conv2d(6, 4, 1, stride=2)))  # strided pointwise: not a pure channel mix
    x = torch.randn(4, 3, 9, 9)
    ref = m(x)
    out = mp.fuse_(m)
    assert out == {"fold_bn": [["0", "1"]], "fused": [["0", "2"]]}
    assert m[0].out_channels == 6 and m[0].stride == (2, 2) and isinstance(m[2], nn.Identity)
    assert isinstance(m[5], nn.Conv2d) and m[5].stride == (2, 2)
    assert rel(m(x), ref) <= 1e-6


def test_bottlenecks_and_shared_outputs_are_not_fused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 4), nn.Linear(4, 64)  # a bottleneck: fusing would add parameters
            self.c, self.d = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            h = self.c(self.b(self.a(x)))
            return self.d(h) + h  # c's output also feeds the residual: c and d cannot merge

    m = Net().eval()
    assert find_pairs(m) == [("b", "c")]
    assert find_pairs(m, allow_growth=True) == [("a", "b")]  # each layer in one pair per round
    x = torch.randn(8, 64)
    ref = m(x)
    mp.fuse_(m)
    assert isinstance(m.c, nn.Identity) and m.b.weight.shape == (64, 4)
    assert rel(m(x), ref) <= 1e-6


def test_include_exclude_and_untraceable_models():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace, the Sequential neighbours are used
                return self.body(x)
            return self.body(-x)

    torch.manual_seed(0)
    m = Branchy().eval()
    x = torch.randn(4, 8).abs()
    ref = m(x)
    assert mp.fuse_(m, exclude=["body.0"])["fused"] == [["body.1", "body.2"]]
    assert isinstance(m.body[0], nn.Linear) and isinstance(m.body[2], nn.Identity)
    assert rel(m(x), ref) <= 1e-6


def test_low_rank_pairs_are_left_alone():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).eval()
    mp.factorize_(m, mp.FactorizeConfig(rank=2, include=["1"]))
    assert find_pairs(m, allow_growth=True) == []  # 0 -> 1.down would undo the factorization; down/up too
    assert mp.fuse_(m, allow_growth=True)["fused"] == []


def test_fuse_weights_math():
    w1, b1, w2, b2 = torch.randn(5, 3), torch.randn(5), torch.randn(2, 5), torch.randn(2)
    w, b = fuse_weights(w1, b1, w2, b2)
    x = torch.randn(7, 3)
    assert torch.allclose(x @ w.T + b, (x @ w1.T + b1) @ w2.T + b2, atol=1e-5)
    assert fuse_weights(w1, None, w2, None)[1] is None


def test_fused_and_quantized_model_reloads_bit_exactly_onto_a_fresh_float_model(tmp_path):
    def make():
        torch.manual_seed(0)
        return _init(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1),
                                   nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 16), nn.Linear(16, 16)))

    m, x = make(), torch.randn(2, 3, 5, 5)
    mp.fuse_(m)
    assert [r["kind"] for r in recorded(m)] == ["fold_bn", "fuse"]
    mp.quantize_(m, "int8")
    mp.save(m, tmp_path / "f")
    fresh = mp.load(tmp_path / "f", make())
    assert torch.equal(fresh(x), m(x))
    with pytest.raises(ValueError, match="no fusible pair"):
        mp.load(tmp_path / "f", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
