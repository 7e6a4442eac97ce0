"""Microscaling: the OCP MX v1.0 shared-exponent rule, saturation, exact blocks; NVFP4 two-level scales."""
import math

import pytest
import torch

from modelpress.formats import codes_grid, decode_float, magnitudes, max_value, quantize_tensor
from modelpress.formats.mx import mx_dequantize, mx_quantize

# MX format -> (element, emax_elem) per OCP MX v1.0 tables
MX = {"mxfp4": ("fp4_e2m1", 2), "mxfp6": ("fp6_e2m3", 2), "mxfp6_e3m2": ("fp6_e3m2", 4), "mxfp8": ("fp8_e4m3", 8),
      "mxfp8_e5m2": ("fp8_e5m2", 15), "mxint8": ("int8", 0)}


def element_values(element):
    """All non-negative values of an element (before the shared scale)."""
    if element == "int8":
        return torch.arange(128) / 64.0
    return magnitudes(element)


def element_max(element):
    return 127 / 64 if element == "int8" else max_value(element)


@pytest.mark.parametrize("fmt", list(MX))
def test_shared_exponent_rule(fmt):
    element, e_elem = MX[fmt]
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 3, 32, generator=gen) * torch.exp2(torch.randint(-30, 30, (40, 3, 1), generator=gen).float())
    codes, exp = mx_quantize(w, element)
    assert codes.dtype == exp.dtype == torch.uint8 and exp.shape == (40, 3, 1)
    amax = w.abs().amax(-1).flatten().tolist()
    expected = [math.frexp(a)[1] - 1 - e_elem + 127 for a in amax]  # floor(log2(amax)) - emax_elem, biased
    assert exp.flatten().tolist() == expected
    # and through QTensor: one uint8 exponent per row and block of 32
    q = quantize_tensor(w.reshape(40, 96), fmt)
    assert q.scale.dtype == torch.uint8 and torch.equal(q.scale, exp.squeeze(-1))


@pytest.mark.parametrize("fmt", list(MX))
def test_exponent_at_powers_of_two(fmt):
    element, e_elem = MX[fmt]
    for k in (-20, -1, 0, 1, 7, 40):
        for a in (2.0**k, 2.0**k * 1.999):  # amax exactly a power of two, and just below the next one
            w = torch.zeros(1, 1, 32)
            w[0, 0, 5] = -a
            _, exp = mx_quantize(w, element)
            assert int(exp) == k - e_elem + 127


@pytest.mark.parametrize("fmt", list(MX))
def test_zero_block(fmt):
    element, _ = MX[fmt]
    w = torch.zeros(2, 2, 32)
    w[1, 1] = torch.randn(32)
    codes, exp = mx_quantize(w, element)
    assert bool((codes[0] == 0).all()) and int(exp.max()) < 255  # 255 is E8M0's NaN
    d = mx_dequantize(codes, exp, element)
    assert torch.isfinite(d).all() and bool((d[0] == 0).all()) and bool((d[1, 0] == 0).all())


@pytest.mark.parametrize("fmt", list(MX))
@pytest.mark.parametrize("k", [-10, 0, 3])
def test_saturation_after_scaling(fmt, k):
    element, e_elem = MX[fmt]
    top = element_max(element)
    x = 2.0 ** (k)  # the shared scale for a block with amax in [2**(k+e_elem), 2**(k+e_elem+1))
    w = torch.zeros(1, 1, 32)
    w[0, 0, 0] = 2.0 ** (k + e_elem + 1) * 0.9999  # above the element max once scaled (for every element)
    w[0, 0, 1] = -w[0, 0, 0]
    w[0, 0, 2] = 2.0 ** (k + e_elem)
    codes, exp = mx_quantize(w, element)
    assert int(exp) == k + 127
    d = mx_dequantize(codes, exp, element)[0, 0]
    assert d[0].item() == top * x
    # MXINT8 elements are two's complement, so -2 (code 0x80) is representable: only the positive side saturates
    assert d[1].item() == (-2.0 * x if element == "int8" else -top * x)
    assert d[2].item() == 2.0 ** (k + e_elem)


