"""Bit packing: round trip and byte counts for 1..8 bits, the exact little-endian layout, and input checks."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.formats import pack_bits, packed_nbytes, unpack_bits


def chunk(bits):
    """(codes, bytes) in one packing chunk of lcm(8, bits) bits."""
    n = math.lcm(8, bits)
    return n // bits, n // 8


def reference_pack(codes, bits):
    """Plain little-endian bit stream: code i occupies bits [i*bits, (i+1)*bits), zero padded to packed_nbytes."""
    stream = sum(int(c) << (i * bits) for i, c in enumerate(codes))
    return list(stream.to_bytes(packed_nbytes(len(codes), bits), "little"))


def check(codes, bits):
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_bits(t, bits)
    n = len(codes)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, bits)
    tight = -(-n * bits // 8)  # ceil(n * bits / 8)
    assert tight <= packed.numel() < tight + chunk(bits)[1]
    if n % chunk(bits)[0] == 0:
        assert packed.numel() == tight
    assert packed.tolist() == reference_pack(codes, bits)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8 and out.tolist() == list(codes)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, 2**b - 1), max_size=200))))
def test_round_trip_property(case):
    bits, codes = case
    check(codes, bits)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", range(18))
def test_round_trip_small_lengths(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g).tolist()
    check(codes, bits)
    check([2**bits - 1] * n, bits)  # all ones: catches overflow between neighbours


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_long_and_shaped(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 3, 41), generator=g, dtype=torch.uint8)  # 861 codes, not a chunk multiple
    packed = pack_bits(codes, bits)
    assert packed.numel() == packed_nbytes(codes.numel(), bits)
    assert torch.equal(unpack_bits(packed, bits, codes.numel()), codes.reshape(-1))
    wide = codes.to(torch.int32)  # any integer dtype holding valid codes packs the same
    assert torch.equal(pack_bits(wide, bits), packed)


def test_packed_nbytes_table():
    assert [packed_nbytes(n, 4) for n in (0, 1, 2, 3, 64)] == [0, 1, 1, 2, 32]
    assert [packed_nbytes(n, 3) for n in (0, 1, 8, 9, 16)] == [0, 3, 3, 6, 6]
    assert [packed_nbytes(n, 1) for n in (0, 1, 8, 9)] == [0, 1, 1, 2]
    assert [packed_nbytes(n, 8) for n in (0, 5)] == [0, 5]
    assert packed_nbytes(8, 5) == 5 and packed_nbytes(8, 7) == 7 and packed_nbytes(4, 6) == 3


def test_4bit_two_per_byte_low_nibble_first():
    packed = pack_bits(torch.tensor([0x1, 0x2, 0xA, 0xF, 0x7], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x21, 0xFA, 0x07]


def test_3bit_eight_values_in_three_bytes():
    codes = [1, 2, 3, 4, 5, 6, 7, 0]
    packed = pack_bits(torch.tensor(codes, dtype=torch.uint8), 3)
    assert packed.numel() == 3
    word = sum(c << (3 * i) for i, c in enumerate(codes))
    assert packed.tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert pack_bits(torch.tensor([7] * 8, dtype=torch.uint8), 3).tolist() == [0xFF] * 3


def test_1bit_lsb_first_and_8bit_identity():
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0x81, 0x01]
    c = torch.tensor([0, 255, 17], dtype=torch.uint8)
    assert torch.equal(pack_bits(c, 8), c)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="1..8 bits"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="1..8 bits"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_unpack_wrong_size():
    packed = pack_bits(torch.zeros(10, dtype=torch.uint8), 4)  # 5 bytes
    for bad in (packed[:-1], torch.cat([packed, packed[:1]])):
        with pytest.raises(ValueError, match="need 5 bytes"):
            unpack_bits(bad, 4, 10)
    with pytest.raises(ValueError, match="need 6 bytes"):
        unpack_bits(pack_bits(torch.zeros(8, dtype=torch.uint8), 3), 3, 9)  # 9 codes need a second chunk


@pytest.mark.parametrize("packed", [torch.zeros(5, dtype=torch.int8), torch.zeros(5, dtype=torch.int32),
                                    torch.zeros(5, dtype=torch.float32), torch.zeros(1, 5, dtype=torch.uint8)])
def test_unpack_wrong_dtype_or_rank(packed):
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bits(packed, 4, 10)


@pytest.mark.parametrize("codes, bits", [([0, 16], 4), ([8], 3), ([2], 1), ([-1], 4), ([256], 8)])
def test_pack_out_of_range_codes(codes, bits):
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor(codes, dtype=torch.int32), bits)


def test_pack_float_codes():
    with pytest.raises(ValueError, match="integer tensor"):
        pack_bits(torch.tensor([1.0, 2.0]), 4)
