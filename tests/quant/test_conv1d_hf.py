"""transformers' Conv1D (GPT-2): quantized as the Linear it is, still answering weight [in, out] and nf/nx, through
every method (the algorithms see a Linear view sharing its storage), saved, reloaded and dequantized."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.formats import dequantize_tensor
from modelpress.quant import QuantHFConv1D, set_kernels

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(128, 64)  # nf = 128 outputs, nx = 64 inputs
        self.c_proj = Conv1D(64, 128)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


def make(seed=0):
    torch.manual_seed(seed)
    b = Block().eval()
    with torch.no_grad():
        for m in (b.c_fc, b.c_proj):
            m.bias.normal_()
    return b


X = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["int8", "int4:g32", "mxfp4"])
def test_conv1d_is_a_transposed_linear(fmt):
    f = make()
    q = QuantHFConv1D.from_float(f.c_fc, fmt)
    assert q.weight.shape == f.c_fc.weight.shape == (64, 128) and q.nf == 128 and q.nx == 64
    assert q.weight_shape == (128, 64)  # codes on the [out, in] matrix: groups run along the inputs
    assert torch.equal(q.weight, dequantize_tensor(q.qweight).t())
    set_kernels(q, False)
    with torch.no_grad():
        assert torch.allclose(q(X), torch.addmm(f.c_fc.bias, X.reshape(-1, 64), q.weight).reshape(4, 6, 128), atol=1e-5)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_every_method_quantizes_conv1d(method, tmp_path):
    f = make()
    q = copy.deepcopy(f)
    before = {n: (m, m.weight.clone(), m.bias.clone()) for n, m in q.named_children()}
    calib = [torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    mp.quantize_(q, mp.QuantConfig(weights="int4:g32"), calib=calib, method=method)
    assert type(q.c_fc) is QuantHFConv1D and type(q.c_proj) is QuantHFConv1D
    for m, w, b in before.values():  # the float layers (whose storage the Linear views shared) are untouched
        assert torch.equal(m.weight, w) and torch.equal(m.bias, b)
    with torch.no_grad():
        y = q(X)
        assert F.cosine_similarity(y.flatten(), f(X).flatten(), dim=0) > 0.99
    mp.save(q, tmp_path / "q")
    loaded = mp.load(tmp_path / "q", make(seed=4))
    with torch.no_grad():
        assert torch.equal(loaded(X), y)
    d = mp.dequantize(loaded)
    assert type(d.c_fc) is Conv1D and d.c_fc.weight.shape == (64, 128) and d.c_fc.nf == 128


def test_failed_quantize_puts_conv1d_back():
    f = make()
    fc, proj = f.c_fc, f.c_proj
    with pytest.raises(ValueError, match="calibration"):
        mp.quantize_(f, "int4:g32", method="gptq")  # no calib
    assert f.c_fc is fc and f.c_proj is proj
