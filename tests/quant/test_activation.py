"""Activation formats: parsing, uint8 parameters, fake quantization error bounds."""
import pytest
import torch

from modelpress.formats import max_value
from modelpress.quant.activation import (ActFormat, dynamic_params, fake_quant, parse_activation, per_sample_view,
                                         quantize_uint8, uint8_params)

# |x - fq(x)| <= scale / 2 holds in exact arithmetic; fp32 division and the dequantize product add rounding
# of a few ulps of the range (|x| / scale up to 255): slack EPS * range.
EPS = 1e-6


@pytest.mark.parametrize("spec,expected", [
    (None, None),
    ("int8", ActFormat("int8")),
    ("INT8:static", ActFormat("int8", True)),
    ("int8:dynamic", ActFormat("int8", False)),
    ("int8:static:dynamic", ActFormat("int8", False)),  # the last option wins
    ("fp8", ActFormat("fp8_e4m3")),
    ("fp8_e5m2:static", ActFormat("fp8_e5m2", True)),
    (ActFormat("int8", True), ActFormat("int8", True)),
])
def test_parse(spec, expected):
    assert parse_activation(spec) == expected


@pytest.mark.parametrize("spec,match", [
    ("int4", "unsupported activation format 'int4'"),
    ("bf16", "unsupported activation format"),
    ("", "unsupported activation format"),
    ("int8:per_token", "unknown activation option 'per_token'"),
    ("fp8:g32", "unknown activation option 'g32'"),
])
def test_parse_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_activation(spec)


def test_str_roundtrip():
    for spec in ("int8", "int8:static", "fp8_e4m3", "fp8_e5m2:static"):
        assert str(parse_activation(spec)) == spec
        assert parse_activation(str(parse_activation(spec))) == parse_activation(spec)


@pytest.mark.parametrize("lo,hi", [(-1.0, 3.0), (-3.0, -1.0), (0.5, 2.0), (-0.3, 0.7), (0.0, 0.0), (-1e-4, 5e3)])
def test_uint8_params_cover_range_with_zero_exact(lo, hi):
    scale, zero = uint8_params(torch.tensor(lo), torch.tensor(hi))
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    if hi0 > lo0:
        assert scale.item() == pytest.approx((hi0 - lo0) / 255, rel=1e-6)
    else:
        assert scale.item() == 1.0
    assert zero.item() == round(zero.item()) and 0 <= zero.item() <= 255
    assert quantize_uint8(torch.tensor(0.0), scale, zero).item() == zero.item()  # 0 is exactly representable
    x = torch.linspace(lo0, hi0, 1001)
    fq = (quantize_uint8(x, scale, zero).float() - zero) * scale
    assert (fq - x).abs().max().item() <= scale.item() / 2 + EPS * (hi0 - lo0)  # endpoints included: no clipping


def test_uint8_params_one_sided_ranges():
    _, z = uint8_params(torch.tensor(0.5), torch.tensor(2.0))
    assert z.item() == 0  # all positive: the range starts at 0
    _, z = uint8_params(torch.tensor(-3.0), torch.tensor(-1.0))
    assert z.item() == 255  # all negative: the range ends at 0


def test_per_token_fake_quant_error():
    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3, 0.0]).reshape(-1, 1)
    x[2] += 5.0  # an all-positive row
    fq = fake_quant(x, ActFormat("int8"))
    scale = (x.amax(1).clamp(min=0) - x.amin(1).clamp(max=0)) / 255
    err = (fq - x).abs().amax(1)
    assert torch.all(err <= scale / 2 + EPS * 255 * scale)
    assert torch.equal(fq[5], x[5])  # an all-zero row stays zero
    scale_t, zero_t = dynamic_params(x, per_token=True)
    assert scale_t.shape == zero_t.shape == (6, 1)


def test_per_tensor_and_static():
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    s, z = dynamic_params(x, per_token=False)
    assert s.dim() == 0
    assert torch.equal(fake_quant(x, ActFormat("int8"), per_token=False),
                       fake_quant(x, ActFormat("int8", True), s, z))
    scale, zero = uint8_params(torch.tensor(-0.5), torch.tensor(0.5))  # a narrow static range: x saturates
    fq = fake_quant(x, ActFormat("int8", True), scale, zero)
    assert fq.min().item() == pytest.approx(-zero.item() * scale.item())
    assert fq.max().item() == pytest.approx((255 - zero.item()) * scale.item())


def test_fake_quant_keeps_dtype():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert fake_quant(x, ActFormat("int8")).dtype == torch.bfloat16
    assert fake_quant(x, ActFormat("fp8_e4m3")).dtype == torch.bfloat16


@pytest.mark.parametrize("name,mantissa", [("fp8_e4m3", 3), ("fp8_e5m2", 2)])
def test_fp8_fake_quant(name, mantissa):
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    fq = fake_quant(x, ActFormat(name))
    amax = x.abs().max()
    assert fq.abs().max().item() == pytest.approx(amax.item(), rel=1e-6)  # amax maps to the largest code
    normal = x.abs() > amax / max_value(name) * 2.0 ** -5  # well inside the normal range of both formats
    rel = ((fq - x).abs() / x.abs())[normal]
    assert rel.max().item() <= 2.0 ** -(mantissa + 1) * (1 + 1e-5)  # round to nearest: half a mantissa step


def test_per_sample_view():
    x = torch.randn(3, 4, 5, 6)
    assert per_sample_view(x).shape == (3, 120)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_fast_cast_equals_the_format_codec(name):
    """fake_quant_fp8 uses torch's float8 casts: the same values as formats.floats' encode/decode, saturation included."""
    from modelpress.formats.floats import decode_float, encode_float
    from modelpress.quant.activation import fake_quant_fp8

    m = max_value(name)
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000) * m / 4, torch.randn(5000) * 1e-3, torch.linspace(-1.2 * m, 1.2 * m, 20001),
                   torch.randn(500) * 1e-7])
    scale = torch.tensor(1.0)
    expected = decode_float(encode_float(x.clamp(-m, m), name), name)
    assert torch.equal(fake_quant_fp8(x, scale, name), expected)
