"""Encoding with fixed parameters: reproduces round-to-nearest codes exactly for every format, and rounds other
tensors onto the same grid."""
import pytest
import torch

from modelpress.formats import codes_grid, dequantize_tensor, expected_nbytes, quantize_tensor
from modelpress.formats.fixed import encode_values, nvfp4_block_scales, quantize_with_params, round_to_grid

FORMATS = ["int8", "int8:tensor", "int4:g32", "int4:g32:asym", "int4:asym", "int3:g32", "int2:g16",
           "int2:g16:asym", "int5:g64", "int4:tensor:asym", "int1", "int1:g32", "ternary", "ternary:g32",
           "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "fp4_e2m1:g32", "mxfp4", "mxfp6",
           "mxfp6_e3m2", "mxfp8", "mxint8", "nvfp4"]


def weight(shape=(24, 100), seed=0):
    shape = torch.Size(shape)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape[0], shape[1:].numel(), generator=g) * torch.rand(shape[0], 1, generator=g) * 3
    w[0, :40] = 0  # an all-zero group
    w[1, 5] = 40.0  # an outlier
    return w.reshape(shape)


@pytest.mark.parametrize("spec", FORMATS)
def test_reproduces_rtn_codes(spec):
    for shape in [(24, 100), (8, 3, 3, 3)]:  # 100 columns: a padded last group; a conv weight
        w = weight(shape)
        like = quantize_tensor(w, spec)
        q = quantize_with_params(w, spec, like)
        assert torch.equal(q.codes, like.codes), spec
        assert torch.equal(q.scale, like.scale) and q.nbytes == like.nbytes == expected_nbytes(spec, shape)
        assert torch.equal(q.dequantize(), like.dequantize())
        assert torch.equal(round_to_grid(w, spec, like), like.dequantize())


@pytest.mark.parametrize("spec", ["int4:g32", "int3:g32:asym", "int8", "ternary:g16", "int1:g32", "fp4_e2m1",
                                  "fp8_e4m3:g32", "mxfp4", "mxint8", "nvfp4"])
def test_other_tensor_on_fixed_grid(spec):
    w = weight()
    like = quantize_tensor(w, spec)
    v = w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    q = quantize_with_params(v, spec, like)
    d = q.dequantize()
    assert torch.equal(q.scale, like.scale) and q.nbytes == like.nbytes
    assert torch.isfinite(d).all()
    # re-encoding grid values is a fixed point: the codes are those the values say
    assert torch.equal(quantize_with_params(d, spec, like).codes, q.codes)
    # encode_values on one column of every group (as GPTQ uses it) agrees with the QTensor
    rows, groups, g = codes_grid(like).shape
    pad = groups * g - v.shape[1]
    vg = torch.nn.functional.pad(v, (0, pad)).view(rows, groups, g)
    codes, vals = encode_values(vg[:, :, 3], like.fmt, like.scale, like.zero, like.global_scale)  # [rows, groups]
    assert torch.equal(codes, codes_grid(q)[:, :, 3])
    assert torch.equal(vals, torch.nn.functional.pad(d, (0, pad)).view(rows, groups, g)[:, :, 3])


def test_nearest_for_ints_and_saturation():
    w = torch.tensor([[0.0, 0.9, 2.2, -10.0, 100.0, -100.0]])
    like = quantize_tensor(torch.tensor([[1.0, -1.0, 2.0, -7.0, 0.5, 0.0]]), "int4", mse=False)  # scale 1 (flip aside)
    s = float(like.scale)
    d = round_to_grid(w, "int4", like)
    ref = torch.clamp(torch.round(w / s), -8, 7) * s
    assert torch.equal(d, ref)
    mx_like = quantize_tensor(torch.full((1, 32), 1.0), "mxfp4")  # shared exponent 2**-2: max 6 * 0.25
    d = round_to_grid(torch.full((1, 32), 50.0), "mxfp4", mx_like)
    assert torch.equal(d, torch.full((1, 32), 1.5))  # saturates at the fixed exponent's largest value


def test_nvfp4_block_scales_match():
    w = weight((16, 64))
    like = quantize_tensor(w, "nvfp4")
    assert torch.equal(nvfp4_block_scales(w.view(16, 4, 16), like.global_scale), like.scale)


def test_errors():
    w = weight()
    like = quantize_tensor(w, "int4:g32")
    with pytest.raises(ValueError, match="shape"):
        quantize_with_params(w[:, :64], "int4:g32", like)
    with pytest.raises(ValueError, match="scales"):
        quantize_with_params(w, "int4:g16", like)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_with_params(bad, "int4:g32", like)
    assert torch.equal(dequantize_tensor(quantize_with_params(w, "int4:g32", like)), like.dequantize())
