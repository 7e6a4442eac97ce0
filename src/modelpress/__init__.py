"""modelpress: compress PyTorch models and measure exactly what it cost."""
from .config import QuantConfig
from .recipe import Context, Recipe, load_recipe
from .pipeline import compress
from .formats import Format, bits_per_param, parse_format
from .inspect import inspect, inspect_saved
from .io import dequantize, load, save, save_dequantized
from .io.export import export
from .quant import (QuantConv1d, QuantConv2d, QuantEmbedding, QuantEmbeddingBag, QuantLinear, set_kernels)
from .quantize import quantize_
from .prune import PruneConfig, prune_
from .algorithms.equalize import equalize_
from .algorithms.fold_bn import fold_bn_
from .nn import ButterflyConv2d, ButterflyLinear, LowRankConv, LowRankLinear, PQConv2d, PQLinear
from .transforms import (ButterflyConfig, FactorizeConfig, PQConfig, butterfly_, factorize_, fuse_,
                         product_quantize_)
from .train import DistillConfig, Distiller, QATConfig, convert_, distill_loss, prepare_qat_
from .search.sensimix import SensiMix
from .search.target import Target, TargetError

__version__ = "0.1.0"
__all__ = [
    "quantize_", "prune_", "PruneConfig", "fold_bn_", "equalize_", "compress", "Target", "TargetError", "SensiMix", "Context",
    "Recipe", "load_recipe",
    "QuantConfig", "inspect", "inspect_saved", "save", "load", "export", "dequantize", "save_dequantized",
    "parse_format", "Format", "bits_per_param", "set_kernels",
    "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantEmbeddingBag",
    "fuse_", "factorize_", "FactorizeConfig", "butterfly_", "ButterflyConfig", "product_quantize_", "PQConfig",
    "LowRankLinear", "LowRankConv", "ButterflyLinear", "ButterflyConv2d", "PQLinear", "PQConv2d",
    "prepare_qat_", "convert_", "QATConfig", "DistillConfig", "Distiller", "distill_loss",
]
