"""Bit packing: b-bit codes (b in 1..8) into a little-endian bit stream of bytes, no padding per value.

Codes are uint8 values < 2**b. `n` codes of b bits take ceil(n * b / 8) bytes (plus at most one chunk of
padding: chunks are lcm(8, b) bits, i.e. 3 bytes for 3- and 6-bit codes).
"""
from __future__ import annotations

import math

import torch


def _chunk(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk) for a chunk of lcm(8, bits) bits."""
    nbits = math.lcm(8, bits)
    return nbits // bits, nbits // 8


def packed_nbytes(numel: int, bits: int) -> int:
    per, nbytes = _chunk(bits)
    return -(-numel // per) * nbytes


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (any shape, values < 2**bits) into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1..8 bits per value, got {bits}")
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    if lo < 0 or hi >= 2**bits:  # would spill into the neighbouring codes
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits, got values in [{lo}, {hi}]")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    per, nbytes = _chunk(bits)
    pad = -flat.numel() % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    c = flat.view(-1, per).to(torch.int64)  # [chunks, per]
    shifts = torch.arange(per, dtype=torch.int64, device=c.device) * bits
    word = (c << shifts).sum(-1, dtype=torch.int64)  # [chunks] up to 56 bits (7-bit codes), so int64
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(nbytes)], -1)  # [chunks, nbytes]
    return out.to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `numel` codes as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can unpack 1..8 bits per value, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    need = packed_nbytes(numel, bits)
    if packed.numel() != need:
        raise ValueError(f"{numel} codes of {bits} bits need {need} bytes, got {packed.numel()}")
    if bits == 8:
        return packed[:numel]
    per, nbytes = _chunk(bits)
    if nbytes == 1:  # 1, 2 and 4 bits: whole codes per byte, shifts on uint8 (the hot path of every forward)
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        codes = (packed[:, None] >> shifts) & ((1 << bits) - 1)  # [bytes, per]
        return codes.reshape(-1)[:numel]
    b = packed.view(-1, nbytes).to(torch.int64)
    word = (b << (torch.arange(nbytes, dtype=torch.int64, device=b.device) * 8)).sum(-1, dtype=torch.int64)  # [chunks]
    shifts = torch.arange(per, dtype=torch.int64, device=b.device) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)  # [chunks, per]
    return codes.reshape(-1)[:numel].to(torch.uint8)