@pytest.mark.parametrize("fmt", list(MX))
def test_representable_block_round_trips_exactly(fmt):
    element, _ = MX[fmt]
    vals = element_values(element)
    gen = torch.Generator().manual_seed(1)
    for k in (-24, -3, 0, 5, 30):
        idx = torch.randint(0, vals.numel(), (6, 32), generator=gen)
        v = vals[idx] * torch.where(torch.rand(6, 32, generator=gen) < 0.5, -1.0, 1.0)
        v[:, 0] = element_max(element)  # fixes the shared exponent to 2**k
        w = (v * 2.0**k).view(6, 1, 32)
        codes, exp = mx_quantize(w, element)
        assert bool((exp == k + 127).all())
        assert torch.equal(mx_dequantize(codes, exp, element), w)
        q = quantize_tensor(w.view(6, 32), fmt)
        assert torch.equal(q.dequantize(), w.view(6, 32))


def test_mxint8_elements_are_int8_times_2_pow_minus_6():
    w = torch.tensor([1.0, -1.0, 0.5, 1 / 64, 1.5 + 1 / 64, 1.99] + [0.0] * 26).view(1, 1, 32)
    codes, exp = mx_quantize(w, "int8")
    assert int(exp) == 127
    assert codes.view(torch.int8).flatten()[:6].tolist() == [64, -64, 32, 1, 97, 127]


# ---- NVFP4

def nv_parts(w):
    q = quantize_tensor(w, "nvfp4")
    rows = w.shape[0]
    return q, decode_float(q.scale, "fp8_e4m3").view(rows, -1), float(q.global_scale)


def test_nvfp4_scales():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 3
    q, block_scale, g = nv_parts(w)
    assert q.fmt.group_size == 16 and q.scale.dtype == torch.uint8 and q.scale.shape == (64, 16)
    assert q.global_scale.dtype == torch.float32 and q.global_scale.shape == ()
    assert g == float(w.abs().amax() / (6 * 448))
    assert bool((block_scale >= 0).all() and (block_scale <= 448).all())
    assert float(block_scale.max()) == 448.0  # the block holding the tensor's amax maps to the e4m3 max
    # every value is an fp4 grid value times its (e4m3) block scale times the global scale
    d = q.dequantize().view(64, 16, 16)
    unit = d / (block_scale.unsqueeze(-1) * g)
    grid = magnitudes("fp4_e2m1")
    nearest = grid[(unit.abs().unsqueeze(-1) - grid).abs().argmin(-1)]
    assert torch.allclose(unit.abs(), nearest, rtol=1e-6, atol=0)
    assert torch.equal(d, decode_float(codes_grid(q), "fp4_e2m1") * (block_scale.unsqueeze(-1) * g))


def test_nvfp4_block_scale_is_rounded_ideal_scale():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    q, block_scale, g = nv_parts(w)
    ideal = w.view(8, 4, 16).abs().amax(-1) / 6 / g
    assert torch.equal(block_scale, ideal.to(torch.float8_e4m3fn).float())


def test_nvfp4_reconstruction_error_small():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    d = quantize_tensor(w, "nvfp4").dequantize()
    rel = float((d - w).norm() / w.norm())
    assert rel < 0.12


def test_nvfp4_zero_and_padding():
    d = quantize_tensor(torch.zeros(4, 16), "nvfp4").dequantize()
    assert torch.equal(d, torch.zeros(4, 16))
    w = torch.randn(5, 40, generator=torch.Generator().manual_seed(5))  # 40 = 2.5 blocks per row
    q = quantize_tensor(w, "nvfp4")
    assert q.scale.shape == (5, 3) and q.dequantize().shape == (5, 40)
    assert float((q.dequantize() - w).norm() / w.norm()) < 0.12
