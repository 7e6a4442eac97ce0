"""Integer element formats: code ranges, rounding error bounds, MSE clipping, binary and ternary."""
import pytest
import torch

from modelpress.formats import codes_grid, quantize_tensor, signed
from modelpress.formats.integer import (_quant, int_params, int_range, quantize_binary, quantize_int,
                                        quantize_ternary)


def groups(rows=64, ngroups=4, g=32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, ngroups, g, generator=gen) * scale


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("mse", [False, True])
def test_code_ranges(bits, symmetric, mse):
    w = groups(seed=bits) * torch.logspace(-3, 3, 64).view(64, 1, 1)
    q, scale, zero = quantize_int(w, bits, symmetric, mse=mse)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert int_range(bits, symmetric) == (lo, hi)
    assert q.dtype == torch.int32 and int(q.min()) >= lo and int(q.max()) <= hi
    assert int(q.min()) == lo or int(q.max()) == hi  # the range is used
    assert scale.shape == zero.shape == (64, 4, 1)
    if symmetric:
        assert bool((zero == 0).all())
    else:
        assert bool((zero >= lo).all() and (zero <= hi).all() and (scale > 0).all())


@pytest.mark.parametrize("spec, lo, hi", [("int8", -128, 127), ("int4:g32", -8, 7), ("int2:g16", -2, 1),
                                          ("int4:g32:asym", 0, 15), ("int3:g32:asym", 0, 7), ("int5:g32", -16, 15)])
def test_stored_codes_in_range(spec, lo, hi):
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(1))
    q = quantize_tensor(w, spec)
    u = codes_grid(q)
    c = signed(u, q.fmt.bits) if q.fmt.symmetric else u.to(torch.int32)
    assert int(c.min()) == lo or int(c.max()) == hi
    assert int(c.min()) >= lo and int(c.max()) <= hi


@pytest.mark.parametrize("spec", ["int8", "int8:tensor", "int7", "int5:g32"])
def test_error_at_most_half_a_step(spec):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 160, generator=gen) * torch.logspace(-2, 2, 48).view(48, 1)
    q = quantize_tensor(w, spec)
    err = (q.dequantize() - w).abs()
    step = q.scale.float().abs()
    step = step.view(-1, 1) if q.fmt.granularity != "group" else step.repeat_interleave(q.fmt.group_size, 1)
    assert bool((err <= step / 2 * (1 + 1e-5)).all())


def test_int8_per_channel_uses_positive_fp32_scales():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    q = quantize_tensor(w, "int8")
    assert q.scale.dtype == torch.float32 and q.scale.shape == (16, 1) and bool((q.scale > 0).all())
    amax = w.abs().amax(1)
    assert torch.allclose(q.scale[:, 0], torch.maximum(w.amax(1) / 127, -w.amin(1) / 128), rtol=0, atol=0)
    assert bool((q.scale[:, 0] <= amax / 127).all())


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clipping_beats_min_max(bits, symmetric):
    w = groups(rows=128, seed=10 + bits)
    q, scale, zero = quantize_int(w, bits, symmetric)  # mse is the default at <= 3 bits
    err_mse = ((q - zero) * scale - w).pow(2).sum(-1)
    qmin, qmax = int_range(bits, symmetric)
    s1, z1 = int_params(w, bits, symmetric, shrink=1.0)
    err_plain = ((_quant(w, s1, z1, qmin, qmax) - z1) * s1 - w).pow(2).sum(-1)
    assert bool((err_mse <= err_plain * (1 + 1e-6)).all())  # never worse, group by group
    assert float(err_mse.sum()) < 0.9 * float(err_plain.sum())  # and clearly better overall


def test_symmetric_low_bits_can_flip_the_extra_step():
    # int4 codes are [-8, 7]; a group whose largest value is positive 8 is exact with a negative scale
    w = torch.tensor([8.0, 1, -3, 0, 5, -7, 2, 6] * 4).view(1, 1, 32)
    q, scale, zero = quantize_int(w, 4, True)
    assert torch.equal(q * scale, w) and float(scale) == -1.0
    q8, scale8, _ = quantize_int(w, 8, True)  # int8 keeps positive scales
    assert float(scale8) > 0


def test_all_zero_group():
    w = torch.zeros(2, 3, 32)
    for bits, sym in [(4, True), (4, False), (8, True), (2, True)]:
        q, scale, zero = quantize_int(w, bits, sym)
        assert bool((scale == 1).all()) and torch.equal((q - zero) * scale, w)
    for fn in (quantize_binary, quantize_ternary):
        assert bool((fn(w)[1] == 1).all())


def test_binary_scale_is_mean_abs():
    w = groups(seed=4)
    codes, scale = quantize_binary(w)
    assert torch.equal(scale, w.abs().mean(-1, keepdim=True))
    assert torch.equal(codes, (w >= 0).to(torch.int32))
    # through QTensor (bf16 group scales, no padding): values are +-scale
    w2 = w.reshape(64, 128)
    q = quantize_tensor(w2, "int1:g32")
    assert torch.equal(q.scale.float(), w.abs().mean(-1).to(torch.bfloat16).float())
    d = q.dequantize().view(64, 4, 32)
    s = q.scale.float().unsqueeze(-1)
    assert torch.equal(d, torch.where(w >= 0, s, -s))


def test_ternary_values():
    w = groups(seed=5)
    q, scale = quantize_ternary(w)
    assert set(q.unique().tolist()) <= {-1, 0, 1} and bool((scale > 0).all())
    d = quantize_tensor(w.reshape(64, 128), "ternary:g32").dequantize().view(64, 4, 32)
    s = quantize_tensor(w.reshape(64, 128), "ternary:g32").scale.float().unsqueeze(-1)
    assert bool(((d == 0) | (d == s) | (d == -s)).all())
    assert bool((d == 0).any()) and bool((d != 0).any())
    # the threshold search is at least as good as TWN's fixed 0.7 * mean|w|
    a = w.abs()
    keep = a > 0.7 * a.mean(-1, keepdim=True)
    s_twn = (a * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True)
    err_twn = (torch.sign(w) * keep * s_twn - w).pow(2).sum()
    assert float((q * scale - w).pow(2).sum()) <= float(err_twn) * (1 + 1e-6)
