"""Small float element formats: exact grids, code layout, round-to-nearest-even, saturation, torch fp8 parity."""
import pytest
import torch

from modelpress.formats import decode_float, encode_float, magnitudes, max_value
from modelpress.formats.floats import FLOATS, emax

NAMES = list(FLOATS)


def test_fp4_grid_is_exact():
    assert magnitudes("fp4_e2m1").tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    values = decode_float(torch.arange(16, dtype=torch.uint8), "fp4_e2m1").tolist()
    assert values == [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]


@pytest.mark.parametrize("name, top, count, e", [
    ("fp4_e2m1", 6.0, 8, 2), ("fp6_e2m3", 7.5, 32, 2), ("fp6_e3m2", 28.0, 32, 4),
    ("fp8_e4m3", 448.0, 127, 8), ("fp8_e5m2", 57344.0, 124, 15),
])
def test_max_count_emax(name, top, count, e):
    mags = magnitudes(name)
    assert max_value(name) == top and mags.numel() == count and emax(name) == e
    assert mags[0] == 0 and bool((mags[1:] > mags[:-1]).all())  # increasing with the code


def test_fp6_grids():
    e2m3 = magnitudes("fp6_e2m3")
    assert e2m3[:9].tolist() == [i / 8 for i in range(9)]  # subnormal step 1/8 up to 1
    assert e2m3[-4:].tolist() == [6.0, 6.5, 7.0, 7.5]
    e3m2 = magnitudes("fp6_e3m2")
    assert e3m2[:5].tolist() == [0, 0.0625, 0.125, 0.1875, 0.25]
    assert e3m2[-4:].tolist() == [16.0, 20.0, 24.0, 28.0]


@pytest.mark.parametrize("name, dtype, n", [("fp8_e4m3", torch.float8_e4m3fn, 127),
                                           ("fp8_e5m2", torch.float8_e5m2, 124)])
def test_fp8_code_layout_matches_torch(name, dtype, n):
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(dtype).float()
    finite = torch.isfinite(ref)
    assert int(finite.sum()) == 2 * n
    assert torch.equal(decode_float(codes[finite], name), ref[finite])


@pytest.mark.parametrize("name", NAMES)
def test_grid_values_round_trip(name):
    nbits = 1 + sum(FLOATS[name][:2])
    mags = magnitudes(name)
    vals = torch.cat([mags, -mags])
    assert torch.equal(decode_float(encode_float(vals, name), name), vals)
    codes = torch.arange(mags.numel(), dtype=torch.uint8)
    neg = codes[1:] | (1 << (nbits - 1))  # negative zero is never produced, so leave it out
    all_codes = torch.cat([codes, neg])
    assert torch.equal(encode_float(decode_float(all_codes, name), name), all_codes)
    assert encode_float(vals, name).dtype == torch.uint8


@pytest.mark.parametrize("x, y", [(2.5, 2), (3.5, 4), (5, 4), (0.25, 0), (0.75, 1), (1.25, 1), (1.75, 2), (0.74, 0.5),
                                  (0.76, 1), (2.51, 3), (4.99, 4), (5.01, 6), (-2.5, -2), (-3.5, -4), (-5, -4),
                                  (-0.75, -1)])
def test_fp4_ties_to_even(x, y):
    assert decode_float(encode_float(torch.tensor([x]), "fp4_e2m1"), "fp4_e2m1").item() == y


@pytest.mark.parametrize("name", NAMES)
def test_ties_to_even_code_everywhere(name):
    mags = magnitudes(name)
    mids = (mags[1:] + mags[:-1]) / 2  # exact in float32 for these short grids
    codes = encode_float(mids, name).to(torch.int64)
    assert bool((codes % 2 == 0).all())
    assert bool(((codes == torch.arange(mids.numel())) | (codes == torch.arange(1, mids.numel() + 1))).all())


@pytest.mark.parametrize("name", NAMES)
def test_saturation(name):
    top = max_value(name)
    x = torch.tensor([1e30, float("inf"), -1e30, -float("inf"), top * 1.2, -top * 1.01, top * 2**20])
    out = decode_float(encode_float(x, name), name)
    assert out.tolist() == [top, top, -top, -top, top, -top, top]


def test_fp4_saturation_1000():
    assert decode_float(encode_float(torch.tensor([1000.0, -1000.0]), "fp4_e2m1"), "fp4_e2m1").tolist() == [6, -6]


def test_no_negative_zero():
    codes = encode_float(torch.tensor([-0.0, -0.1, -1e-30]), "fp4_e2m1")
    assert codes.tolist() == [0, 0, 0]


@pytest.mark.parametrize("name, dtype, lo, hi", [("fp8_e4m3", torch.float8_e4m3fn, -14, 10),
                                                ("fp8_e5m2", torch.float8_e5m2, -20, 17)])
def test_fp8_matches_torch_conversion(name, dtype, lo, hi):
    g = torch.Generator().manual_seed(0)
    n = 20000
    mag = torch.exp2(torch.empty(n).uniform_(lo, hi, generator=g))  # subnormals, normals and beyond the max
    x = torch.where(torch.rand(n, generator=g) < 0.5, -mag, mag)
    top = max_value(name)
    mags = magnitudes(name)
    mids = (mags[1:] + mags[:-1]) / 2
    x = torch.cat([x, mids, -mids, mags, -mags, torch.randn(1000, generator=g)]).clamp(-top, top)
    ours = decode_float(encode_float(x, name), name)
    assert torch.equal(ours, x.to(dtype).float())


@pytest.mark.parametrize("name, bad", [("fp8_e4m3", 0x7F), ("fp8_e4m3", 0xFF), ("fp8_e5m2", 0x7C), ("fp8_e5m2", 0xFE)])
def test_decode_rejects_nan_inf_codes(name, bad):
    with pytest.raises(ValueError, match="finite range"):
        decode_float(torch.tensor([0, bad], dtype=torch.uint8), name)
