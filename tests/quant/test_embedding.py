"""QuantEmbedding / QuantEmbeddingBag: exactly F.embedding / F.embedding_bag over the dequantized table."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.formats import dequantize_rows, expected_nbytes, grid, parse_format
from modelpress.formats.packing import _chunk
from modelpress.quant import QuantEmbedding, QuantEmbeddingBag

V = 50
# format -> embedding dim. int3 packs 8 codes in 3 bytes: dim 20 does not end a row on a chunk boundary, which
# sends dequantize_rows to its decode-everything fallback; int3 with dim 16 and the others take the row path.
FORMATS = [("int8", 20), ("int4:g32", 40), ("int4", 24), ("int4", 15), ("int3", 20), ("int3", 16), ("nvfp4", 20),
           ("int2:g16:asym", 20)]
IDS = [f"{f}-d{d}" for f, d in FORMATS]


def row_codes_on_chunk_boundary(fmt, dim):
    _, groups, g = grid(parse_format(fmt), (V, dim))
    return (groups * g) % _chunk(parse_format(fmt).bits)[0] == 0


def test_formats_cover_both_row_decoding_paths():
    paths = {row_codes_on_chunk_boundary(f, d) for f, d in FORMATS}
    assert paths == {True, False}
    assert not row_codes_on_chunk_boundary("int3", 20) and not row_codes_on_chunk_boundary("int4", 15)


def indices(seed=0, n=40, pad=None):
    idx = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))
    if pad is not None:
        idx[::6] = pad
    return idx


@pytest.mark.parametrize("fmt,dim", FORMATS, ids=IDS)
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_equals_lookup_of_dequantized_table(fmt, dim, padding_idx):
    torch.manual_seed(0)
    emb = nn.Embedding(V, dim, padding_idx=padding_idx)
    q = QuantEmbedding.from_float(emb, fmt)
    w = q.dequantized_weight()
    for idx in (indices(pad=padding_idx), indices(1).reshape(4, 10), torch.tensor([V - 1, 0, V - 1]),
                torch.tensor(7), torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)):
        y = q(idx)
        assert y.shape == (*idx.shape, dim) and y.dtype == torch.float32
        assert torch.equal(y, F.embedding(idx, w, padding_idx=padding_idx))
    if padding_idx is not None:  # nn.Embedding zeroes the padding row; zero quantizes exactly
        assert torch.equal(q(torch.tensor([padding_idx])), torch.zeros(1, dim))


BAGS = [  # (mode, padding_idx, include_last_offset, per_sample_weights)
    ("sum", None, False, False), ("mean", None, False, False), ("max", None, False, False),
    ("sum", None, False, True), ("sum", 3, False, True), ("mean", 3, False, False), ("max", 3, False, False),
    ("sum", None, True, False), ("mean", 3, True, False), ("max", None, True, False), ("sum", 3, True, True),
]


@pytest.mark.parametrize("fmt,dim", FORMATS, ids=IDS)
@pytest.mark.parametrize("mode,padding_idx,last,psw", BAGS)
def test_embedding_bag_equals_bag_of_dequantized_table(fmt, dim, mode, padding_idx, last, psw):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(V, dim, mode=mode, padding_idx=padding_idx, include_last_offset=last)
    q = QuantEmbeddingBag.from_float(bag, fmt)
    w = q.dequantized_weight()
    idx = indices(pad=padding_idx)
    offsets = torch.tensor([0, 5, 5, 17, 30] + ([40] if last else []))  # bag 1 is empty
    weights = torch.rand(40, generator=torch.Generator().manual_seed(2)) if psw else None
    y = q(idx, offsets, weights)
    ref = F.embedding_bag(idx, w, offsets, mode=mode, per_sample_weights=weights, include_last_offset=last,
                          padding_idx=padding_idx)
    assert y.shape == (5, dim)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_fixed_size_bags_and_empty_batch(mode):
    torch.manual_seed(0)
    q = QuantEmbeddingBag.from_float(nn.EmbeddingBag(V, 16, mode=mode), "int4:g32")
    w = q.dequantized_weight()
    idx = indices().reshape(8, 5)  # 2-D input: one bag per row, no offsets
    assert torch.equal(q(idx), F.embedding_bag(idx, w, mode=mode))
    empty, offsets = torch.zeros(0, dtype=torch.long), torch.tensor([0, 0, 0])
    assert torch.equal(q(empty, offsets), F.embedding_bag(empty, w, offsets, mode=mode))


@pytest.mark.parametrize("fmt,dim", FORMATS, ids=IDS)
def test_scales_are_row_wise_and_bytes_match(fmt, dim):
    q = QuantEmbedding.from_float(nn.Embedding(V, dim), fmt)
    sd = q.state_dict()
    f = parse_format(fmt)
    _, groups, _ = grid(f, (V, dim))
    assert sd["weight_scale"].shape == (V, groups)  # one scale per row (or per group within a row)
    assert sd["weight_codes"].dtype == torch.uint8
    assert sum(t.nbytes for t in sd.values()) == expected_nbytes(fmt, (V, dim))


def test_int4_table_bytes():
    sd = QuantEmbedding.from_float(nn.Embedding(64, 16), "int4").state_dict()  # 1024 values
    assert sd["weight_codes"].nbytes == 512 and sd["weight_scale"].shape == (64, 1)


def test_rows_differ_in_scale():
    """Row-wise scales: a row 1000x larger than the others does not cost the others their precision."""
    torch.manual_seed(0)
    emb = nn.Embedding(V, 32)
    with torch.no_grad():
        emb.weight[0] *= 1000
    q = QuantEmbedding.from_float(emb, "int8")
    rest = torch.arange(1, V)
    err = (q(rest) - emb(rest)).abs().max() / emb(rest).abs().max()
    assert err < 1 / 127


@pytest.mark.parametrize("cls,qcls", [(nn.Embedding, QuantEmbedding), (nn.EmbeddingBag, QuantEmbeddingBag)])
def test_unsupported_options_raise(cls, qcls):
    with pytest.raises(ValueError, match="max_norm"):
        qcls.from_float(cls(V, 8, max_norm=1.0), "int8")
    with pytest.raises(ValueError, match="activation"):
        qcls.from_float(cls(V, 8), "int8", act="int8")


def test_empty_like_then_load():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(V, 20, mode="mean")
    src = QuantEmbeddingBag.from_float(bag, "nvfp4")
    dst = QuantEmbeddingBag.empty_like(bag, "nvfp4")
    dst.load_state_dict(src.state_dict())
    idx, offsets = indices(), torch.tensor([0, 9, 22])
    assert torch.equal(dst(idx, offsets), src(idx, offsets))


@pytest.mark.parametrize("fmt", ["int8", "int4:g16"])
@pytest.mark.parametrize("bag", [False, True])
def test_speed_mode_table_equals_row_decoding_and_follows_writes(fmt, bag):
    import modelpress as mp
    from modelpress.quant import kernels

    torch.manual_seed(0)
    f = nn.EmbeddingBag(50, 16, mode="sum", padding_idx=3) if bag else nn.Embedding(50, 16, padding_idx=3)
    q = mp.quantize_(nn.Sequential(f), mp.QuantConfig(weights=fmt))
    idx = torch.randint(0, 50, (6, 5))
    idx[0, 0] = 3
    ref = q(idx)
    mp.set_kernels(q, True, mode="speed")
    assert torch.equal(q(idx), ref)
    row = kernels.describe(q[0])
    assert row[0]["path"] == "dense table" and row[0]["extra_bytes"] == 50 * 16 * 4
    with pytest.raises(IndexError):
        q(torch.tensor([[-1, 2]]))
    q[0].weight_codes.copy_(q[0].weight_codes.flip(0))  # an in-place write: the decoded table is rebuilt
    mp.set_kernels(q, True, mode="memory")
    ref2 = q(idx)
    mp.set_kernels(q, True, mode="speed")
    q(idx)
    q[0].weight_scale.mul_(2)
    fast = q(idx)
    assert not torch.equal(fast, ref2)
    assert torch.equal(fast, mp.set_kernels(q, False)(idx))  # the rebuilt table == decoding the written buffers


@pytest.mark.parametrize("fmt,dim", [("int8", 200), ("int4:g32", 200), ("int4:g32:asym", 200), ("int4:g16", 16),
                                     ("int4", 16), ("int4", 15), ("int2:g16:asym", 40), ("int2:g8", 24), ("int4:g128:asym", 200),
                                     ("fp8_e4m3", 40), ("fp4_e2m1:g32", 40), ("mxfp4", 64), ("mxint8", 64), ("nvfp4", 48)])
def test_memory_mode_native_row_decoding_is_exact(fmt, dim):
    """Memory mode decodes the looked-up rows with the native kernel where it has one (int8 / int4 rows): the same
    values as the reference decoding, the same IndexError for an id outside the table."""
    from modelpress.quant import kernels
    from modelpress.quant.kernels import build

    if build.load() is None:
        pytest.skip("no native build on this machine")
    torch.manual_seed(0)
    q = QuantEmbeddingBag.from_float(nn.EmbeddingBag(300, dim, mode="sum"), fmt)
    idx = torch.randint(0, 300, (64,))
    offsets = torch.arange(0, 64, 4)
    ref_rows = dequantize_rows(q.qweight, idx, torch.float32)
    native_rows = kernels.table_rows(q, idx)
    assert native_rows is not None and q._kernel_cache["native-rows"] is not False  # the native path ran
    assert torch.equal(native_rows, ref_rows)
    y = q(idx, offsets)
    assert kernels.describe(q)[0]["path"] == "native decode (lookups)"  # what inspect shows
    q.use_kernels = False
    assert torch.equal(y, q(idx, offsets))
    q.use_kernels = True
    for bad in (torch.tensor([0, 300]), torch.tensor([-1, 2])):
        assert kernels.table_rows(q, bad) is None
        with pytest.raises(IndexError):
            q(bad, torch.tensor([0]))


def test_tables_the_native_decoder_leaves_to_the_reference():
    """Formats the native decoder does not read (3- and 6-bit codes straddle bytes): reference decoding."""
    from modelpress.quant import kernels

    for fmt, dim in (("int3", 16), ("mxfp6", 32)):
        q = QuantEmbeddingBag.from_float(nn.EmbeddingBag(30, dim, mode="sum"), fmt)
        assert kernels.table_rows(q, torch.tensor([1, 2])) is None
        idx = torch.tensor([1, 2, 29])
        assert torch.equal(q(idx, torch.tensor([0, 1])),
                           F.embedding_bag(idx, q.dequantized_weight(), torch.tensor([0, 1]), mode="sum"))


@pytest.mark.parametrize("fmt,dim", [("int8", 32), ("int8", 24), ("int8", 20), ("int4:g16:asym", 32), ("nvfp4", 32),
                                     ("int4:g32", 32), ("int4:g32:asym", 16), ("int4:g128:asym", 64), ("nvfp4", 16),
                                     ("mxfp4", 32), ("fp4_e2m1:g32", 32), ("int4", 32), ("int4:asym", 32),
                                     ("int2:g8", 16)])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_native_bags_match_the_bag_of_decoded_rows(fmt, dim, mode):
    """Memory-mode bags decoded and summed natively: 1-D ids with offsets (with and without the closing offset,
    empty bags included), 2-D fixed-size bags, int32 ids and offsets: the reference's numbers, bit for bit; offsets
    that torch refuses are refused the same way (the reference path raises). int8 rows of 24 / 32 values take the
    8-lane loops on x86, rows of 20 the portable ones; 4-bit rows of one group and a multiple of 16 values (int4:g32
    at 32, nvfp4 at 16, ...) the 16-column register loops, those of several groups the generic one."""
    from modelpress.quant import kernels
    from modelpress.quant.kernels import build

    if build.load() is None:
        pytest.skip("no native build on this machine")
    torch.manual_seed(0)
    for last in (False, True):
        bag = nn.EmbeddingBag(V, dim, mode=mode, include_last_offset=last)
        q = QuantEmbeddingBag.from_float(bag, fmt)
        if "fp4" in fmt:  # E2M1 code 8 is -0 (columns 0 and 1 of every row): the reference's sum from +0 gives +0
            q.weight_codes.view(V, -1)[:, 0] = 0x88
        w = q.dequantized_weight()
        idx = indices(n=40)
        assert torch.equal(kernels.table_rows(q, idx).view(torch.int32), w[idx].view(torch.int32))
        offsets = torch.tensor([0, 5, 5, 6, 17, 30] + ([40] if last else []))  # bags of 5, 0, 1, 11, 13 (, 10) ids
        for i, o in ((idx, offsets), (idx.int(), offsets.int()), (idx.reshape(8, 5), None)):
            assert kernels.table_bags(q, i, o, None) is not None
            ref = F.embedding_bag(i, w, o, mode=mode, include_last_offset=last)
            assert torch.equal(q(i, o).view(torch.int32), ref.view(torch.int32))  # bit for bit, signs of zeros too
        # bags of one id: symmetric 4- and 2-bit rows with a negative scale decode a code of 0 to -0, which the
        # reference's sum from +0 turns into +0
        every = torch.arange(V)
        offs = torch.arange(V + 1) if last else every
        assert kernels.table_bags(q, every, offs, None) is not None
        ref = F.embedding_bag(every, w, offs, mode=mode, include_last_offset=last)
        assert torch.equal(q(every, offs).view(torch.int32), ref.view(torch.int32))
        if last:  # a closing offset short of the ids: torch's mean divides the last bag by ids it did not sum
            assert kernels.table_bags(q, every, every, None) is None  # left to the reference, torch's own bag
            ref = F.embedding_bag(every, w, every, mode=mode, include_last_offset=last)
            assert torch.equal(q(every, every).view(torch.int32), ref.view(torch.int32))
        with pytest.raises((RuntimeError, ValueError)):
            F.embedding_bag(idx, w, torch.tensor([1, 5]), mode=mode, include_last_offset=last)
        assert kernels.table_bags(q, idx, torch.tensor([1, 5]), None) is None
        with pytest.raises((RuntimeError, ValueError)):
            q(idx, torch.tensor([1, 5]))
