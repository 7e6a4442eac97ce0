import pytest
import torch
from torch import nn

from modelpress.formats import dequantize_tensor, parse_format, quantize_tensor
from modelpress.quant.activation import parse_activation
from modelpress.quant.qat import QATEmbeddingBag, QATLinear
from modelpress.quant.qat_quantizers import ActFakeQuant, FrequencyTransform, WeightFakeQuant


def w86(seed=0):
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["quantnoise", "fst"])
def test_noise_quantizes_the_requested_share_of_blocks(method):
    w = w86()
    low, high = parse_format("int2"), parse_format("int8")
    wq = WeightFakeQuant(w, low, "dynamic", noise=(method, 0.25, 4, high)).train()
    q_low = dequantize_tensor(quantize_tensor(w, low))
    other = dequantize_tensor(quantize_tensor(w, high)) if method == "fst" else w
    seen = []
    for _ in range(3):
        out = wq(w).reshape(8, 4, 4)  # 8 rows x 4 blocks of 4 columns
        at_low = (out == q_low.reshape(8, 4, 4)).all(-1)
        at_other = (out == other.reshape(8, 4, 4)).all(-1)
        assert (at_low | at_other).all()  # every block is wholly one or the other
        assert (at_low & ~at_other).sum() == 8  # 25% of the 32 blocks at the low width (where they differ)
        seen.append(at_low)
    assert not torch.equal(seen[0], seen[1])  # a new subset every step
    assert wq.step.item() == 3
    assert torch.equal(wq.eval()(w), q_low)  # eval: all at the layer's format, as after convert_


def test_learned_scales_reach_the_parameters_and_stay_exact():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    fmt = parse_format("int4:g8")
    wq = WeightFakeQuant(lin.weight.detach(), fmt, "learned")
    q0 = quantize_tensor(lin.weight.detach(), fmt)
    assert torch.equal(wq.scale.detach().to(torch.bfloat16), q0.scale)
    qat = QATLinear.adopt(lin, wq)
    assert qat.weight is lin.weight  # the same parameter is trained
    x = torch.randn(5, 16)
    qat(x).square().sum().backward()
    assert wq.scale.grad is not None and wq.scale.grad.abs().sum() > 0 and lin.weight.grad.abs().sum() > 0
    with torch.no_grad():
        wq.scale.mul_(1.1)
    expected = dequantize_tensor(qat.qweight())
    assert torch.equal(qat.fake_weight(), expected)


def test_sensimix_binary_abs_mean_scale_and_clipped_gradient():
    w = torch.tensor([[0.5, -1.5, 0.25, -0.25]], requires_grad=True)
    wq = WeightFakeQuant(w.detach(), parse_format("int1:g4"), "dynamic", ste_clip=1.0)
    out = wq(w)
    scale = w.detach().abs().mean()  # absolute-mean scaling
    assert torch.allclose(out, torch.sign(w.detach()) * scale, atol=1e-2)  # bf16 group scale
    assert torch.equal(out, dequantize_tensor(quantize_tensor(w.detach(), "int1:g4")))
    out.sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 0.0, 1.0, 1.0]]))  # no gradient where |w| > 1


def test_fat_transform_is_trained_and_applied_before_the_grid():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    t = FrequencyTransform(16)
    with torch.no_grad():
        t.theta[8:] = -3.0  # damp the high frequencies
    qat = QATLinear.adopt(lin, WeightFakeQuant(lin.weight.detach(), parse_format("int3"), "dynamic"), None, t)
    expected = dequantize_tensor(quantize_tensor(t(lin.weight).detach(), "int3"))
    assert torch.equal(qat.fake_weight(), expected)
    qat(torch.randn(4, 16)).sum().backward()
    assert t.theta.grad is not None and t.theta.grad.abs().sum() > 0


def test_embedding_bag_quantizes_only_the_rows_it_looks_up():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(50, 8, mode="sum")
    fmt = parse_format("int2")
    qat = QATEmbeddingBag.adopt(bag, WeightFakeQuant(bag.weight.detach(), fmt, "frozen"))
    idx, off = torch.tensor([3, 7, 3, 49]), torch.tensor([0, 2])
    out = qat(idx, off)
    table = dequantize_tensor(quantize_tensor(bag.weight.detach(), fmt))
    assert torch.equal(out, torch.stack([table[3] + table[7], table[3] + table[49]]))
    out.sum().backward()
    rows = bag.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert rows == [3, 7, 49]


def test_act_quant_learned_range_gets_gradients():
    aq = ActFakeQuant(parse_activation("int4:static"), "learned").train()
    aq.observe(torch.rand(4, 10))  # first batch initialises the range
    assert aq.initialized
    x = (torch.rand(4, 10) * 2).requires_grad_()
    aq(x).sum().backward()
    assert aq.hi.grad is not None and aq.hi.grad != 0 and x.grad is not None
