"""Recipe steps of the replacement transforms: `fuse`, `factorize`, `butterfly`, `product_quantize`.

Each step is its transform's frozen config plus `run(model, ctx)`, so the YAML options are the config fields:

    steps:
      - fuse: {}
      - factorize: {ratio: 0.5, method: whiten, include: ["*.intermediate.dense", "*.output.dense"]}
      - butterfly: {ratio: 0.25, finetune_steps: 300}
      - product_quantize: {dim: 4, entries: 256}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..recipe.context import Context
from ..recipe.steps import Step
from .butterfly import ButterflyConfig
from .factorize import FactorizeConfig
from .product_quantize import PQConfig


@dataclass(frozen=True)
class FuseStep(Step):
    """`fuse`: exact fusions (BatchNorm folding, Linear->Linear, Conv->pointwise Conv)."""

    kind: ClassVar[str] = "fuse"
    batchnorm: bool = True
    layers: bool = True
    allow_growth: bool = False
    include: list[str] | None = None
    exclude: list[str] | None = None

    def run(self, model, ctx: Context):
        from .fuse import fuse_

        out = fuse_(model, self.batchnorm, self.layers, self.allow_growth, self.include, self.exclude)
        ctx.report(self.kind, **out)
        return out


@dataclass(frozen=True)
class FactorizeStep(FactorizeConfig, Step):
    """`factorize`: low-rank factorization (FactorizeConfig options); asvd/whiten use the recipe's calib."""

    kind: ClassVar[str] = "factorize"

    def run(self, model, ctx: Context):
        from .factorize import factorize_

        out = factorize_(model, self, calib=ctx.calib, progress=ctx.progress)
        ctx.report(self.kind, **out)
        return out


@dataclass(frozen=True)
class ButterflyStep(ButterflyConfig, Step):
    """`butterfly`: DeBut replacement (ButterflyConfig options), fine-tuned on the recipe's training data, or
    to match the float reference on its calibration inputs."""

    kind: ClassVar[str] = "butterfly"

    def run(self, model, ctx: Context):
        from .butterfly import butterfly_

        out = butterfly_(model, self, calib=ctx.calib, train=ctx.train, teacher=ctx.reference,
                         progress=ctx.progress, deadline=ctx.deadline)
        ctx.report(self.kind, **out)
        return out


@dataclass(frozen=True)
class ProductQuantizeStep(PQConfig, Step):
    """`product_quantize`: PQ of weights (PQConfig options), centroids fine-tuned like `butterfly`."""

    kind: ClassVar[str] = "product_quantize"

    def run(self, model, ctx: Context):
        from .product_quantize import product_quantize_

        out = product_quantize_(model, self, calib=ctx.calib, train=ctx.train, teacher=ctx.reference,
                                progress=ctx.progress, deadline=ctx.deadline)
        ctx.report(self.kind, **out)
        return out
