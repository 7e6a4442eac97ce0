"""Model transforms that change structure: structured pruning (prune/); operator replacement and fusion: exact
fusions, low-rank factorization, deformable butterfly factors and product quantization. Each file holds its config,
pure tensor functions and a short in-place verb; every verb records what it changed on the model so that `save` /
`load` rebuild the structure."""
from .butterfly import ButterflyConfig, butterfly_
from .factorize import FactorizeConfig, factorize_
from .fuse import fuse_
from .product_quantize import PQConfig, product_quantize_

__all__ = ["fuse_", "factorize_", "FactorizeConfig", "butterfly_", "ButterflyConfig", "product_quantize_",
           "PQConfig"]
