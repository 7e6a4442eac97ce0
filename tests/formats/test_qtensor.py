"""QTensor: byte accounting, bits per parameter, idempotence, row decoding, input checks, output fidelity."""
import math

import pytest
import torch

from modelpress.formats import (bits_per_param, dequantize_rows, dequantize_tensor, expected_nbytes, fake_quantize,
                                parse_format, quantize_tensor)
from modelpress.formats.qtensor import stored_problem

SPECS = ["int8", "int8:tensor", "int4:g32", "int4:g32:asym", "int3:g32", "int2:g16", "int1:g32", "ternary:g32",
         "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "mxfp8", "mxfp6", "mxfp4", "mxint8", "nvfp4"]
# [out, in] aligned; conv-like 4-D (27 columns: one padded group); 40 columns (not a multiple of 16 or 32)
SHAPES = [(64, 128), (8, 3, 3, 3), (16, 40)]
# round to nearest lands on the grid again: symmetric ints per channel / group, floats, MX floats.
# (Not int asym, int1 with padding, NVFP4 (global scale moves), or MXINT8: code -128 decodes to -2 * X,
# which is a power of two that raises the shared exponent of the re-quantized block.)
IDEMPOTENT = ["int8", "int8:tensor", "int4:g32", "int3:g32", "int2:g16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2",
              "fp6_e2m3", "fp4_e2m1", "mxfp8", "mxfp6", "mxfp4"]


def weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nbytes_and_shapes(spec, shape):
    w = weight(shape)
    q = quantize_tensor(w, spec)
    fmt = parse_format(spec)
    assert q.nbytes == expected_nbytes(spec, shape) == expected_nbytes(fmt, shape)
    assert q.codes.dtype == torch.uint8 and q.codes.dim() == 1
    assert (q.zero is not None) == (fmt.kind == "int" and not fmt.symmetric)
    assert (q.global_scale is not None) == (fmt.kind == "nvfp4")
    d = q.dequantize()
    assert d.shape == w.shape and d.dtype == torch.float32 and torch.isfinite(d).all()
    assert float((d - w).norm() / w.norm()) < 0.8  # even 1-2 bits keep the bulk of the signal
    assert torch.equal(dequantize_tensor(q, torch.bfloat16), d.to(torch.bfloat16))


@pytest.mark.parametrize("spec, shape, nbytes", [
    ("int4:g32", (8, 3, 3, 3), 8 * 27 // 2 + 8 * 2),  # 27 columns: one group of 27, no padding
    ("int4:g128", (1000, 16), 1000 * 16 // 2 + 1000 * 2),  # a row shorter than the group is one group
    ("int8", (8, 3, 3, 3), 216 + 8 * 4),
    ("mxfp4", (8, 3, 3, 3), 8 * 27 // 2 + 8),
    ("nvfp4", (8, 3, 3, 3), 8 * 32 // 2 + 8 * 2 + 4),  # 27 -> two blocks of 16
    ("int3:g32", (16, 40), 16 * 64 * 3 // 8 + 16 * 2 * 2),
    ("int4:g32:asym", (16, 40), 16 * 64 // 2 + 16 * 2 * 2 + 16 * 2),
    ("int8:tensor", (16, 40), 640 + 4),
    ("fp6_e3m2", (16, 40), 640 * 6 // 8 + 16 * 4),
    ("fp8_e4m3", (64, 128), 8192 + 64 * 4),
    ("int3", (5, 9), 6 * 3 + 5 * 4),  # 45 three-bit codes: ceil(45 / 8) = 6 chunks of 8 codes in 3 bytes
])
def test_expected_nbytes_by_hand(spec, shape, nbytes):
    assert expected_nbytes(spec, shape) == nbytes
    assert quantize_tensor(weight(shape), spec).nbytes == nbytes


@pytest.mark.parametrize("spec, bits", [
    ("int4:g32", 4.5), ("mxfp4", 4.25), ("nvfp4", 4.5 + 32 / 8192), ("mxfp8", 8.25), ("mxfp6", 6.25), ("mxint8", 8.25),
    ("int8", 8 + 32 / 128), ("int8:tensor", 8 + 32 / 8192), ("int4:g32:asym", 4.75), ("int3:g32", 3.5),
    ("int2:g16", 3.0), ("int1:g32", 1.5), ("ternary:g32", 2.5), ("fp8_e4m3", 8.25), ("fp4_e2m1:g32", 4.5),
])
def test_bits_per_param(spec, bits):
    assert bits_per_param(spec, (64, 128)) == pytest.approx(bits, abs=1e-12)
    assert 8 * quantize_tensor(weight((64, 128)), spec).nbytes / 8192 == pytest.approx(bits, abs=1e-12)


def test_bits_per_param_nvfp4_any_size():
    for shape in [(16, 64), (128, 256), (3, 32)]:
        assert bits_per_param("nvfp4", shape) == pytest.approx(4.5 + 32 / math.prod(shape))


@pytest.mark.parametrize("spec", IDEMPOTENT)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_is_idempotent(spec, shape):
    w = weight(shape, seed=1) * torch.logspace(-2, 2, shape[0]).view(-1, *[1] * (len(shape) - 1))
    d = quantize_tensor(w, spec).dequantize()
    assert torch.equal(quantize_tensor(d, spec).dequantize(), d)


@pytest.mark.parametrize("spec", SPECS + ["int3", "fp6_e2m3", "int5:g32", "int3:tensor", "int4:tensor", "int7:g16"])
@pytest.mark.parametrize("shape", SHAPES + [(10, 48)])
def test_dequantize_rows(spec, shape):
    q = quantize_tensor(weight(shape, seed=2), spec)
    rows = shape[0]
    full = q.dequantize().reshape(rows, -1)
    idx = torch.tensor([3, 0, 3, rows - 1, 1])
    assert torch.equal(dequantize_rows(q, idx), full[idx])
    assert torch.equal(dequantize_rows(q, idx.view(1, 5)), full[idx])
    assert torch.equal(dequantize_rows(q, torch.arange(rows)), full)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(bad):
    w = weight((8, 32))
    w[3, 7] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_tensor(w, "int8")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_input_raises(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        quantize_tensor(torch.ones(4, 32, dtype=dtype), "int4:g32")


def test_empty_and_bad_spec():
    with pytest.raises(ValueError, match="empty"):
        quantize_tensor(torch.zeros(0, 32), "int8")
    with pytest.raises(ValueError, match="int9"):
        quantize_tensor(weight((4, 32)), "int9")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_dtypes(dtype):
    w = weight((16, 64)).to(dtype)
    out = fake_quantize(w, "int4:g32")
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, fake_quantize(w.float(), "int4:g32").to(dtype))


@pytest.mark.parametrize("spec", ["int5:g32", "int7", "int6:g32"])
def test_odd_bit_widths_round_trip(spec):  # 5- and 7-bit codes span 40 and 56 bits per packing chunk
    w = weight((16, 96), seed=3)
    q = quantize_tensor(w, spec)
    err = (q.dequantize() - w).abs()
    step = q.scale.float().abs()
    step = step.view(-1, 1) if q.fmt.granularity != "group" else step.repeat_interleave(q.fmt.group_size, 1)
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-12).all())


# ---- output fidelity on a random two-layer MLP: x [512, 128] -> 256 -> relu -> 64

SQNR_TARGETS = {"int8": 38.0, "int4:g32": 18.0, "fp8_e4m3": 25.0, "nvfp4": 14.0, "mxfp4": 12.0, "int2:g16": 4.0}


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    x = torch.randn(512, 128)
    w1 = torch.randn(256, 128) / math.sqrt(128)
    w2 = torch.randn(64, 256) / math.sqrt(256)
    return x, w1, w2


def sqnr_db(mlp, spec):
    x, w1, w2 = mlp
    y = torch.relu(x @ w1.T) @ w2.T
    yq = torch.relu(x @ fake_quantize(w1, spec).T) @ fake_quantize(w2, spec).T
    return 10 * math.log10(float(y.pow(2).sum() / (y - yq).pow(2).sum()))


@pytest.mark.parametrize("spec", list(SQNR_TARGETS))
def test_output_sqnr(mlp, spec):
    assert sqnr_db(mlp, spec) >= SQNR_TARGETS[spec]


@pytest.mark.parametrize("spec", SPECS)
def test_a_fresh_quantization_has_no_stored_problem(spec):
    """(load refuses what stored_problem names: nothing any quantization writes)"""
    w = weight((16, 64))
    w[0, :32] = 0  # an all-zero group
    assert stored_problem(quantize_tensor(w, spec)) is None
    codes = quantize_tensor(w, "fp8_e4m3").codes.clone()
    codes[3] = 0x7F  # NaN
    q = quantize_tensor(w, "fp8_e4m3")
    assert "finite range" in stored_problem(type(q)(q.fmt, q.shape, codes, q.scale))
