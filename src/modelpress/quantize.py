"""The `quantize_` verb: pick layers, (calibrate activation ranges,) quantize weights, swap modules in place."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .algorithms import ApplyContext, get_method
from .calibrate import as_batches, dry_run, evaluating, observe_inputs
from .config import QuantConfig
from .formats import Format, parse_format
from .hf import mark_quantized
from .quant import QUANT_MODULES, Observer, QuantMixin
from .quant.activation import ActFormat, parse_activation, uint8_params, fp8_scale
from .quant.base import check_float_weight
from .select import lookup, matches_any, selected, set_submodule


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
    obs = observe_inputs(model, static, calib, lambda: Observer(config.act_observer, config.percentile), progress)
    ranges = {}
    for p in plans:
        if p.name in obs:
            lo, hi = obs[p.name].range()
            if p.activations.name == "int8":
                ranges[p.name] = uint8_params(lo, hi)
            else:
                ranges[p.name] = (fp8_scale(torch.maximum(lo.abs(), hi.abs()), p.activations.name), torch.zeros(()))
    return ranges


def _check_model(model: nn.Module, config: QuantConfig) -> None:
    """Errors that would otherwise be silent: a model that is itself a layer (it cannot be swapped in place),
    include patterns that match no module, weights on the meta device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ needs an nn.Module, got {type(model).__name__}")
    if type(model) in QUANT_MODULES:
        raise ValueError(f"the model is itself a {type(model).__name__}: quantize_ swaps layers inside a model in "
                         f"place and cannot replace the model object; wrap it, e.g. nn.Sequential(layer)")
    names = [n for n, _ in model.named_modules() if n]
    if config.include and not any(matches_any(n, config.include) for n in names):
        raise ValueError(f"include pattern(s) {list(config.include)} match no layer of the model (layer names look "
                         f"like {names[:3]})")


def _check_plans(plans: list[LayerPlan]) -> None:
    for p in plans:
        if p.module.weight.is_meta:
            raise ValueError(f"layer {p.name!r} has its weights on the meta device (no data): load real weights "
                             "first (e.g. model.to_empty(device='cpu') then load_state_dict)")
        check_float_weight(p.name, p.module.weight)


def quantize_(model: nn.Module, config: "QuantConfig | str", calib: Iterable[Any] | None = None,
              method: Any = "rtn", progress: Callable[[str, int, int], None] | None = None) -> nn.Module:
    """Quantize the selected layers of `model` in place and return it.

    config: a QuantConfig, or a weight format spec string (`"int4:g32"`). calib: model inputs (a list, or any
    iterable: it is read once) for static activation ranges and for methods that need data; its first batch
    is run through the model before any work. method: an algorithm name (`"rtn"`) or config object.
    Selected layers that cannot be quantized stay float and are listed in one warning. On failure the model is
    left exactly as it was; the float layers are never changed (they are swapped for new modules).
    """
    if isinstance(config, str):
        config = QuantConfig(weights=config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or a format spec string, got {type(config).__name__}")
    algo, algo_config = get_method(method)
    _check_model(model, config)
    plans, skipped = plan_layers(model, config)
    _check_plans(plans)
    static = any(p.activations is not None and p.activations.static for p in plans)
    needs = [why for why, on in (("static activation quantization", static),
                                 (f"method {algo_config.method!r}", getattr(algo_config, "needs_calib", False))) if on]
    if plans and needs:
        if calib is None:
            raise ValueError(f"{' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} calibration data "
                             "(calib=...)")
        calib = as_batches(calib)
        dry_run(model, calib[0])
    training = {p.name: p.module.training for p in plans}
    originals: dict[str, nn.Module] = {}

    def commit(p: LayerPlan, qweight, smooth=None, input_range=None, bias=None) -> nn.Module:
        """Swap layer `p` for its quantized module (weights `qweight`, optional input smoothing vector, optional
        new bias); the float layer is left as it was."""
        kwargs = {"smooth": smooth} if smooth is not None else {}
        qm = QUANT_MODULES[type(p.module)].from_float(p.module, p.weights, p.activations, qweight=qweight, **kwargs)
        if bias is not None:
            dtype = p.module.bias.dtype if p.module.bias is not None else p.module.weight.dtype
            qm.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        rng = input_range if input_range is not None else ranges.get(p.name)
        if rng is not None and p.activations is not None and p.activations.static:
            qm.set_input_range(*rng)
        qm.train(training[p.name])
        originals[p.name] = p.module
        set_submodule(model, p.name, qm)
        if progress:
            progress("quantize", len(originals), len(plans))
        return qm

    ctx = ApplyContext(commit=commit, mse={"auto": None, "minmax": False, "mse": True}[config.weight_observer],
                       progress=progress)
    try:
        with evaluating(model):  # calibration passes see inference behaviour and change no BatchNorm statistics
            ranges = _act_ranges(model, plans, calib, config,
                                 (lambda i: progress("calibrate", i, 0)) if progress else None)
            algo.apply(model, plans, calib, algo_config, ctx)
        missing = [p.name for p in plans if p.name not in originals]
        if missing:
            raise RuntimeError(f"method {algo_config.method!r} left layers unquantized: {missing[:5]}")
    except BaseException:
        for name, m in reversed(list(originals.items())):  # a failure leaves the model as it was
            set_submodule(model, name, m)
        raise
    if originals:
        mark_quantized(model)  # transformers models: save_pretrained refuses them with a clear error
    if skipped:
        listed = "; ".join(f"{n} ({why})" for n, why in skipped)
        warnings.warn(f"{len(skipped)} layer(s) stay float: {listed}", stacklevel=2)
    if not plans:
        warnings.warn("quantize_ selected no layer to quantize (check include/exclude patterns)", stacklevel=2)
    return model
