"""Replacement layers: factorized (low-rank), deformable butterfly and product-quantized modules.

Each is a small nn.Module that stores only what it needs (two thin layers, the nonzero blocks of the butterfly
factors, packed codebook indices + a codebook), answers `.weight` with its dense equivalent, and turns back into
a plain torch layer with `to_float()` (what `mp.dequantize` uses). The transforms that create them live in
`modelpress.transforms`.
"""
from .butterfly import ButterflyConv2d, ButterflyLinear
from .factorized import LowRankConv, LowRankLinear, float_weight
from .pq import PQConv2d, PQLinear

__all__ = ["LowRankLinear", "LowRankConv", "ButterflyLinear", "ButterflyConv2d", "PQLinear", "PQConv2d",
           "float_weight"]
