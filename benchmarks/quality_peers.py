"""Peer quantizers for benchmarks/quality.py: torchao, optimum-quanto, NNCF and llm-compressor on CPU.

Each peer is a `Peer(tool, method, fmt, run)`: `run(model, entry, scope)` quantizes `model` (a deepcopy of
the zoo's float model) in place or returns a new model, and returns (model, notes). Imports happen in
`prepare()`, outside the timed part, so compression times do not count import time. Peers only quantize
the layers the modelpress recipes quantize (`scope.exclude`, the same patterns), where the peer lets us.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelpress.select import selected


@dataclass(frozen=True)
class Scope:
    """What every tool quantizes on one zoo model: exclude patterns (modelpress.select syntax) and, for
    NNCF, regular expressions on its graph node names."""

    exclude: tuple[str, ...] = ()
    nncf_ignore: tuple[str, ...] = ()
    causal_lm: bool = False  # a Hugging Face causal LM that llm-compressor can take
    transformer: bool = False  # NNCF's ModelType.TRANSFORMER for nncf.quantize


@dataclass(frozen=True)
class Peer:
    tool: str
    method: str
    fmt: str  # row group in the tables: W8, W8A8, W4 g128, ...
    run: Callable[[nn.Module, Any, Scope], tuple[nn.Module, list[str]]]
    prepare: Callable[[], None] = lambda: None  # imports, untimed
    only_if: Callable[[Scope], str | None] = field(default=lambda scope: None)  # reason to skip, or None


def _inputs(batch: Any) -> Any:
    return batch


def _dataset(calib: list):
    import nncf

    return nncf.Dataset(calib, _inputs)


# --- torchao ----------------------------------------------------------------------------------------------

def _torchao_filter(scope: Scope):
    return lambda m, fqn: isinstance(m, nn.Linear) and selected(fqn, None, scope.exclude)


def _torchao(config_fn: Callable[[], Any]):
    def run(model, entry, scope):
        from torchao.quantization import quantize_

        quantize_(model, config_fn(), filter_fn=_torchao_filter(scope))
        return model, ["nn.Linear only"]
    return run


def _import_torchao():
    import torchao.quantization  # noqa: F401


def _ao_int8_dyn():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _ao_int8_wo():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _ao_int4_g128():
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=128)


def _ao_intx4_g128():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128))


# --- optimum-quanto ---------------------------------------------------------------------------------------

def _quanto(weights: str, activations: str | None = None):
    def run(model, entry, scope):
        from optimum import quanto

        qt = {"qint8": quanto.qint8, "qint4": quanto.qint4}
        quanto.quantize(model, weights=qt[weights], activations=qt[activations] if activations else None,
                        exclude=list(scope.exclude) or None)
        notes = []
        if activations:
            from modelpress.calibrate import call_model

            with torch.no_grad(), quanto.Calibration():
                for batch in entry.calib:
                    call_model(model, batch)
            notes.append("static activation scales from calib")
        quanto.freeze(model)
        if weights == "qint4":  # its packed int4 weights fail under torch.inference_mode, as evaluate uses
            model = _NoInferenceMode(model)
            notes.append("run under no_grad: quanto qint4 fails under inference_mode")
        return model, notes
    return run


class _NoInferenceMode(nn.Module):
    """Calls the wrapped model with inference mode off (under no_grad), whatever the caller's mode."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.inner(*args, **kwargs)


def _import_quanto():
    import optimum.quanto  # noqa: F401


# --- NNCF -------------------------------------------------------------------------------------------------

def _nncf_ignored(scope: Scope):
    import nncf

    return nncf.IgnoredScope(patterns=list(scope.nncf_ignore), validate=False) if scope.nncf_ignore else None


def _nncf_weights(mode: str, group_size: int | None = None, **extra):
    def run(model, entry, scope):
        import nncf

        kw = dict(mode=getattr(nncf.CompressWeightsMode, mode), dataset=_dataset(entry.calib),
                  ignored_scope=_nncf_ignored(scope), **extra)
        notes = []
        if group_size:  # like modelpress, quantize every selected layer, even where group_size does not divide
            adv = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
            kw.update(group_size=group_size, ratio=1.0, all_layers=True, advanced_parameters=adv)
            notes.append("group_size_fallback_mode=ADJUST")
        return nncf.compress_weights(model, **kw), notes
    return run


