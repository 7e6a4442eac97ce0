import math

import pytest
import torch

from modelpress.formats import dequantize_tensor, parse_format, quantize_tensor
from modelpress.quant.fake_quant import (batch_range, block_mask, clip_mask, dct_matrix, frequency_transform,
                                         kmeans, lsq_surrogate, to_grid, with_surrogate)
from modelpress.quant.qat_quantizers import ActFakeQuant, WeightFakeQuant
from modelpress.quant.activation import parse_activation


def w86(seed=0):
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(seed))


def test_with_surrogate_keeps_the_exact_value_and_the_surrogate_gradient():
    x = torch.tensor([0.1, 0.7, -2.3], requires_grad=True)
    exact = torch.tensor([0.3333333, 1e-8, -7.0])
    y = with_surrogate(exact, 3 * x)
    assert torch.equal(y, exact)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 3.0))


@pytest.mark.parametrize("spec", ["int4", "int3:g2:asym", "fp4_e2m1", "int2:tensor"])
def test_straight_through_gradient_equals_the_reference(spec):
    fmt = parse_format(spec)
    w = (w86() * 2).requires_grad_()
    wq = WeightFakeQuant(w.detach(), fmt, "dynamic", mse=True)  # MSE clipping: some weights are clipped
    q = quantize_tensor(w.detach(), fmt, mse=True)
    out = wq(w)
    assert torch.equal(out, dequantize_tensor(q))  # the format's exact encode/decode
    up = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    (out * up).sum().backward()
    # reference: the upstream gradient where w / s (+ z) rounds into the code range, zero where it is clipped
    s = q.scale.float().unsqueeze(-1)
    v = to_grid(w.detach(), fmt) / s + (q.zero.float().unsqueeze(-1) if q.zero is not None else 0)
    if fmt.kind == "int":
        lo, hi = (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1) if fmt.symmetric else (0, 2**fmt.bits - 1)
        inside = (v >= lo - 0.5) & (v <= hi + 0.5)
    else:
        inside = v.abs() <= 6.0
    ref = up * inside.reshape(inside.shape[0], -1)[:, : 48 // inside.shape[0]].reshape(8, 6)
    assert torch.equal(w.grad, ref)
    assert 0 < inside.float().mean() <= 1


def test_lsq_gradients_match_the_hand_derivation():
    fmt = parse_format("int2:tensor")  # codes -2..1
    w = torch.tensor([[0.26, -0.9, 0.4, 0.05]], requires_grad=True)
    s = torch.tensor([[[0.3]]], requires_grad=True)
    out = lsq_surrogate(to_grid(w, fmt), fmt, s)
    v = [x / 0.3 for x in (0.26, -0.9, 0.4, 0.05)]
    q = [max(-2, min(1, round(x))) for x in v]
    assert torch.allclose(out.flatten(), torch.tensor([c * 0.3 for c in q]))
    out.sum().backward()
    # d/dw: 1 inside the range, 0 where clipped (-0.9 / 0.3 = -3 < -2, 0.4 / 0.3 = 1.33 > 1); d/ds: (q - v) inside,
    # q_min / q_max outside, times LSQ's gradient scale 1 / sqrt(n * q_max)
    assert torch.equal(w.grad, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    ds = sum((qi - vi) if -2 <= vi <= 1 else qi for qi, vi in zip(q, v)) / math.sqrt(4 * 1)
    assert s.grad.item() == pytest.approx(ds, rel=1e-5)


def test_clip_mask_passes_everything_for_block_formats():
    w = w86()
    assert torch.equal(clip_mask(w, quantize_tensor(w, "mxfp4")), torch.ones(8, 6))


def test_block_mask_selects_the_requested_share_of_blocks():
    g = torch.Generator().manual_seed(0)
    m = block_mask(10, 20, 4, 0.3, g)  # 10 rows x 5 blocks
    blocks = m[:, ::4]
    assert blocks.sum() == 15 and m.sum() == 60
    assert torch.equal(m, blocks.repeat_interleave(4, 1))  # whole blocks
    m2 = block_mask(3, 10, 4, 0.5, torch.Generator().manual_seed(1))  # a partial last block
    assert m2.shape == (3, 10) and m2[:, ::4].sum() == round(0.5 * 9)


def test_granular_range_ignores_per_sample_outliers():
    x = torch.rand(16, 1000)
    x[3, 7] = 100.0
    lo, hi = batch_range(x, "minmax")
    glo, ghi = batch_range(x, "granular", 99.0)
    assert hi == 100.0 and ghi < 1.0 and glo >= 0
    per_sample = torch.quantile(x, 0.99, dim=1).mean()
    assert ghi == pytest.approx(per_sample.item(), rel=1e-6)


def test_act_fake_quant_ema_and_granular_updates():
    x1, x2 = torch.rand(4, 1000), torch.rand(4, 1000) * 2
    x2[0, 0] = 50.0
    ema = ActFakeQuant(parse_activation("int4:static"), "ema", momentum=0.5).train()
    gran = ActFakeQuant(parse_activation("int4:static"), "granular", momentum=0.5, percentile=99.0).train()
    for a in (ema, gran):
        a.observe(x1)
        a.observe(x2)
    assert ema.hi.item() == pytest.approx(0.5 * x1.max().item() + 0.5 * 50.0)
    assert gran.hi.item() < 2.0
    ema.eval()
    before = ema.hi.clone()
    ema.observe(x2 * 10)  # eval mode: no update
    assert torch.equal(ema.hi, before)
    y = ema(x1)
    scale, zero = ema.params()
    assert torch.equal(y, ((torch.clamp(torch.round(x1 / scale) + zero, 0, 15) - zero) * scale))


def test_dct_transform_is_orthonormal_and_identity_at_unit_scaling():
    d = dct_matrix(12)
    assert torch.allclose(d @ d.t(), torch.eye(12), atol=1e-6)
    w = w86()
    assert torch.allclose(frequency_transform(w, torch.ones(6), dct_matrix(6)), w, atol=1e-6)
    low = torch.tensor([1.0, 1, 1, 0, 0, 0])  # keep the 3 lowest frequencies
    smooth = frequency_transform(w, low, dct_matrix(6))
    assert (smooth @ dct_matrix(6).t())[:, 3:].abs().max() < 1e-5


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 2, generator=g) * 0.1 + torch.tensor([5.0, 0])
    b = torch.randn(30, 2, generator=g) * 0.1 - torch.tensor([5.0, 0])
    cent, assign = kmeans(torch.cat([a, b]), 2)
    assert assign[:30].unique().numel() == 1 and assign[30:].unique().numel() == 1 and assign[0] != assign[30]
    assert sorted(cent[:, 0].round().tolist()) == [-5.0, 5.0]
    with pytest.raises(ValueError, match="at least 3 samples"):
        kmeans(torch.zeros(2, 2), 3)
