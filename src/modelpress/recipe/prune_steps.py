"""Pruning recipe steps: `prune` (unstructured / N:M), `prune_channels` (CNN channels), `prune_transformer`
(FFN neurons, heads, blocks) and `recover` (short fine-tuning). Each records what it did for the report."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

from torch import nn

from ..prune import PruneConfig
from ..transforms.prune.channels import ChannelPruneConfig
from ..transforms.prune.transformer import TransformerPruneConfig
from .context import NO_CLI_TRAIN, Context
from .options import build, non_default
from .steps import Step


def _params(model: nn.Module) -> int:
    from ..inspect import inspect

    return inspect(model).total_params


def _bytes(model: nn.Module) -> int:
    from ..evaluate import model_bytes

    return model_bytes(model)


@dataclass(frozen=True)
class _Wrapped(Step):
    """A step whose options are one config dataclass (`config_cls`)."""

    config_cls: ClassVar[type] = object
    config: Any = None

    @classmethod
    def from_options(cls, opts: Mapping[str, Any] | None) -> "Step":
        return cls(build(cls.config_cls, opts, f"recipe step {cls.kind!r}"))

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: non_default(self.config)}


@dataclass(frozen=True)
class PruneStep(_Wrapped):
    """`prune`: PruneConfig options (sparsity or pattern, method, include, exclude, overrides, method_options)."""

    kind: ClassVar[str] = "prune"
    config_cls: ClassVar[type] = PruneConfig

    def run(self, model, ctx: Context):
        from ..prune import prune_, sparsity_summary

        before = _bytes(model)
        prune_(model, self.config, calib=ctx.calib, progress=ctx.progress)
        s = sparsity_summary(model)
        ctx.report(self.kind, method=self.config.method, target=self.config.pattern or self.config.sparsity,
                   sparsity=s["sparsity"], sparse_layers=s["sparse_layers"], bytes_before=before,
                   bytes_after=_bytes(model))
        return model


@dataclass(frozen=True)
class PruneChannelsStep(_Wrapped):
    """`prune_channels`: ChannelPruneConfig options (ratio, importance, include, exclude, round_to, ...)."""

    kind: ClassVar[str] = "prune_channels"
    config_cls: ClassVar[type] = ChannelPruneConfig

    def run(self, model, ctx: Context):
        from ..transforms.prune import prune_channels_

        return _structured(self, model, ctx, prune_channels_, ratio=self.config.ratio)


@dataclass(frozen=True)
class PruneTransformerStep(_Wrapped):
    """`prune_transformer`: TransformerPruneConfig options (ffn, heads, layers, importance, batches)."""

    kind: ClassVar[str] = "prune_transformer"
    config_cls: ClassVar[type] = TransformerPruneConfig

    def run(self, model, ctx: Context):
        from ..transforms.prune import prune_transformer_

        return _structured(self, model, ctx, prune_transformer_)


def _structured(step, model, ctx: Context, prune, **extra):
    """A structured pruning step: prune with the step's config and the context's data, then report what it removed
    and the bytes before and after."""
    before = _bytes(model)
    info = prune(model, step.config, calib=ctx.calib, train=ctx.train, progress=ctx.progress)
    ctx.report(step.kind, importance=step.config.importance, **extra, **info, bytes_before=before,
               bytes_after=_bytes(model))
    return model


@dataclass(frozen=True)
class RecoverStep(Step):
    """`recover`: `steps` optimizer steps at learning rate `lr` on the training data (the task loss) or, without
    it, on the calibration inputs (matching the float reference). data: auto | train | calib."""

    kind: ClassVar[str] = "recover"
    steps: int = 200
    lr: float = 1e-4
    optimizer: str = "adam"
    data: str = "auto"

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"recover steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"recover lr must be > 0, got {self.lr!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"recover optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.data not in ("auto", "train", "calib"):
            raise ValueError(f"recover data must be auto, train or calib, got {self.data!r}")

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: {f.name: getattr(self, f.name) for f in fields(self)}}

    def run(self, model, ctx: Context):
        from ..train.recover import recover_

        use_train = self.data == "train" or (self.data == "auto" and ctx.train)
        batches = ctx.train if use_train else ctx.calib
        if not batches:
            need = f"training data (train=...; {NO_CLI_TRAIN})" if use_train else "calibration data (calib=...)"
            raise ValueError(f"recipe step 'recover' needs {need}")
        stats = recover_(model, batches, steps=self.steps, lr=self.lr, teacher=ctx.reference,
                         optimizer=self.optimizer, progress=ctx.progress, deadline=ctx.deadline)
        ctx.report(self.kind, data="train" if use_train else "calib", **stats)
        return model
