"""The native decoder (kernels/decode.py, csrc/rows.cpp) gives exactly the reference decoding, and the
"native-decode" path exactly the reference path's output, for every integer layout it takes."""
import pytest
import torch
from torch import nn

from modelpress.quant import QuantConv2d, QuantLinear, kernels
from modelpress.quant.kernels import build, decode

pytestmark = pytest.mark.skipif(build.load() is None, reason="no native build on this machine")

FORMATS = ["int8", "int8:asym", "int8:g32", "int4", "int4:asym", "int4:g16", "int4:g32:asym", "int4:g128", "int2:g16", "int2:g8:asym",
           "fp8_e4m3", "fp8_e5m2:g32", "fp4_e2m1:g16", "mxfp8", "mxfp4", "mxint8", "nvfp4"]


@pytest.mark.parametrize("isa", ["", "scalar"], ids=["this-cpu", "scalar"])  # scalar: the loops ARM runs
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [9, 15, 64, 72, 200])  # 9, 15: rows that start inside a byte
def test_decoded_weight_is_the_reference_decoding(fmt, k, isa, monkeypatch):
    monkeypatch.setenv("MODELPRESS_ISA", isa)
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(k, 24), fmt)
    d = decode.decoder(layer)
    assert d is not None
    assert torch.equal(d.weight(), layer.dequantized_weight(torch.float32))
    idx = torch.tensor([23, 0, 5, 5])
    assert torch.equal(d.rows(idx), layer.dequantized_weight(torch.float32)[idx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt,act", [("int4:g16", None), ("int8:asym", "int8"), ("int2:g16", "fp8_e4m3"),
                                     ("int4:g32", "int8"), ("int8", "fp8_e5m2:static"), ("fp8_e4m3", "fp8_e4m3"),
                                     ("mxfp4", None), ("nvfp4", "int8")])
def test_linear_path_equals_reference_bit_for_bit(fmt, act, dtype):
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(96, 40), fmt, act)
    if act and act.endswith(":static"):
        layer.set_input_range(torch.tensor(0.01), torch.tensor(0.0))
    x = torch.randn(7, 96, dtype=dtype)
    assert torch.equal(kernels.run(layer, "native-decode", x), layer.reference(x))


@pytest.mark.parametrize("fmt,act", [("int8:asym", None), ("int4:g16", "int8"), ("int8", "fp8_e4m3"), ("mxfp8", None)])
@pytest.mark.parametrize("groups,cin", [(1, 1), (1, 6), (6, 6)], ids=["one-channel", "dense", "depthwise"])
def test_conv_path_equals_reference_bit_for_bit(fmt, act, groups, cin):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 12 if groups == 1 else 6, 3, padding=1, groups=groups)  # rows of 9 / 54 codes
    q = QuantConv2d.from_float(conv, fmt, act)
    x = torch.randn(3, cin, 9, 9)
    assert torch.equal(kernels.run_conv(q, "native-decode", x), q.reference(x))


def test_damaged_codes_are_left_to_the_reference_which_names_them():
    """A NaN code (never produced; a damaged buffer) makes the decoder decline, so the reference raises."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(32, 8), "fp8_e4m3")
    with torch.no_grad():
        layer.weight_codes[3] = 0x7F  # NaN in e4m3fn
    assert decode.decoder(layer) is None
    with pytest.raises(ValueError, match="finite range"):
        layer(torch.randn(2, 32))


def test_layouts_left_to_the_reference():
    torch.manual_seed(0)
    for fmt, k in (("int3:g16", 32), ("mxfp6", 32), ("int8:tensor", 32), ("fp8_e4m3:tensor", 32)):
        try:
            layer = QuantLinear.from_float(nn.Linear(k, 8), fmt)
        except ValueError:
            continue
        assert decode.decoder(layer) is None, fmt
