"""SmoothQuant: smoothing factors, unchanged float output, lower W8A8 error than plain RTN on inputs with
outlier channels (dynamic per-token and static int8 activations; an MLP and a tiny Llama), static ranges taken
on the smoothed inputs, bit-exact save/load."""
import copy

import pytest
import torch
from helpers import mlp, outlier_inputs, outlier_llama, rel_err
from torch import nn

import modelpress as mp
from modelpress import QuantConfig, quantize_
from modelpress.algorithms import smoothquant as sq
from modelpress.quant.activation import parse_activation, uint8_params

W8A8 = [QuantConfig(weights="int8", activations="int8"), QuantConfig(weights="int8", activations="int8:static")]


def test_smooth_factors():
    act, w = torch.tensor([4.0, 1.0, 0.0, 9.0]), torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = sq.smooth_factors(act, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))  # dead channels (act or w zero) keep s = 1
    assert torch.allclose(sq.smooth_factors(act[:2], w[:2], 1.0), act[:2])
    assert (sq.smooth_factors(torch.tensor([1e-30]), torch.tensor([1e30]), 0.5) >= 1e-5).all()


def test_smoothing_keeps_the_float_output():
    x = outlier_inputs(8, 6)
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    alpha, s = sq.search_alpha(x, w, "int8", parse_activation("int8"))
    assert alpha is None or 0 < alpha < 1
    y = x @ w.T
    for v in (s, sq.smooth_factors(x.abs().amax(0), w.abs().amax(0), 0.5)):
        assert ((x / v) @ (w * v).T - y).norm() <= 1e-5 * y.norm()


@pytest.mark.parametrize("act", ["int8", "int8:static"])
def test_beats_plain_w8a8_on_outlier_channels(act):
    act = parse_activation(act)
    x, test = outlier_inputs(), outlier_inputs(seed=9)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)) * 0.1
    alpha, s = sq.search_alpha(x, w, "int8", act)
    assert alpha is not None and s.shape == (128,)
    plain = sq.layer_error(test, w, torch.ones(128), "int8", act, fit=x)
    assert sq.layer_error(test, w, s, "int8", act, fit=x) <= 0.3 * plain  # measured 0.15 / 0.13 (held-out tokens)


@pytest.mark.parametrize("cfg", W8A8, ids=["dynamic", "static"])
def test_mlp_beats_rtn_and_round_trips(cfg, tmp_path):
    f = mlp()
    calib, test = [outlier_inputs(32, 64, i) for i in range(4)], [outlier_inputs(32, 64, 100 + i) for i in range(2)]
    rtn = quantize_(copy.deepcopy(f), cfg, calib=calib)
    q = quantize_(copy.deepcopy(f), cfg, calib=calib, method="smoothquant")
    assert hasattr(q[0], "input_smooth")
    assert rel_err(q, f, test) <= 0.7 * rel_err(rtn, f, test)  # measured 0.34 dynamic, 0.21 static
    if cfg.activations == "int8:static":  # range of the smoothed inputs, not of the raw ones
        xs = torch.cat(calib) / q[0].input_smooth
        scale, zero = uint8_params(xs.amin(), xs.amax())
        assert torch.allclose(q[0].input_scale, scale) and q[0].input_zero == zero
    mp.save(q, tmp_path / "q")
    loaded = mp.load(tmp_path / "q", mlp())
    assert torch.equal(loaded[0].input_smooth, q[0].input_smooth)
    with torch.no_grad():
        assert all(torch.equal(loaded(x), q(x)) for x in test)


def test_fixed_alpha_and_config_checks():
    f = mlp()
    calib = [outlier_inputs(32, 64, i) for i in range(2)]
    q = quantize_(copy.deepcopy(f), W8A8[0], calib=calib, method=sq.Config(alpha=0.5))
    x = torch.cat(calib)
    expect = sq.smooth_factors(x.abs().amax(0), f[0].weight.abs().amax(0), 0.5)
    assert torch.allclose(q[0].input_smooth, expect)
    with pytest.raises(ValueError, match="alpha"):
        sq.Config(alpha=1.5)
    with pytest.raises(ValueError, match="smoothquant"):
        quantize_(f, W8A8[0], method="smoothquant")
    assert type(f[0]) is nn.Linear


def test_tiny_llama_beats_rtn_and_round_trips(tmp_path):
    from transformers import LlamaForCausalLM

    cfg, f, calib, test = outlier_llama()
    run = lambda m: (lambda ids: m(ids, use_cache=False).logits)
    qcfg = W8A8[1]
    q = quantize_(copy.deepcopy(f), qcfg, calib=calib, method="smoothquant")
    rtn = quantize_(copy.deepcopy(f), qcfg, calib=calib)
    assert rel_err(run(q), run(f), test) <= 0.7 * rel_err(run(rtn), run(f), test)  # measured 0.40
    mp.save(q, tmp_path / "q")
    loaded = mp.load(tmp_path / "q", LlamaForCausalLM(cfg).eval())
    smooth = {n: b for n, b in q.named_buffers() if n.endswith("input_smooth")}
    assert len(smooth) >= 4
    assert all(torch.equal(b, loaded.get_buffer(n)) for n, b in smooth.items())
    with torch.no_grad():
        assert torch.equal(run(loaded)(test[0]), run(q)(test[0]))
