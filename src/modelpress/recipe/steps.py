"""Recipe steps: a frozen dataclass of options plus `run(model, ctx)`. The registry maps a step's YAML name to
its class ("module:Class", imported on first use), so a lever can live in its own package.

Write a step as:

    @dataclass(frozen=True)
    class PruneStep(Step):
        kind: ClassVar[str] = "prune"
        sparsity: float = 0.5
        def run(self, model, ctx): ...

and add `"prune": "modelpress.<package>.<module>:PruneStep"` to STEPS. `from_options` checks names and types
of the YAML options; `to_dict` writes back the ones that differ from the defaults.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from ..config import QuantConfig
from .context import Context
from .options import build, non_default

STEPS: dict[str, str] = {
    "quantize": "modelpress.recipe.steps:QuantizeStep",
    "fold_bn": "modelpress.recipe.steps:FoldBNStep",
    "equalize": "modelpress.recipe.steps:EqualizeStep",
    "prune": "modelpress.recipe.prune_steps:PruneStep",
    "prune_channels": "modelpress.recipe.prune_steps:PruneChannelsStep",
    "prune_transformer": "modelpress.recipe.prune_steps:PruneTransformerStep",
    "recover": "modelpress.recipe.prune_steps:RecoverStep",
    "fuse": "modelpress.transforms.steps:FuseStep",
    "factorize": "modelpress.transforms.steps:FactorizeStep",
    "butterfly": "modelpress.transforms.steps:ButterflyStep",
    "product_quantize": "modelpress.transforms.steps:ProductQuantizeStep",
    "train": "modelpress.train.step:TrainStep",
    "target": "modelpress.search.target:Target",
    "sensimix": "modelpress.search.sensimix:SensiMix",
}


def get_step(kind: str) -> type:
    if kind not in STEPS:
        raise ValueError(f"unknown recipe step {kind!r}; available steps: {', '.join(STEPS)}")
    mod, _, cls = STEPS[kind].partition(":")
    return getattr(importlib.import_module(mod), cls)


@dataclass(frozen=True)
class Step:
    kind: ClassVar[str] = ""

    def run(self, model: nn.Module, ctx: Context) -> Any:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: non_default(self)}

    @classmethod
    def from_options(cls, opts: Mapping[str, Any] | None) -> "Step":
        return build(cls, opts, f"recipe step {cls.kind!r}")


@dataclass(frozen=True)
class QuantizeStep(Step):
    """`quantize`: QuantConfig options plus the algorithm name and its options."""

    kind: ClassVar[str] = "quantize"
    config: QuantConfig = QuantConfig()
    method: str = "rtn"
    method_options: Mapping[str, Any] | None = None  # the algorithm's Config fields, e.g. {damp: 0.01}

    def __post_init__(self):
        self.method_config()  # validates the method name and its options

    def method_config(self):
        from ..algorithms import get_method

        module, _ = get_method(self.method)
        return build(module.Config, self.method_options, f"method {self.method!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.config.to_dict().items() if v != getattr(QuantConfig, k, None) or k == "weights"}
        d["method"] = self.method
        if self.method_options:
            d["method_options"] = dict(self.method_options)
        return {"quantize": d}

    @classmethod
    def from_options(cls, opts: Mapping[str, Any] | None) -> "QuantizeStep":
        if opts is not None and not isinstance(opts, Mapping):
            raise ValueError(f"options of recipe step 'quantize' must be a mapping, got {opts!r}")
        opts = dict(opts or {})
        method = opts.pop("method", "rtn")
        if not isinstance(method, str):
            raise ValueError(f"option 'method' of recipe step 'quantize' must be a string, got {method!r}")
        method_options = opts.pop("method_options", None)
        if method_options is not None and not isinstance(method_options, Mapping):
            raise ValueError(f"option 'method_options' of recipe step 'quantize' must be a mapping, "
                             f"got {method_options!r}")
        own = tuple(f.name for f in dataclasses.fields(cls) if f.name != "config")  # method, method_options
        return cls(build(QuantConfig, opts, "recipe step 'quantize'", also=own), method, method_options)

    def run(self, model, ctx: Context):
        from ..quantize import quantize_

        return quantize_(model, self.config, calib=ctx.calib, method=self.method_config(), progress=ctx.progress)


@dataclass(frozen=True)
class FoldBNStep(Step):
    """`fold_bn` (no options): fold BatchNorms into the Conv/Linear layers before them."""

    kind: ClassVar[str] = "fold_bn"

    def run(self, model, ctx: Context):
        from ..algorithms.fold_bn import fold_bn_

        return fold_bn_(model)


@dataclass(frozen=True)
class EqualizeStep(Step):
    """`equalize`: cross-layer equalization of consecutive layer pairs (`iterations` sweeps)."""

    kind: ClassVar[str] = "equalize"
    iterations: int = 20

    def __post_init__(self):
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"equalize iterations must be a positive integer, got {self.iterations!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"equalize": {"iterations": self.iterations}}

    def run(self, model, ctx: Context):
        from ..algorithms.equalize import equalize_

        return equalize_(model, iterations=self.iterations)
