"""The `quantize_` verb: pick layers, (calibrate activation ranges,) quantize weights, swap modules in place."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .algorithms import ApplyContext, get_method
from .calibrate import as_batches, dry_run, evaluating, observe_inputs
from .config import QuantConfig
from .formats import quantize_tensor
from .plan import LayerPlan, plan_layers
from .quant import Observer, QuantLinear, QuantMixin, quant_class
from .quant.activation import fp8_scale, parse_activation, uint8_params
from .quant.base import check_float_weight
from .quant.kernels import note_model
from .quant.qat import refuse_qat
from .select import matches_any, set_submodule


def _act_ranges(model, plans, calib, config, progress):
    static = {p.name: p.module for p in plans if p.activations is not None and p.activations.static}
    if not static:
        return {}
    bits = parse_activation(config.activations).bits
    obs = observe_inputs(model, static, calib, lambda: Observer(config.act_observer, config.percentile, bits=bits),
                         progress)
    unseen = [n for n in static if obs[n].lo is None]
    if unseen:
        raise ValueError(f"layer(s) {', '.join(unseen[:5])} never ran on the calibration data, so their static input "
                         "ranges cannot be measured: give data that runs them, or exclude them (or quantize their "
                         "activations dynamically)")
    ranges = {}
    for p in plans:
        if p.name in obs:
            lo, hi = obs[p.name].range()
            if p.activations.name.startswith("int"):
                ranges[p.name] = uint8_params(lo, hi, p.activations.bits)
            else:
                ranges[p.name] = (fp8_scale(torch.maximum(lo.abs(), hi.abs()), p.activations.name), torch.zeros(()))
    return ranges


def _check_model(model: nn.Module, config: QuantConfig) -> None:
    """Errors that would otherwise be silent: a model that is itself a layer (it cannot be swapped in place),
    include patterns that match no module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ needs an nn.Module, got {type(model).__name__}")
    if quant_class(model) is not None:
        raise ValueError(f"the model is itself a {type(model).__name__}: quantize_ swaps layers inside a model in "
                         f"place and cannot replace the model object; wrap it, e.g. nn.Sequential(layer)")
    refuse_qat(model, "quantize_", config.include, config.exclude)
    names = [n for n, _ in model.named_modules() if n]
    if config.include and not any(matches_any(n, config.include) for n in names):
        raise ValueError(f"include pattern(s) {list(config.include)} match no layer of the model (layer names look "
                         f"like {names[:3]})")


def _check_plans(plans: list[LayerPlan]) -> None:
    for p in plans:
        for n, w in p.qcls.float_weights(p.layer).items():
            name = p.name if n == "weight" else f"{p.name}.{n}"
            if w.is_meta:
                raise ValueError(f"layer {name!r} has its weights on the meta device (no data): load real weights "
                                 "first (e.g. model.to_empty(device='cpu') then load_state_dict)")
            check_float_weight(name, w)


