"""QuantLinear against a float Linear, its stored bytes, and save/load of its buffers."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.formats import expected_nbytes, packed_nbytes, parse_format
from modelpress.quant import QuantLinear, set_kernels
from modelpress.quant.activation import uint8_params

# Output cosine vs the float layer on random layers and inputs (measured: int8 0.99999, int8+int8 act
# 0.99997, int4:g32 0.9981-0.9983).
COS_INT8 = 0.999
COS_INT4_G32 = 0.99


def cosine(a, b):
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fmt,act,bound", [
    ("int8", None, COS_INT8),
    ("int8", "int8", COS_INT8),
    ("int8", "int8:static", COS_INT8),
    ("int4:g32", None, COS_INT4_G32),
    ("int4:g32:asym", None, COS_INT4_G32),
])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "reference"])
def test_close_to_float(fmt, act, bound, seed, kernels):
    torch.manual_seed(seed)
    lin = nn.Linear(256, 128)
    x = torch.randn(16, 256)
    q = QuantLinear.from_float(lin, fmt, act)
    if act == "int8:static":
        q.set_input_range(*uint8_params(x.min(), x.max()))
    set_kernels(q, kernels)
    with torch.no_grad():
        assert cosine(q(x), lin(x)) >= bound


@pytest.mark.parametrize("fmt", ["int8", "int4:g32", "int4:g32:asym", "int4", "int3:g32", "int2:g64", "nvfp4",
                                 "mxfp4", "fp8_e4m3", "int1", "ternary"])
def test_state_dict_holds_packed_codes(fmt):
    q = QuantLinear.from_float(nn.Linear(64, 16), fmt)  # 1024 weights
    sd = q.state_dict()
    assert "weight" not in sd
    codes = sd["weight_codes"]
    assert codes.dtype == torch.uint8 and codes.dim() == 1
    assert codes.nbytes == packed_nbytes(1024, parse_format(fmt).bits)
    weight_bytes = sum(t.nbytes for k, t in sd.items() if k.startswith("weight_"))
    assert weight_bytes == expected_nbytes(fmt, (16, 64)) == q.qweight.nbytes


def test_int4_takes_half_a_byte_per_weight():
    sd = QuantLinear.from_float(nn.Linear(64, 16), "int4:g32").state_dict()
    assert sd["weight_codes"].nbytes == 512
    assert sd["weight_scale"].shape == (16, 2) and sd["weight_scale"].dtype == torch.bfloat16
    assert sd["bias"].dtype == torch.float32 and sd["bias"].shape == (16,)


def test_static_activation_buffers():
    q = QuantLinear.from_float(nn.Linear(32, 8), "int8", "int8:static")
    assert {"input_scale", "input_zero"} <= set(q.state_dict())
    assert "input_scale" not in QuantLinear.from_float(nn.Linear(32, 8), "int8", "int8").state_dict()


@pytest.mark.parametrize("fmt,act", [("int4:g32", None), ("int8", "int8:static"), ("nvfp4", None)])
def test_empty_like_then_load_gives_identical_outputs(fmt, act):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    src = QuantLinear.from_float(lin, fmt, act)
    if act:
        src.set_input_range(torch.tensor(0.02), torch.tensor(120.0))
    dst = QuantLinear.empty_like(lin, fmt, act)
    x = torch.randn(5, 64)
    dst(x)  # a kernel layout built from the empty buffers must not survive the load
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(x), src(x))


def test_no_bias_and_shape_mismatch():
    q = QuantLinear.from_float(nn.Linear(32, 16, bias=False), "int8")
    assert q.bias is None and "bias" not in q.state_dict()
    other = QuantLinear.from_float(nn.Linear(16, 16), "int8").qweight
    with pytest.raises(ValueError, match="does not match"):
        QuantLinear(32, 16, other)


def test_repr_names_formats():
    q = QuantLinear.from_float(nn.Linear(32, 16), "int4:g32:asym", "int8:static")
    assert "weights=int4:g32:asym" in repr(q) and "activations=int8:static" in repr(q)


@pytest.mark.parametrize("act", [None, "int8"])
@pytest.mark.parametrize("fmt", ["int8", "int4:g32", "nvfp4"])
def test_wrong_input_width_is_named_on_every_path(fmt, act):
    """Kernels on or off, whatever the rows: the error names the input's width and the layer's (a 3-D input whose
    size happens to divide by in_features must not be reshaped into other rows)."""
    m = nn.Sequential(nn.Linear(64, 16))
    mp.quantize_(m, mp.QuantConfig(weights=fmt, activations=act), calib=[torch.randn(4, 64)])
    for kernels_on in (True, False):
        set_kernels(m, kernels_on)
        for x in (torch.randn(1, 60), torch.randn(5, 60), torch.randn(2, 32, 60)):
            with pytest.raises(RuntimeError, match=re.escape(f"{tuple(x.shape)} has 60 features, the layer takes 64")):
                m(x)


def test_integer_inputs_are_refused_as_the_float_layer_does():
    """An int64 input gave int64 zeros (the weight decoded to the input's dtype); the float layers raise."""
    for layer, x in ((nn.Linear(4, 3), torch.ones(2, 4, dtype=torch.long)),
                     (nn.Conv2d(3, 4, 3), torch.ones(1, 3, 5, 5, dtype=torch.int32))):
        m = nn.Sequential(layer)
        with pytest.raises(RuntimeError):
            m(x)
        for spec in ("int8", "int4:g32" if isinstance(layer, nn.Linear) else "int4", "fp8_e4m3"):
            q = mp.quantize_(nn.Sequential(layer), spec)
            with pytest.raises(RuntimeError, match="input of dtype torch.int"):
                q(x)
