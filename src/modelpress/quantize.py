"""The `quantize_` verb: pick layers, (calibrate activation ranges,) quantize weights, swap modules in place."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .algorithms import ApplyContext, get_method
from .calibrate import observe_inputs
from .config import QuantConfig
from .formats import Format, parse_format
from .quant import QUANT_MODULES, Observer, QuantMixin
from .quant.activation import ActFormat, parse_activation, uint8_params, fp8_scale
from .quant.base import check_float_weight
from .select import lookup, selected, set_submodule


@dataclass(frozen=True)
class LayerPlan:
    name: str
    module: nn.Module
    weights: Format
    activations: ActFormat | None


def plan_layers(model: nn.Module, config: QuantConfig) -> tuple[list[LayerPlan], list[tuple[str, str]]]:
    """Which layers get which formats, and which selected layers stay float (name, reason)."""
    plans, skipped = [], []
    act = parse_activation(config.activations)
    for name, m in model.named_modules():
        if not name or not selected(name, config.include, config.exclude) or isinstance(m, QuantMixin):
            continue
        spec = lookup(name, config.overrides, config.weights)
        if spec is None and (act is None or (config.overrides and lookup(name, config.overrides, "unset") is None)):
            continue  # nothing asked of this layer, or kept float on purpose by an override
        qcls = QUANT_MODULES.get(type(m))
        if qcls is None:
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2 and not any(True for _ in m.children()):
                skipped.append((name, f"{type(m).__name__} is not a supported layer type"))
            continue
        if spec is None:
            skipped.append((name, "activation-only quantization needs a weight format"))
            continue
        if not torch.is_floating_point(m.weight):
            skipped.append((name, f"weight dtype {m.weight.dtype} is not floating point"))
            continue
        if getattr(m, "max_norm", None) is not None:
            skipped.append((name, "embeddings with max_norm are not supported"))
            continue
        layer_act = act if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) else None
        plans.append(LayerPlan(name, m, parse_format(spec), layer_act))
    return plans, skipped


def _act_ranges(model, plans, calib, config, progress):
    static = {p.name: p.module for p in plans if p.activations is not None and p.activations.static}
    if not static:
        return {}
    bits = parse_activation(config.activations).bits
    obs = observe_inputs(model, static, calib, lambda: Observer(config.act_observer, config.percentile, bits=bits),
                         progress)
    ranges = {}
    for p in plans:
        if p.name in obs:
            lo, hi = obs[p.name].range()
            if p.activations.name.startswith("int"):
                ranges[p.name] = uint8_params(lo, hi, p.activations.bits)
            else:
                ranges[p.name] = (fp8_scale(torch.maximum(lo.abs(), hi.abs()), p.activations.name), torch.zeros(()))
    return ranges


def quantize_(model: nn.Module, config: "QuantConfig | str", calib: Iterable[Any] | None = None,
              method: Any = "rtn", progress: Callable[[str, int, int], None] | None = None) -> nn.Module:
    """Quantize the selected layers of `model` in place and return it.

    config: a QuantConfig, or a weight format spec string (`"int4:g32"`). calib: model inputs for static
    activation ranges and for methods that need data. method: an algorithm name (`"rtn"`) or config object.
    Selected layers that cannot be quantized stay float and are listed in one warning.
    """
    if isinstance(config, str):
        config = QuantConfig(weights=config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or a format spec string, got {type(config).__name__}")
    algo, algo_config = get_method(method)
    plans, skipped = plan_layers(model, config)
    for p in plans:
        check_float_weight(p.name, p.module.weight)
    ranges = _act_ranges(model, plans, calib, config,
                         (lambda i: progress("calibrate", i, 0)) if progress else None)
    originals: dict[str, nn.Module] = {}

    def commit(p: LayerPlan, qweight, smooth=None, input_range=None) -> nn.Module:
        """Swap layer `p` for its quantized module (weights `qweight`, optional input smoothing vector)."""
        kwargs = {"smooth": smooth} if smooth is not None else {}
        qm = QUANT_MODULES[type(p.module)].from_float(p.module, p.weights, p.activations, qweight=qweight, **kwargs)
        rng = input_range if input_range is not None else ranges.get(p.name)
        if rng is not None and p.activations is not None and p.activations.static:
            qm.set_input_range(*rng)
        qm.train(p.module.training)
        originals[p.name] = p.module
        set_submodule(model, p.name, qm)
        if progress:
            progress("quantize", len(originals), len(plans))
        return qm

    ctx = ApplyContext(commit=commit, mse={"auto": None, "minmax": False, "mse": True}[config.weight_observer],
                  progress=progress)
    try:
        algo.apply(model, plans, calib, algo_config, ctx)
        missing = [p.name for p in plans if p.name not in originals]
        if missing:
            raise RuntimeError(f"method {algo_config.method!r} left layers unquantized: {missing[:5]}")
    except BaseException:
        for name, m in originals.items():  # a failure leaves the model as it was
            set_submodule(model, name, m)
        raise
    if skipped:
        listed = "; ".join(f"{n} ({why})" for n, why in skipped)
        warnings.warn(f"{len(skipped)} layer(s) stay float: {listed}", stacklevel=2)
    if not plans:
        warnings.warn("quantize_ selected no layer to quantize (check include/exclude patterns)", stacklevel=2)
    return model
