"""DeBut replacement: chain choice under a budget, fitting, the verb with fine-tuning, save/load, quantize after."""
import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.nn.butterfly import chain_params, dense, factor_shapes
from modelpress.transforms.butterfly import choose_chain, fit_chain


def test_choose_chain_fits_the_budget_with_the_most_parameters():
    chain = choose_chain(128, 128, 0.25)
    assert chain_params(chain, 128) == 4096  # exactly a quarter of 128 x 128
    assert choose_chain(16, 16, 0.5) == [(4, 4), (4, 4)]
    ch = choose_chain(96, 10, 0.3)  # deformable: sizes that are not powers of two
    assert chain_params(ch, 96) <= 0.3 * 960 and sorted(r for r, _ in ch if r > 1) in ([2, 5], [10])
    assert choose_chain(2, 2, 0.25) is None  # nothing that small mixes inputs


def test_fit_recovers_a_butterfly_matrix():
    g = torch.Generator().manual_seed(5)
    chain = [(2, 3), (5, 4)]
    w = dense([torch.randn(s, generator=g) for s in factor_shapes(chain, 12)], 12)
    factors, err = fit_chain(w, chain, steps=200)
    assert err < 1e-3
    assert torch.allclose(dense(factors, 12), w, atol=1e-2 * w.abs().max())


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(32, 16, generator=g) for _ in range(n)]
    teacher = nn.Linear(16, 3)
    torch.nn.init.normal_(teacher.weight, generator=g)
    return [(x, teacher(x).argmax(-1).detach()) for x in xs]


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


def test_butterfly_verb_replaces_fine_tunes_and_reloads(tmp_path):
    m, train = net(), _data()
    out = mp.butterfly_(m, mp.ButterflyConfig(ratio=0.3, include=["0", "2"], fit_steps=50, finetune_steps=30,
                                              finetune_on="labels", lr=1e-2), train=train)
    assert set(out["chains"]) == {"0", "2"} and isinstance(m[2], mp.ButterflyLinear)
    assert out["params_after"] <= 0.3 * out["params_before"]
    assert out["params_after"] == sum(f.numel() for n in ("0", "2") for f in m.get_submodule(n).factors)
    assert out["finetune"]["steps"] == 30 and out["finetune"]["last_loss"] < out["finetune"]["first_loss"]
    x = train[0][0]
    rows = {r.name: r for r in mp.inspect(m).rows}
    assert rows["2"].type == "ButterflyLinear" and rows["2"].format.startswith("butterfly")
    with pytest.warns(UserWarning, match="ButterflyLinear computes its own weight"):
        mp.quantize_(m, "int8")  # factors stay float: the warning says so; the plain Linear is quantized
    assert isinstance(m[4], mp.QuantLinear) and isinstance(m[0], mp.ButterflyLinear)
    y = m(x)
    mp.save(m, tmp_path / "b")
    fresh = mp.load(tmp_path / "b", net())
    assert torch.equal(fresh(x), y)
    plain = mp.dequantize(fresh)
    assert type(plain[0]) is nn.Linear and torch.allclose(plain(x), y, atol=2e-2)  # y: int8 kernel in bf16


def test_pointwise_convs_are_replaced_and_unlabelled_fine_tuning_matches_the_teacher():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    ref = copy.deepcopy(m)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    out = mp.butterfly_(m, mp.ButterflyConfig(ratio=0.5, fit_steps=100, finetune_steps=20, lr=3e-3), calib=calib)
    assert list(out["chains"]) == ["2"] and isinstance(m[2], mp.ButterflyConv2d)
    assert out["finetune"]["last_loss"] < out["finetune"]["first_loss"]
    x = calib[0]
    assert ((m(x) - ref(x)).norm() / ref(x).norm()) < 0.5


def test_bad_chains_and_failures_leave_the_model():
    m = net()
    with pytest.raises(ValueError, match="multiply to"):
        mp.butterfly_(m, mp.ButterflyConfig(chains={"0": [[4, 4], [4, 2]]}, include=["0"], finetune_steps=0))
    assert type(m[0]) is nn.Linear
    with pytest.raises(ValueError, match="list of \\[r, s\\]"):
        mp.ButterflyConfig(chains={"0": [4, 4]})
