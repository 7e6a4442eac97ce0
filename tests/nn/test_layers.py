"""Replacement layers: each computes what its dense equivalent computes, and stores only its compact form."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from modelpress.formats.packing import packed_nbytes
from modelpress.nn import ButterflyConv2d, ButterflyLinear, LowRankConv, LowRankLinear, PQConv2d, PQLinear
from modelpress.nn.butterfly import chain_params, dense, factor_shapes


def _randomize(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("chain", [[(2, 3), (5, 4)], [(4, 4), (4, 4)], [(1, 2), (3, 3), (2, 2)], [(6, 12)],
                                   [(3, 2), (1, 5), (4, 3)]])
def test_butterfly_product_equals_its_dense_equivalent(chain):
    in_f, out_f = math.prod(s for _, s in chain), math.prod(r for r, _ in chain)
    m = _randomize(ButterflyLinear(in_f, out_f, chain))
    x = torch.randn(2, 3, in_f, dtype=torch.float64)
    m64 = m.double()
    assert torch.allclose(m64(x), x @ m64.weight.T + m64.bias, rtol=1e-12, atol=1e-12)
    # stores only the nonzero blocks: sum of b*t*r*s, and the dense weight has at most that many free numbers
    assert sum(f.numel() for f in m.factors) == chain_params(chain, in_f)
    assert m.weight.shape == (out_f, in_f)


def test_butterfly_factor_structure_is_block_sparse_and_connects_every_input():
    # (r, s) = (2, 2) twice on 4 inputs: factor 1 is block-diagonal (two 2x2 blocks), factor 2 interleaves
    shapes = factor_shapes([(2, 2), (2, 2)], 4)
    assert shapes == [(2, 1, 2, 2), (1, 2, 2, 2)]
    f1, f2 = torch.randn(shapes[0]), torch.randn(shapes[1])
    d1 = dense([f1], 4)
    assert torch.count_nonzero(d1[:2, 2:]) == 0 and torch.count_nonzero(d1[2:, :2]) == 0
    d2 = dense([f2], 4)
    assert torch.count_nonzero(d2) == 8  # each output mixes 2 inputs
    full = dense([f1, f2], 4)
    assert torch.count_nonzero(full) == 16 and torch.allclose(full, d2 @ d1, atol=1e-6)


def test_butterfly_chain_must_fit_the_layer():
    with pytest.raises(ValueError, match="multiply to 6, not the 12 inputs"):
        ButterflyLinear(12, 4, [(2, 2), (2, 3)])
    with pytest.raises(ValueError, match="not the 5 outputs"):
        ButterflyLinear(12, 5, [(2, 3), (2, 4)])


def test_butterfly_pointwise_conv_matches_conv2d_and_to_float():
    m = _randomize(ButterflyConv2d(6, 4, [(2, 2), (2, 3)], stride=(2, 2)))
    x = torch.randn(2, 6, 5, 5)
    ref = F.conv2d(x, m.weight, m.bias, stride=2)
    assert torch.allclose(m(x), ref, atol=1e-5)
    f = m.to_float()
    assert type(f) is nn.Conv2d and torch.allclose(f(x), ref, atol=1e-5)


def test_low_rank_layers_compose_exactly():
    torch.manual_seed(0)
    lin = _randomize(LowRankLinear(8, 6, 3))
    x = torch.randn(4, 8)
    assert torch.allclose(lin(x), x @ lin.weight.T + lin.bias, atol=1e-5)
    assert torch.allclose(lin.to_float()(x), lin(x), atol=1e-5)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode="reflect")
    lr = _randomize(LowRankConv(conv, 2))
    x = torch.randn(2, 3, 7, 7)
    dense_conv = lr.to_float()
    assert type(dense_conv) is nn.Conv2d and dense_conv.padding_mode == "reflect"
    assert torch.allclose(lr(x), dense_conv(x), atol=1e-5)
    with pytest.raises(ValueError, match="rank must be"):
        LowRankLinear(8, 6, 7)
    with pytest.raises(ValueError, match="without groups"):
        LowRankConv(nn.Conv2d(4, 4, 3, groups=2), 2)


def _pq_linear(in_f=16, out_f=6, dim=4, entries=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = PQLinear(in_f, out_f, dim, entries)
    idx = torch.randint(entries, (out_f, in_f // dim), generator=g)
    return m.set_codes(idx, torch.randn(entries, dim, generator=g), torch.randn(out_f, generator=g)), idx


def test_pq_linear_decodes_codes_through_the_codebook_and_packs_indices():
    m, idx = _pq_linear()
    assert torch.equal(m.indices(), idx)
    w = m.codebook.detach()[idx].reshape(6, 16)
    assert torch.equal(m.weight.detach(), w)
    assert m.codes.numel() == packed_nbytes(6 * 4, 3) == 9  # 24 indices of 3 bits
    x = torch.randn(20, 16)
    assert torch.allclose(m(x), x @ w.T + m.bias, atol=1e-5)
    params, fmt = m.inspect_row()
    assert params == 6 * 16 + 6 and fmt == "pq d4 k8"


def test_pq_table_lookup_forward_equals_the_decoded_forward():
    m, _ = _pq_linear(in_f=32, out_f=64, dim=4, entries=8)
    x = torch.randn(3, 32, dtype=torch.float64)
    m = m.double()
    assert m.use_table(1) and not m.use_table(2)
    w = m.weight.detach()
    assert torch.allclose(m.table_forward(x), x @ w.T + m.bias, rtol=1e-12, atol=1e-12)
    assert torch.allclose(m(x[:1]), x[:1] @ w.T + m.bias, rtol=1e-12, atol=1e-12)


def test_pq_conv_sub_vectors_run_along_channels():
    conv = nn.Conv2d(8, 4, 3, padding=1, groups=2)
    g = torch.Generator().manual_seed(0)
    m = PQConv2d(conv, 2, 4)
    idx = torch.randint(4, (4, 3 * 3 * 4 // 2), generator=g)
    m.set_codes(idx, torch.randn(4, 2, generator=g), torch.randn(4, generator=g))
    w = m.weight.detach()
    assert w.shape == conv.weight.shape
    assert torch.equal(PQConv2d.sub_vectors(w, 2), m.codebook.detach()[idx])
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(m(x), F.conv2d(x, w, m.bias, padding=1, groups=2), atol=1e-5)
    assert torch.allclose(m.to_float()(x), m(x), atol=1e-5)
    with pytest.raises(ValueError, match="not divide"):
        PQConv2d(nn.Conv2d(3, 4, 1), 2, 4)
