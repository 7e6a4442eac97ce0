"""Quantized models trace: torch.export and torch.compile(fullgraph=True) on every format x Linear / Conv1d /
Conv2d / Embedding / EmbeddingBag (no data-dependent shapes, no kernel data pointers), giving what the eager
reference path gives. Compile tests use the aot_eager backend: it proves the same (one graph, AOT-traced
forward) without minutes of C++ compilation."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.quant import set_kernels

FORMATS = ["int8", "int8:tensor", "int4:g32", "int4:g128:asym", "int3:g32", "int2:g16", "int1:g32", "ternary:g32",
           "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "mxfp8", "mxfp6", "mxfp4", "mxint8", "nvfp4"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 64)
        self.bag = nn.EmbeddingBag(40, 64, mode="mean", padding_idx=0)
        self.fc = nn.Linear(128, 48)  # the int8 / int4 CPU kernels apply eagerly
        self.conv1 = nn.Conv1d(3, 8, 3)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, groups=2)

    def forward(self, idx, seq, img):
        h = self.fc(torch.cat([self.emb(idx).mean(1), self.bag(idx)], 1))
        return torch.cat([h, self.conv1(seq).flatten(1), self.conv2(img).flatten(1)], 1)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (2, 6), generator=g), torch.randn(2, 3, 10, generator=g), torch.randn(2, 4, 5, 5, generator=g)


def quantized(fmt, act=None):
    torch.manual_seed(0)
    m = Net().eval()
    calib = [inputs(s) for s in range(2)] if act and "static" in act else None
    return mp.quantize_(m, mp.QuantConfig(weights=fmt, activations=act), calib=calib)


def reference(m, x):
    set_kernels(m, False)
    with torch.no_grad():
        y = m(*x)
    set_kernels(m, True)
    return y


class Zoo(nn.Module):
    """One Net per format (formats given by name patterns), traced in one export."""

    def __init__(self, formats):
        super().__init__()
        torch.manual_seed(0)
        self.nets = nn.ModuleList(Net() for _ in formats)

    def forward(self, idx, seq, img):
        return torch.stack([net(idx, seq, img) for net in self.nets])


def test_export_every_format():
    m = Zoo(FORMATS).eval()
    mp.quantize_(m, mp.QuantConfig(weights="int8", overrides={f"nets.{i}.*": f for i, f in enumerate(FORMATS)}))
    assert [str(net.fc.weight_format) for net in m.nets] == [str(mp.parse_format(f)) for f in FORMATS]
    ep = torch.export.export(m, inputs(0))
    x = inputs(1)  # other values, same shapes
    got, want = ep.module()(*x), reference(m, x)
    for f, a, b in zip(FORMATS, got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any(bad in o for o in ops for bad in ("unique", "nonzero", "_local_scalar_dense")), ops  # no data-dependent shapes


@pytest.mark.parametrize("fmt, act", [("int8", "int8"), ("int8", "int8:static"), ("int4:g32", "fp8_e4m3")])
def test_export_with_activation_quantization(fmt, act):
    m = quantized(fmt, act)
    ep = torch.export.export(m, inputs(0))
    assert torch.allclose(ep.module()(*inputs(1)), reference(m, inputs(1)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4:g32", "fp8_e4m3", "nvfp4"])
def test_compile_fullgraph(fmt):
    m = quantized(fmt)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(*inputs(1)), reference(m, inputs(1)), atol=1e-5, rtol=1e-5)


def test_export_refuses_out_of_range_ids():
    ep = torch.export.export(quantized("int4:g32"), inputs(0))
    idx, seq, img = inputs(1)
    idx[0, 0] = -1
    with pytest.raises(IndexError):
        ep.module()(idx, seq, img)


def test_export_attention_and_recurrent_layers():
    torch.manual_seed(0)
    m = nn.ModuleDict({"enc": nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), "lstm": nn.LSTM(32, 16)}).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m["lstm"](self.m["enc"](x))[0]

    w = mp.quantize_(Wrap().eval(), "int4:g32")
    x = torch.randn(2, 5, 32)
    ep = torch.export.export(w, (x,))
    with torch.no_grad():  # (the encoder layer runs its layers' forward: the reference path, as traced)
        assert torch.allclose(ep.module()(x), mp.set_kernels(w, False)(x), atol=1e-5)


@pytest.mark.parametrize("fmt", ["int4:g32", "fp8_e4m3", "mxfp6", "nvfp4"])
def test_forward_creates_no_tensor_on_another_device(fmt):
    """On the meta device any CPU-only constant in the forward would fail: the proxy for running on a GPU."""
    m = quantized(fmt).to("meta")
    assert m.fc.weight_codes.is_meta and m.fc.weight_scale.dtype == quantized(fmt).fc.weight_scale.dtype
    y = m(*[t.to("meta") for t in inputs(0)])
    assert y.is_meta and y.shape == (2, 48 + 64 + 200)
