"""Observers turn calibration activations into a (lo, hi) range."""
import math

import pytest
import torch

from modelpress.quant import Observer, observers
from modelpress.quant.activation import quantize_uint8, uint8_params


def observe(kind, *batches, **kw):
    o = Observer(kind, **kw)
    for b in batches:
        o.update(torch.as_tensor(b, dtype=torch.float32))
    lo, hi = o.range()
    return lo.item(), hi.item()


def uint8_mse(x, lo, hi):
    scale, zero = uint8_params(torch.tensor(lo), torch.tensor(hi))
    return ((quantize_uint8(x, scale, zero).float() - zero) * scale - x).pow(2).mean().item()


def test_minmax():
    assert observe("minmax", [[0.5, 2.0], [-1.0, 0.0]], [3.0, 1.0], [-0.25]) == (-1.0, 3.0)


def test_ema():
    lo, hi = observe("ema", [-1.0, 1.0], [-3.0, 5.0], momentum=0.9)
    assert lo == pytest.approx(0.9 * -1 + 0.1 * -3) and hi == pytest.approx(0.9 * 1 + 0.1 * 5)
    lo, hi = observe("ema", [-1.0, 1.0], [-3.0, 5.0], [-3.0, 5.0], momentum=0.5)
    assert lo == pytest.approx(-2.5) and hi == pytest.approx(4.0)


def test_percentile_of_known_data():
    x = torch.arange(1000.0)
    assert observe("percentile", x, percentile=99) == pytest.approx((9.99, 989.01), rel=1e-5)
    assert observe("percentile", x[:500], x[500:], percentile=99) == pytest.approx((9.99, 989.01), rel=1e-5)
    assert observe("percentile", x, percentile=100) == (0.0, 999.0)


def test_percentile_sample_is_bounded(monkeypatch):
    monkeypatch.setattr(observers, "MAX_SAMPLES", 2000)
    o = Observer("percentile", percentile=50)
    for _ in range(5):
        o.update(torch.arange(1000.0))
    o.update(torch.arange(10000.0))  # only a random subset of this one fits
    assert o.kept == 2000
    lo, hi = o.range()
    assert lo.item() == hi.item() and 400 < lo.item() < 600  # the median of what was kept


def test_mse_keeps_range_on_uniform_data():
    x = torch.linspace(-1.0, 1.0, 10001)
    lo, hi = observe("mse", x)
    assert lo == pytest.approx(-1.0, rel=0.03) and hi == pytest.approx(1.0, rel=0.03)


def test_mse_clips_heavy_tails():
    t = torch.linspace(-1.0, 1.0, 10003)[1:-1]
    x = -torch.sign(t) * torch.log1p(-t.abs())  # Laplace quantiles, max |x| = 8.5
    lo, hi = observe("mse", x)
    f = hi / x.max().item()
    assert f < 1.0 and lo == pytest.approx(x.min().item() * f, rel=1e-5)  # both ends shrunk by one factor
    assert any(math.isclose(f, g, rel_tol=1e-5) for g in torch.linspace(1.0, 0.2, 41).tolist())
    assert uint8_mse(x, lo, hi) < uint8_mse(x, x.min().item(), x.max().item())


@pytest.mark.parametrize("kind", ["minmax", "ema", "percentile", "mse"])
def test_empty_calibration(kind):
    o = Observer(kind)
    with pytest.raises(ValueError, match="calibration set is empty"):
        o.range()
    o.update(torch.zeros(0, 8))  # an empty batch is skipped, not counted
    with pytest.raises(ValueError, match="calibration set is empty"):
        o.range()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(bad):
    o = Observer("minmax")
    with pytest.raises(ValueError, match="NaN or infinite"):
        o.update(torch.tensor([0.0, bad, 1.0]))


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown observer 'max'"):
        Observer("max")
