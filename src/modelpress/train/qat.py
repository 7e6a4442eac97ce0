"""Quantization-aware training: `prepare_qat_(model, QuantConfig, QATConfig)` swaps the layers `quantize_` would
pick for fake-quant QAT layers (modelpress.quant.qat); train with any loop; `convert_(model)` swaps them for the
packed layers, whose outputs are bit-identical to the fake-quant forward (on the reference path).

QATConfig chooses how scales and ranges are found and which training-time method runs:
- scales: `auto` (learned where the format allows, else dynamic) | `dynamic` | `frozen` | `learned` (LSQ); act_ranges: `ema` (min/max moving average) | `minmax` |
  `granular` (Granular EMA: per-sample percentiles) | `frozen` (calibrated observer) | `learned`;
- method: `plain`, `quantnoise` (each step a random `noise_rate` share of each weight's blocks is quantized, the
  rest stays float) or `fst` (two-level bit width: that share at the layer's format, the rest at `high_weights`);
- `fat`: frequency-aware transformation (a learned per-frequency scaling in the DCT domain before the grid);
- `sensimix`: for int1 layers, abs-mean scaling (the int1 format's scale) and a straight-through gradient clipped
  to |w| <= `ste_clip`, plus the optional `abwr` regularizer (see `abwr_penalty`);
- `nnac_clusters` > 0: NNAC per-cluster static activation ranges (modelpress.quant.nnac), needs calib;
- `init`: start from a post-training method's codes and scales (e.g. "gptq", with calib) instead of the float
  weights: the latent weights are set to the method's dequantized weights, the scales to its scales (and the
  input smoothing vector of AWQ / SmoothQuant is kept: the layer divides its inputs by it, as QuantLinear does).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..algorithms import METHODS as ALGORITHMS
from ..calibrate import as_batches, call_model, evaluating
from ..config import QuantConfig
from ..formats import parse_format
from ..quant import QUANT_MODULES, Observer
from ..quant.kernels import note_model
from ..quant.base import check_float_weight
from ..quant.qat import QAT_MODULES, QATMixin, refuse_qat
from ..quant.qat_quantizers import RANGES, SCALES, ActFakeQuant, FrequencyTransform, WeightFakeQuant
from ..plan import plan_layers
from ..select import set_submodule
from ..quant.fake_quant import to_grid

METHODS = ("plain", "quantnoise", "fst")


@dataclass(frozen=True)
class QATConfig:
    """How QAT layers find their scales and ranges, and which training-time method they use."""

    scales: str = "auto"  # "learned" (LSQ) for int / float formats, "dynamic" for MX / NVFP4
    act_ranges: str = "ema"
    momentum: float = 0.9  # of the range moving averages
    granular_percentile: float = 99.9  # per-sample percentile of the Granular EMA
    ste: str = "clip"  # "clip": no gradient where values are clipped; "identity"
    method: str = "plain"
    noise_rate: float = 0.5  # QuantNoise / FST: share of blocks at the layer's format in each training step
    noise_block: int = 8  # columns per block
    high_weights: str = "int8"  # FST: format of the other blocks
    fat: bool = False
    sensimix: bool = True  # int1 layers: abs-mean scale + clipped straight-through gradient
    ste_clip: float = 1.0
    abwr: float = 0.0  # weight of SensiMix's absolute binary weight regularizer (train step)
    nnac_clusters: int = 0
    nnac_feature: str | None = None  # layer whose output is clustered (default: the first selected layer)
    init: str = "float"  # or a post-training method ("gptq", "awq", "hqq", ...) whose codes and scales QAT starts from
    seed: int = 0

    def __post_init__(self):
        if self.scales not in ("auto",) + SCALES:
            raise ValueError(f"scales must be one of {('auto',) + SCALES}, got {self.scales!r}")
        if self.act_ranges not in RANGES:
            raise ValueError(f"act_ranges must be one of {RANGES}, got {self.act_ranges!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0 <= self.noise_rate <= 1:
            raise ValueError(f"noise_rate must be in [0, 1], got {self.noise_rate}")
        if self.noise_block < 1:
            raise ValueError(f"noise_block must be >= 1, got {self.noise_block}")
        if not 0 < self.momentum < 1:
            raise ValueError(f"momentum must be in (0, 1), got {self.momentum}")
        if not 50 < self.granular_percentile <= 100:
            raise ValueError(f"granular_percentile must be in (50, 100], got {self.granular_percentile}")
        if self.ste not in ("clip", "identity"):
            raise ValueError(f"ste must be 'clip' or 'identity', got {self.ste!r}")
        if self.nnac_clusters < 0:
            raise ValueError(f"nnac_clusters must be >= 0, got {self.nnac_clusters}")
        if not 0 < self.ste_clip < float("inf"):
            raise ValueError(f"ste_clip must be > 0 and finite, got {self.ste_clip}")
        if not 0 <= self.abwr < float("inf"):
            raise ValueError(f"abwr must be >= 0 and finite, got {self.abwr}")
        if self.init != "float" and self.init not in ALGORITHMS:  # else refused only when the train step runs
            raise ValueError(f"init must be 'float' or a quantization method ({', '.join(ALGORITHMS)}), "
                             f"got {self.init!r}")
        parse_format(self.high_weights)


def _ptq_init(model: nn.Module, names: list[str], config: QuantConfig, calib, method: str) -> dict[str, Any]:
    """The packed weights a post-training method picks for the selected layers (on a copy of the model)."""
    from ..quantize import quantize_

    work = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(work, config, calib=calib, method=method)
    out = {}
    for name in names:
        qm = work.get_submodule(name)
        out[name] = (qm.qweight, getattr(qm, "input_smooth", None))
    return out


def _weight_quant(m: nn.Module, w: torch.Tensor, fmt, config: QuantConfig, qat: QATConfig,
                  init=None) -> WeightFakeQuant:
    mse = {"auto": None, "minmax": False, "mse": True}[config.weight_observer]
    noise = None
    if qat.method != "plain":
        noise = (qat.method, qat.noise_rate, qat.noise_block, parse_format(qat.high_weights))
    binary = fmt.kind == "binary" and qat.sensimix
    scales = qat.scales
    if scales == "auto":  # LSQ where the format has free scales; MX / NVFP4 block scales follow the weights
        scales = "learned" if fmt.kind in ("int", "binary", "ternary", "float") else "dynamic"
    if binary:
        scales = "dynamic"  # SensiMix: the abs-mean scale, recomputed every step
    return WeightFakeQuant(w, fmt, scales, mse, qat.ste, noise, qat.ste_clip if binary else None, qat.seed, init)


def _qat_plans(model: nn.Module, config: QuantConfig):
    """The layers `quantize_` would pick that have a QAT layer (exact Linear / Conv1d / Conv2d / Embedding /
    EmbeddingBag); the others are listed as staying float. Tied users each get their own QAT layer (one shared
    float parameter, one quantizer each), so after `convert_` the weight is stored once per user."""
    plans, skipped, _ = plan_layers(model, config)
    kept, tied = [], set()
    unsupported = {p.name for p in plans if p.standin or type(p.layer) not in QAT_MODULES}
    for p in plans:
        if p.name in unsupported:
            sparse = getattr(getattr(p.layer, "weight_format", None), "kind", None) == "raw"
            skipped.append((p.name, "a pruned layer (sparse storage): QAT of pruned layers is not supported" if sparse
                            else f"{type(p.layer).__name__} has no QAT layer (Linear, Conv1d, Conv2d, Embedding, "
                                 "EmbeddingBag)"))
            continue
        if p.tied_to in unsupported or any(f.tied_to == p.name and f.name in unsupported for f in plans):
            skipped.append((p.name, "its weight is tied to a layer that has no QAT layer"))
            continue
        if p.tied_to is not None:
            tied.update((p.name, p.tied_to))
        kept.append(p)
    if tied:
        warnings.warn(f"the tied weight of {', '.join(sorted(tied))} gets one QAT quantizer per user: after convert_ "
                      "it is stored once per user", stacklevel=3)
    return kept, skipped


def prepare_qat_(model: nn.Module, config: "QuantConfig | str", qat: QATConfig | None = None,
                 calib: Iterable[Any] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> nn.Module:
    """Swap the layers `quantize_(model, config)` would quantize for QAT layers, in place, and return the model.

    calib (model inputs) initialises static activation ranges (needed for `frozen` / `learned` ranges and for
    NNAC; otherwise ranges start from the first training batch). A failure leaves the model as it was."""
    if isinstance(config, str):
        config = QuantConfig(weights=config)
    refuse_qat(model, "prepare_qat_", config.include, config.exclude,
               advice="it is prepared already (exclude it, or convert_ the model first)")
    qat = qat or QATConfig()
    plans, skipped = _qat_plans(model, config)
    nnac = qat.nnac_clusters > 0
    static = any(p.activations is not None and p.activations.static for p in plans)
    if nnac and not static:
        raise ValueError("NNAC clusters static activation ranges: use a ':static' activation format")
    if (nnac or qat.act_ranges in ("frozen", "learned")) and static and calib is None:
        raise ValueError(f"{'NNAC' if nnac else qat.act_ranges + ' activation ranges'} need calibration data "
                         "(calib=...)")
    for p in plans:  # (named here: the formats' own check names only a tensor's shape)
        check_float_weight(p.name, p.module.weight.detach())
    calib = as_batches(calib) if calib is not None else None  # (read by the initialisation and the ranges: once)
    originals: dict[str, nn.Module] = {}
    weights: dict[str, torch.Tensor] = {}
    inits = _ptq_init(model, [p.name for p in plans], config, calib, qat.init) if qat.init != "float" else {}
    try:
        for i, p in enumerate(plans):
            m = p.module
            init_q, smooth = inits.get(p.name, (None, None))
            if init_q is not None:  # start from the post-training method's weights (x smoothing) and scales
                weights[p.name] = m.weight.detach().clone()
                with torch.no_grad():
                    m.weight.copy_(init_q.dequantize(m.weight.dtype))
            fat = qat.fat and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
            transform = FrequencyTransform(m.weight[0].numel() if m.weight.dim() > 1 else m.weight.numel()) if fat else None
            w = m.weight if transform is None else transform(m.weight).detach()
            act = p.activations if not (nnac and p.activations is not None and p.activations.static) else None
            aq = ActFakeQuant(act, qat.act_ranges, qat.momentum, qat.granular_percentile) if act is not None else None
            wq = _weight_quant(m, w, p.weights, config, qat, init_q if transform is None else None)
            qm = QAT_MODULES[type(m)].adopt(m, wq, aq, transform)
            if smooth is not None:
                qm.set_smooth(smooth)
            originals[p.name] = m
            set_submodule(model, p.name, qm)
            if progress:
                progress("prepare", i + 1, len(plans))
        if calib is not None and static and not nnac:
            _calibrate(model, calib, config)
        if nnac:
            from ..quant.nnac import apply_nnac_

            static_plans = [p for p in plans if p.activations is not None and p.activations.static]
            apply_nnac_(model, list(calib), [p.name for p in static_plans], static_plans[0].activations,
                        qat.nnac_clusters, qat.nnac_feature, qat.momentum, qat.seed)
    except BaseException:
        for name, m in originals.items():
            set_submodule(model, name, m)
        with torch.no_grad():
            for p in plans:
                if p.name in weights:
                    p.module.weight.copy_(weights[p.name])
        raise
    if skipped:
        warnings.warn(f"{len(skipped)} layer(s) stay float: " + "; ".join(f"{n} ({w})" for n, w in skipped),
                      stacklevel=2)
    if not plans and not skipped:
        warnings.warn("prepare_qat_ selected no layer (check include/exclude patterns)", stacklevel=2)
    return model


def _calibrate(model: nn.Module, calib: Iterable[Any], config: QuantConfig) -> None:
    """Initialise static activation ranges: inputs pass through unquantized while the ranges are observed."""
    aqs = [m.input_quant for m in model.modules() if isinstance(m, QATMixin) and m.input_quant is not None
           and m.input_quant.act.static]
    for aq in aqs:
        aq.calibrating = True
        if aq.mode in ("frozen", "learned"):
            aq.observer = Observer(config.act_observer, config.percentile, bits=aq.act.bits)
    n = 0
    try:
        with torch.no_grad(), evaluating(model):  # (a model in training mode keeps its BatchNorm statistics)
            for batch in calib:
                call_model(model, batch)
                n += 1
        if n == 0:
            raise ValueError("the calibration data is empty: no batch was given")
        for aq in aqs:
            aq.finish_calibration()
    finally:
        for aq in aqs:
            aq.calibrating, aq.observer = False, None


def qat_layers(model: nn.Module) -> list[tuple[str, QATMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QATMixin)]


def convert_(model: nn.Module) -> nn.Module:
    """Swap every QAT layer for the packed layer it trained for (codes and scales exactly as the eval-mode
    fake-quant forward used them; static input ranges copied). A failure leaves the model as it was."""
    layers = qat_layers(model)
    if not layers:
        raise ValueError("convert_ found no QAT layer: call prepare_qat_ first")
    done: dict[str, nn.Module] = {}
    try:
        for name, m in layers:
            iq = m.input_quant
            act = iq.act if iq is not None else None
            smooth = {"smooth": m.input_smooth} if hasattr(m, "input_smooth") else {}
            qm = QUANT_MODULES[m._float_type].from_float(m.float_module(), m.weight_quant.fmt, act,
                                                         qweight=m.qweight(), **smooth)
            if act is not None and act.static:
                qm.set_input_range(*iq.params())
            qm.train(m.training)
            done[name] = m
            set_submodule(model, name, qm)
    except BaseException:
        for name, m in done.items():
            set_submodule(model, name, m)
        raise
    note_model(model)
    return model


def set_observing(model: nn.Module, enabled: bool) -> None:
    """Freeze (False) or resume (True) the updates of activation ranges in training mode."""
    from ..quant.nnac import NNACRouter, kept_out

    for m in [*model.modules(), *(r for _, r in kept_out(model))]:
        if isinstance(m, (ActFakeQuant, NNACRouter)):
            m.observing = enabled


def abwr_penalty(model: nn.Module) -> torch.Tensor:
    """SensiMix's absolute binary weight regularization for int1 QAT layers: the mean squared distance of |w|
    to its group's mean |w| (the value the 1-bit code takes), pulling weights toward +-scale."""
    terms = []
    for _, m in qat_layers(model):
        if m.weight_quant.fmt.kind == "binary":
            a = to_grid(m.latent_weight(), m.weight_quant.fmt).abs()
            terms.append((a - a.mean(-1, keepdim=True)).pow(2).mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())
