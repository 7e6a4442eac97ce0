"""Sparse storage: N:M and top-k masks, mask packing, sparse QTensors of every format (exact zeros, the kept
values unchanged, bytes falling with sparsity), raw float formats."""
import math

import pytest
import torch

from modelpress.formats import codes_grid, dequantize_tensor, expected_nbytes, parse_format, quantize_tensor
from modelpress.formats.packing import unpack_bits
from modelpress.formats.sparse import (choose_mask, codes_nbytes, kept_values, nm_mask, nnz, pack_mask, parse_pattern,
                                       satisfies, sparsify, sparsity_of, topk_mask, unpack_mask)

SPECS = ["fp32", "bf16", "fp16", "int8", "int8:tensor", "int4:g32", "int4:g32:asym", "int3:g32", "int2:g16",
         "int1:g32", "ternary:g32", "fp8_e4m3", "fp4_e2m1", "mxfp4", "mxfp8", "nvfp4"]


def weight(shape=(16, 64), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_keeps_exactly_n_largest_of_every_m(n, m):
    s = weight((8, 32)).abs()
    mask = nm_mask(s, n, m)
    groups = mask.reshape(8, -1, m)
    assert (groups.sum(-1) == n).all() and satisfies(mask, n, m)
    sg = s.reshape(8, -1, m)
    kept_min = torch.where(groups, sg, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, sg).amax(-1)
    assert (kept_min >= dropped_max).all()  # the kept ones are the largest of each group
    assert not satisfies(torch.ones(8, 32, dtype=torch.bool), n, m)
    with pytest.raises(ValueError, match="multiple of"):
        nm_mask(weight((8, 30)), n, m)


def test_topk_mask_counts_per_tensor_and_row():
    s = weight((10, 50)).abs()
    t = topk_mask(s, 0.3)
    assert int(t.sum()) == 350 and (s[t].min() >= s[~t].max())
    r = topk_mask(s, 0.3, per_row=True)
    assert (r.sum(1) == 35).all()
    assert int(choose_mask(s, 0.9).sum()) == 50 and int(topk_mask(s, 0.0).sum()) == 500
    with pytest.raises(ValueError, match="sparsity"):
        topk_mask(s, 1.0)


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("4:8") == (4, 8)
    for bad in ["4:4", "0:4", "2-4", "a:b", "2:4:8"]:
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)


def test_mask_packing_round_trip():
    m = weight((7, 13)) > 0
    p = pack_mask(m)
    assert p.dtype == torch.uint8 and p.numel() == math.ceil(91 / 8)
    assert torch.equal(unpack_mask(p, (7, 13)), m)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(16, 64), (8, 3, 3, 4), (6, 40)])
def test_sparse_qtensor_exact_zeros_and_kept_values(spec, shape):
    w = weight(shape)
    cols = math.prod(shape[1:])
    mask = nm_mask(w.reshape(shape[0], -1).abs(), 2, 4).reshape(shape) if cols % 4 == 0 else w.abs() > 0.7
    q = quantize_tensor(torch.where(mask, w, 0), spec)
    s = sparsify(q, mask)
    d, ds = dequantize_tensor(q), dequantize_tensor(s)
    assert torch.equal(ds, torch.where(mask, d, 0))  # kept values decode exactly as the dense ones
    assert (ds[~mask] == 0).all() and nnz(s) == int(mask.sum())
    fmt = parse_format(spec)  # bytes: the dense layout's minus the pruned codes, plus 1 bit per weight
    assert s.nbytes == q.nbytes - q.codes.numel() + codes_nbytes(fmt, nnz(s)) + math.ceil(math.prod(shape) / 8)
    assert s.nbytes < q.nbytes or fmt.bits <= 2
    assert sparsity_of(s) == pytest.approx(1 - mask.float().mean().item())
    # a sparse weight sparsified again keeps only what both masks keep
    m2 = mask & (weight(shape, seed=1) > 0)
    assert torch.equal(unpack_mask(sparsify(s, m2).mask, shape), m2)


def test_asymmetric_zero_code_decodes_to_zero():
    w = weight() + 0.5  # an asymmetric range away from zero
    mask = nm_mask(w.abs(), 2, 4)
    s = sparsify(quantize_tensor(w, "int4:g32:asym"), mask)
    grid = codes_grid(s)  # the kernels' view: pruned positions hold the group's zero point
    zero = s.zero.unsqueeze(-1).expand_as(grid)
    assert torch.equal(grid.reshape(16, 64)[~mask], zero.reshape(16, 64)[~mask])


def test_bytes_fall_with_sparsity_vs_dense_fp32():
    w = weight((256, 512))
    dense = w.numel() * 4
    half = topk_mask(w.abs(), 0.5)
    fp32 = sparsify(quantize_tensor(torch.where(half, w, 0), "fp32"), half)
    assert fp32.nbytes / dense <= 0.56  # 16 + 1 bits per weight (+ 4 bytes)
    nm = nm_mask(w.abs(), 2, 4)
    int4 = sparsify(quantize_tensor(torch.where(nm, w, 0), "int4:g32"), nm)
    assert int4.nbytes / dense <= 0.17  # 2 (codes) + 1 (mask) + 0.5 (bf16 scale per 32) bits per weight
    assert int4.nbytes == 256 * 512 // 4 + 256 * 512 // 8 + 256 * 16 * 2


@pytest.mark.parametrize("spec,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_raw_float_formats(spec, dtype):
    fmt = parse_format(spec)
    assert fmt.kind == "raw" and str(fmt) == spec and fmt.granularity == "tensor"
    w = weight((5, 7))
    q = quantize_tensor(w, spec)
    assert torch.equal(dequantize_tensor(q), w.to(dtype).float())
    assert q.nbytes == expected_nbytes(spec, (5, 7)) == 35 * fmt.bits // 8 + 4
    with pytest.raises(ValueError, match="no options"):
        parse_format(f"{spec}:g32")


@pytest.mark.parametrize("numel", [1, 7, 8, 61, 1000])
def test_kept_values_counts_the_first_numel_bits_slice_by_slice(numel):
    g = torch.Generator().manual_seed(numel)
    mask = torch.randint(0, 256, ((numel + 7) // 8,), dtype=torch.uint8, generator=g)  # padding bits set too
    want = int(unpack_bits(mask, 1, numel).sum())
    assert kept_values(mask, numel) == kept_values(mask, numel, step=3) == want