def quantize_(model: nn.Module, config: "QuantConfig | str", calib: Iterable[Any] | None = None,
              method: Any = "rtn", progress: Callable[[str, int, int], None] | None = None) -> nn.Module:
    """Quantize the selected layers of `model` in place and return it.

    config: a QuantConfig, or a weight format spec string (`"int4:g32"`). calib: model inputs (a list, or any
    iterable: it is read once) for static activation ranges and for methods that need data; its first batch
    is run through the model before any work. method: an algorithm name (`"rtn"`) or config object.
    Selected layers that cannot be quantized stay float and are listed in one warning, with anything else
    the user should know (layers quantized weight-only, tied weights stored once per user). Layers whose
    weights are tied are quantized once and share their packed weights (see modelpress.plan).
    MultiheadAttention input projections and LSTM/GRU/RNN weights are quantized weight-only by round-to-nearest
    whatever the method (the calibration runner does not see their inputs). On failure the model is left
    exactly as it was; the float layers are never changed (they are swapped for new modules).
    """
    if isinstance(config, str):
        config = QuantConfig(weights=config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or a format spec string, got {type(config).__name__}")
    algo, algo_config = get_method(method)
    _check_model(model, config)
    plans, skipped, notes = plan_layers(model, config)
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
    training = {p.name: p.layer.training for p in plans}
    ranges: dict = {}
    originals: dict[str, nn.Module] = {}
    followers: dict[str, list[LayerPlan]] = {}
    for p in plans:
        if p.tied_to is not None:
            followers.setdefault(p.tied_to, []).append(p)
    mse = {"auto": None, "minmax": False, "mse": True}[config.weight_observer]

    def commit(p: LayerPlan, qweight, smooth=None, input_range=None, bias=None) -> nn.Module:
        """Swap layer `p` for its quantized module (weights `qweight`, optional input smoothing vector, optional
        new bias); layers tied to it get the same packed weight. The float layer is left as it was."""
        if p.mask is not None:  # a pruned layer stays sparse: bitmask + the kept codes, pruned values zero
            from .formats.sparse import sparsify

            qweight = sparsify(qweight, p.mask)
        kwargs = {"smooth": smooth} if smooth is not None else {}
        qm = p.qcls.from_float(p.module, p.weights, p.activations, qweight=qweight, **kwargs)
        if bias is not None:
            b = getattr(p.module, "bias", None)
            qm.bias = nn.Parameter(bias.detach().to(b.dtype if b is not None else p.module.weight.dtype).clone(),
                                   requires_grad=False)
        rng = input_range if input_range is not None else ranges.get(p.name)
        if rng is not None and p.activations is not None and p.activations.static:
            qm.set_input_range(*rng)
        qm.train(training[p.name])
        originals[p.name] = p.layer
        set_submodule(model, p.name, qm)
        if progress:
            progress("quantize", len(originals), len(plans))
        for f in followers.get(p.name, ()):
            if smooth is None or issubclass(f.qcls, QuantLinear):
                commit(f, qweight, smooth)  # the same tensors: one stored copy
            else:  # a smoothed weight (AWQ) cannot serve a layer that takes no smoothing vector
                notes.append(f"the tied weight of {p.name} and {f.name} is stored twice ({p.name} was smoothed)")
                commit(f, quantize_tensor(f.module.weight.detach(), f.weights, mse=mse))
        return qm

    ctx = ApplyContext(commit=commit, mse=mse, progress=progress)
    try:
        for p in plans:
            if p.standin:
                set_submodule(model, p.name, p.module)  # transformers' Conv1D as a Linear, pruned layers as float
        with evaluating(model):  # calibration passes see inference behaviour and change no BatchNorm statistics
            ranges.update(_act_ranges(model, plans, calib, config,
                                      (lambda i: progress("calibrate", i, 0)) if progress else None))
            for p in plans:  # several matrices each (attention, recurrent layers): round-to-nearest, first
                if p.multi_weight:
                    commit(p, {n: quantize_tensor(w.detach(), p.weights, mse=mse)
                               for n, w in p.qcls.float_weights(p.layer).items()})
            algo.apply(model, [p for p in plans if not p.multi_weight and p.tied_to is None], calib, algo_config, ctx)
        missing = [p for p in plans if p.name not in originals and p.tied_to is None]
        for p in missing:  # never ran on the calibration data (an unused head, MultiheadAttention's out_proj, whose
            # weight the attention reads itself): nothing to weigh errors by, so round-to-nearest, said
            commit(p, quantize_tensor(p.module.weight.detach(), p.weights, mse=mse))
        if missing:
            names = [p.name for p in missing]
            notes.append(f"{len(names)} layer(s) never ran on the calibration data and got round-to-nearest instead "
                         f"of {algo_config.method}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    except BaseException:
        undo = {p.name: p.layer for p in plans if p.standin}
        undo.update(originals)
        for name, m in undo.items():  # a failure leaves the model as it was
            set_submodule(model, name, m)
        raise
    if originals:  # (set_submodule marked a transformers model: its save_pretrained refuses with what to do)
        note_model(model)  # the speed guard times each layer as this model's weights reach it
    _warn(model, plans, skipped, notes)
    return model


def _warn(model: nn.Module, plans: list[LayerPlan], skipped: list[tuple[str, str]], notes: list[str]) -> None:
    parts = []
    if skipped:
        parts.append(f"{len(skipped)} layer(s) stay float: " + "; ".join(f"{n} ({why})" for n, why in skipped))
    parts.extend(notes)
    if parts:
        warnings.warn(". ".join(parts), stacklevel=3)
    if not plans:
        done = sum(isinstance(m, QuantMixin) and m.weight_format.kind != "raw" for m in model.modules())
        warnings.warn(f"quantize_ selected no layer to quantize: the {done} quantized layer(s) are quantized already "
                      "(quantize_ starts from float layers: mp.dequantize first to quantize again)" if done else
                      "quantize_ selected no layer to quantize (check include/exclude patterns)", stacklevel=3)
