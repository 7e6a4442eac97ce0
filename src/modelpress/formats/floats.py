"""Small floating-point element formats (fp8 e4m3/e5m2, fp6 e3m2/e2m3, fp4 e2m1) as exact code tables.

A code is sign | exponent | mantissa (sign in the top bit). Decoding reads a table of the 2**(b-1)
non-negative magnitudes, which increase with the code. Encoding rounds to the nearest magnitude, ties to
the even code (mantissa LSB 0), and saturates at the largest finite value (OCP MX "satfinite").
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

# name -> (exponent bits, mantissa bits, how the top codes are used)
FLOATS = {
    "fp8_e4m3": (4, 3, "fn"),  # OCP E4M3: no inf, S.1111.111 is NaN, max 448
    "fp8_e5m2": (5, 2, "ieee"),  # IEEE-like: exponent 31 is inf/NaN, max 57344
    "fp6_e3m2": (3, 2, "finite"),  # all codes finite, max 28
    "fp6_e2m3": (2, 3, "finite"),  # max 7.5
    "fp4_e2m1": (2, 1, "finite"),  # {0, .5, 1, 1.5, 2, 3, 4, 6}
}


@lru_cache(maxsize=None)
def _values(name: str) -> tuple[float, ...]:
    """Non-negative finite values of the format, indexed by code (without the sign bit), as Python floats."""
    ebits, mbits, special = FLOATS[name]
    bias = 2 ** (ebits - 1) - 1
    vals = []
    for code in range(2 ** (ebits + mbits)):
        e, m = code >> mbits, code & (2**mbits - 1)
        if e == 0:
            v = m / 2**mbits * 2.0 ** (1 - bias)
        else:
            v = (1 + m / 2**mbits) * 2.0 ** (e - bias)
        vals.append(v)
    if special == "fn":
        vals = vals[:-1]  # top code is NaN
    elif special == "ieee":
        vals = vals[: 2 ** (ebits + mbits) - 2**mbits]  # exponent all-ones is inf/NaN
    return tuple(vals)


def magnitudes(name: str) -> torch.Tensor:
    """Non-negative finite values of the format, indexed by code (without the sign bit); float32."""
    return torch.tensor(_values(name), dtype=torch.float32)


def max_value(name: str) -> float:
    return _values(name)[-1]  # a Python number: no tensor read (traceable)


def emax(name: str) -> int:
    """Exponent of the largest power of two not above the largest normal (OCP MX emax_elem)."""
    return math.frexp(max_value(name))[1] - 1


def _midpoints(name: str, device=None) -> torch.Tensor:
    mags = magnitudes(name).to(device)
    return (mags[1:] + mags[:-1]) / 2


def encode_float(x: torch.Tensor, name: str) -> torch.Tensor:
    """Round float32 values to codes of the format (uint8), nearest with ties to even, saturating."""
    ebits, mbits, _ = FLOATS[name]
    nbits = 1 + ebits + mbits
    x = x.float()
    mids = _midpoints(name, x.device)
    a = x.abs().clamp(max=max_value(name))
    idx = torch.bucketize(a, mids)  # mids[idx-1] < a <= mids[idx]
    tie = (idx < mids.numel()) & (a == mids[idx.clamp(max=mids.numel() - 1)]) & (idx % 2 == 1)
    idx = idx + tie.to(idx.dtype)  # exact tie: move to the even code above
    sign = (x < 0) & (idx > 0)  # no negative zero
    return (idx | (sign.to(idx.dtype) << (nbits - 1))).to(torch.uint8)


def _nonfinite(c: torch.Tensor, e: torch.Tensor, name: str) -> torch.Tensor | None:
    """The NaN/inf codes among int32 codes `c` with exponent fields `e` (None for formats that have none)."""
    ebits, mbits, special = FLOATS[name]
    if special == "finite":
        return None
    nbits = 1 + ebits + mbits
    return (c & (2 ** (nbits - 1) - 1)) == 2 ** (nbits - 1) - 1 if special == "fn" else e == 2**ebits - 1


def nonfinite_codes(codes: torch.Tensor, name: str) -> torch.Tensor | None:
    """Which codes (uint8) are NaN/inf in format `name` (quantization never stores them; a damaged file may), or None
    for formats without such codes."""
    ebits, mbits, _ = FLOATS[name]
    c = codes.to(torch.int32)
    return _nonfinite(c, (c >> mbits) & (2**ebits - 1), name)


def decode_float(codes: torch.Tensor, name: str) -> torch.Tensor:
    """Codes (uint8) back to float32 values, computed from the bits (no table lookup: the same graph on every device
    and under torch.export / torch.compile). NaN/inf codes are never produced; eager calls reject them."""
    ebits, mbits, special = FLOATS[name]
    nbits = 1 + ebits + mbits
    c = codes.to(torch.int32)
    e = (c >> mbits) & (2**ebits - 1)
    m = c & (2**mbits - 1)
    bias = 2 ** (ebits - 1) - 1
    mant = torch.where(e > 0, m + 2**mbits, m).float()  # subnormals have no implicit leading 1
    exp = torch.where(e > 0, e, torch.ones_like(e)) - (bias + mbits)  # value = mant * 2**exp, exp >= -17
    v = mant * ((exp + 127) << 23).view(torch.float32)  # 2**exp built from its float32 bits: exact
    bad = _nonfinite(c, e, name)
    if bad is not None:
        if not torch.compiler.is_compiling() and not c.is_meta and bool(bad.any()):
            raise ValueError(f"codes outside the finite range of {name} (NaN/inf codes are never produced)")
        v = torch.where(bad, torch.full_like(v, float("nan")), v)
    return torch.where((c >> (nbits - 1)) & 1 == 1, -v, v)