def _nncf_quantize(model, entry, scope):
    import nncf

    kw = {"model_type": nncf.ModelType.TRANSFORMER} if scope.transformer else {}
    out = nncf.quantize(model, _dataset(entry.calib), subset_size=sum(_batch_len(b) for b in entry.calib),
                        ignored_scope=_nncf_ignored(scope), **kw)
    return out, ["fake-quantized: float weights kept in torch (int8 storage needs an OpenVINO export)"]


def _batch_len(batch: Any) -> int:
    t = batch if isinstance(batch, torch.Tensor) else (
        next(iter(batch.values())) if isinstance(batch, dict) else batch[0])
    return int(t.shape[0])


def _import_nncf():
    import nncf
    import nncf.torch  # noqa: F401


# --- llm-compressor ---------------------------------------------------------------------------------------

def _llmc_gptq(group_size: int):
    def run(model, entry, scope):
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier

        rows = [r for b in entry.calib for r in b["input_ids"]]  # the same calibration tokens
        ds = Dataset.from_dict({"input_ids": [r.tolist() for r in rows],
                                "attention_mask": [[1] * len(r) for r in rows]})
        if group_size == 128:
            recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
        else:
            from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

            args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
            recipe = GPTQModifier(ignore=["lm_head"],
                                  config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)})
        model = oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(rows),
                        max_seq_length=rows[0].numel(), shuffle_calibration_samples=False)
        return model, ["fake-quantized in memory (float weights kept); size: its packed checkpoint"]
    return run


def llmc_packed_bytes(model: nn.Module) -> int:
    """Bytes of llm-compressor's compressed safetensors checkpoint (packed int4 + scales + float rest).
    Call last: saving compresses the model in place."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, save_compressed=True)
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def _import_llmc():
    import llmcompressor  # noqa: F401
    from llmcompressor.modifiers.gptq import GPTQModifier  # noqa: F401


def _needs_causal_lm(scope: Scope) -> str | None:
    return None if scope.causal_lm else "not run: llm-compressor's oneshot takes a Hugging Face causal LM"


PEERS: dict[str, list[Peer]] = {
    "torchao": [
        Peer("torchao", "int8 weight-only", "W8", _torchao(_ao_int8_wo), _import_torchao),
        Peer("torchao", "int8 dyn act + int8 weight", "W8A8", _torchao(_ao_int8_dyn), _import_torchao),
        Peer("torchao", "Int4WeightOnly g128", "W4 g128", _torchao(_ao_int4_g128), _import_torchao),
        Peer("torchao", "IntxWeightOnly int4 g128", "W4 g128", _torchao(_ao_intx4_g128), _import_torchao),
    ],
    "quanto": [
        Peer("optimum-quanto", "qint8", "W8", _quanto("qint8"), _import_quanto),
        Peer("optimum-quanto", "qint8 / qint8 act", "W8A8", _quanto("qint8", "qint8"), _import_quanto),
        Peer("optimum-quanto", "qint4 (g128)", "W4 g128", _quanto("qint4"), _import_quanto),
    ],
    "nncf": [
        Peer("NNCF", "compress_weights INT8_ASYM", "W8", _nncf_weights("INT8_ASYM"), _import_nncf),
        Peer("NNCF", "quantize (int8 PTQ)", "W8A8", _nncf_quantize, _import_nncf),
        Peer("NNCF", "compress_weights INT4_SYM g128", "W4 g128", _nncf_weights("INT4_SYM", 128), _import_nncf),
    ],
    "llmcompressor": [
        Peer("llm-compressor", "GPTQ W4A16 g128", "W4 g128", _llmc_gptq(128), _import_llmc, _needs_causal_lm),
        Peer("llm-compressor", "GPTQ W4A16 g32", "W4 g32", _llmc_gptq(32), _import_llmc, _needs_causal_lm),
    ],
}


def true_bytes(model: nn.Module) -> tuple[int, bool]:
    """(bytes of every stored tensor in model.state_dict(), whether tensor subclasses were unwrapped).
    Like modelpress.evaluate.model_bytes, but a tensor subclass (torchao, quanto) counts the tensors it
    holds (codes, scales), not numel * its nominal dtype's size."""
    seen: set = set()
    total, unwrapped = 0, False

    def add(t: torch.Tensor) -> None:
        nonlocal total, unwrapped
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            unwrapped = True
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        n = t.numel() * t.element_size()
        key = (t.device, t.data_ptr(), n)
        if key not in seen:
            seen.add(key)
            total += n

    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor):
            add(t)
    return total, unwrapped
