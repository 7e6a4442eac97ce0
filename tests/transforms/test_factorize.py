"""Low-rank factorization: rank choices, the activation-aware variants, the verb, save/load, quantize after."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.transforms.factorize import choose_rank, low_rank


def correlated_inputs(n=512, k=32, seed=0):
    """Inputs with a few strong, correlated directions and uneven channel scales."""
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(123)) * torch.logspace(0, -2, k)[:, None]
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) @ mix
    x[:, :3] *= 10
    return x


def out_err(w, down, up, x):
    return ((x @ (w - up @ down).T).norm() / (x @ w.T).norm()).item()


def test_plain_svd_is_the_best_rank_r_weight_approximation():
    torch.manual_seed(0)
    w = torch.randn(12, 8, dtype=torch.float64)
    down, up, s = low_rank(w, 3)
    assert down.shape == (3, 8) and up.shape == (12, 3)
    assert torch.isclose((w - up @ down).norm(), s[3:].pow(2).sum().sqrt())


def test_rank_choices():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 0.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, 8, 6, energy=0.7) == 1 and choose_rank(s, 8, 6, energy=0.9) == 2
    assert choose_rank(s, 8, 6, energy=1.0) == 4
    assert choose_rank(s, 8, 6, rank=10) == 6  # capped at min(out, in)
    assert choose_rank(s, 100, 100, ratio=0.5) == 25  # 25 * (100 + 100) = half of 100 * 100
    assert choose_rank(s, 100, 100) == 25  # ratio 0.5 by default
    with pytest.raises(ValueError, match="at most one"):
        mp.FactorizeConfig(rank=2, ratio=0.5)
    with pytest.raises(ValueError, match="method"):
        mp.FactorizeConfig(method="tucker")


def test_activation_aware_beats_plain_svd_on_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(24, 32)
    x, held_out = correlated_inputs(seed=0), correlated_inputs(seed=1)
    gram = x.T @ x
    plain = out_err(w, *low_rank(w, 6)[:2], held_out)
    asvd = out_err(w, *low_rank(w, 6, gram, "asvd")[:2], held_out)
    white = out_err(w, *low_rank(w, 6, gram, "whiten", damp=1e-6)[:2], held_out)
    assert white < asvd < plain
    assert white < 0.5 * plain


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4)).eval()


def test_factorize_verb_data_aware_then_quantize_save_and_load(tmp_path):
    m = mlp()
    ref = mlp()
    calib = [correlated_inputs(64, 32, seed=i) for i in range(4)]
    x = correlated_inputs(64, 32, seed=9)
    out = mp.factorize_(m, mp.FactorizeConfig(ratio=0.5, method="whiten", exclude=["4"]), calib=calib)
    assert out["ranks"] == {"0": 10, "2": 13}  # floor(0.5 * 64 * 32 / 96), floor(0.5 * 48 * 64 / 112)
    assert out["params_after"] == 10 * 96 + 13 * 112 and out["params_before"] == 64 * 32 + 48 * 64
    assert isinstance(m[0], mp.LowRankLinear) and m[0].down.weight.shape == (10, 32)
    err = ((m(x) - ref(x)).norm() / ref(x).norm()).item()
    assert err < 0.5
    mp.quantize_(m, "int8")
    assert isinstance(m[0].down, mp.QuantLinear) and isinstance(m[0].up, mp.QuantLinear)
    y = m(x)
    mp.save(m, tmp_path / "lr")
    fresh = mp.load(tmp_path / "lr", mlp())
    assert isinstance(fresh[0], mp.LowRankLinear) and torch.equal(fresh(x), y)
    plain = mp.dequantize(fresh)
    assert type(plain[0]) is nn.Linear and plain[0].weight.shape == (64, 32)
    assert torch.allclose(plain(x), y, rtol=0.05, atol=0.05)
    assert set(plain.state_dict()) == set(ref.state_dict())  # loads into the original architecture


def test_factorize_convolutions_by_energy_and_rank_patterns():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=2),
                      nn.Conv1d(1, 1, 1)).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():  # make the first conv nearly rank 3
        w = m[0].weight.reshape(16, -1)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        m[0].weight.copy_((u[:, :3] * s[:3] @ vh[:3] + 1e-6 * torch.randn(16, 72)).reshape(16, 8, 3, 3))
    ref = m[0](x)
    with pytest.warns(UserWarning, match="2 .grouped convolution"):
        out = mp.factorize_(m, mp.FactorizeConfig(energy=0.999, include=["0", "2"]))
    assert out["ranks"] == {"0": 3} and "grouped" in out["skipped"]["2"]
    assert isinstance(m[0], mp.LowRankConv) and m[0].down.weight.shape == (3, 8, 3, 3)
    assert ((m[0](x) - ref).norm() / ref.norm()) < 1e-3
    m2 = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    assert mp.factorize_(m2, mp.FactorizeConfig(ranks={"1": 2}, rank=4))["ranks"] == {"0": 4, "1": 2}


def test_data_aware_methods_need_calibration_and_failures_leave_the_model():
    m = mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="needs calibration data"):
        mp.factorize_(m, mp.FactorizeConfig(method="asvd"))
    with pytest.raises(RuntimeError):
        mp.factorize_(m, mp.FactorizeConfig(method="whiten"), calib=[torch.randn(4, 7)])  # wrong input size
    assert all(type(layer) in (nn.Linear, nn.ReLU) for layer in m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    tiny = nn.Sequential(nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="rank 1 would not save parameters"):
        out = mp.factorize_(tiny, mp.FactorizeConfig(rank=1))
    assert out["ranks"] == {} and type(tiny[0]) is nn.Linear
