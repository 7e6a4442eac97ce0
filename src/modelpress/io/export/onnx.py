"""ONNX export with a parity check: quantized layers become ONNX Runtime nodes (MatMulNBits, MatMulInteger,
QuantizeLinear/DequantizeLinear) through the shims of onnx_shims.py and the dynamo exporter; the written model is
then run by ONNX Runtime next to the PyTorch model on the example inputs, and the agreement (cosine, max abs
error, top-1 agreement for classifier outputs, latency of both) is saved as parity.json and printed. Below the
thresholds the export fails with the numbers and nothing is left at `out` (the folder is written atomically).
"""
from __future__ import annotations

import inspect
import io
import json
import logging
from contextlib import contextmanager, redirect_stdout
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ...calibrate import dry_run
from ...quant import QuantMixin
from ...select import set_submodule
from ._folder import atomic_folder
from .onnx_shims import make_shim
from .parity import parity

MODEL_FILE, PARITY_FILE = "model.onnx", "parity.json"


def _require():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs onnx, onnxruntime and onnxscript: pip install 'modelpress[onnx]'") from None


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """A calib-style batch (tensor, tuple/list of tensors, dict of keyword tensors) -> (args, kwargs)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict) and example_inputs and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in example_inputs.items()):
        return (), dict(example_inputs)
    raise TypeError("example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors (a calibration "
                    f"batch), got {type(example_inputs).__name__}")


class _Outputs(nn.Module):
    """Calls the model on positional tensors (the first `n_args` positional, the rest the keyword inputs named
    `kw_names`) and returns its tensor outputs as a flat tuple; Hugging Face models run without a KV cache."""

    def __init__(self, model: nn.Module, n_args: int = 0, kw_names: tuple[str, ...] = ()):
        super().__init__()
        self.model, self.n_args, self.kw_names = model, n_args, tuple(kw_names)
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self.extra = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, *tensors):
        kwargs = dict(zip(self.kw_names, tensors[self.n_args:]))
        out = self.model(*tensors[: self.n_args], **kwargs, **self.extra)
        return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def other_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example at another batch size, to trace and to check a dynamic batch with: a batch of one repeated
    twice (torch.export fixes a dimension of size 1 to 1, and the graph then fails at any other batch), a larger one
    cut to its first row. None when the inputs do not share a first dimension."""
    tensors = [*args, *kwargs.values()]
    if not tensors or any(t.dim() == 0 or t.shape[0] != tensors[0].shape[0] for t in tensors):
        return None
    f = (lambda t: torch.cat([t, t])) if tensors[0].shape[0] == 1 else (lambda t: t[:1])
    return tuple(f(t) for t in args), {k: f(v) for k, v in kwargs.items()}


def input_names(args: tuple, kwargs: dict) -> list[str]:
    return [f"input_{i}" for i in range(len(args))] + list(kwargs)


def _swap_in_shims(model: nn.Module, linear: str) -> dict[str, nn.Module]:
    """Replace every quantized layer by its export shim; returns the originals (to put back)."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, m in list(model.named_modules()):
            if isinstance(m, QuantMixin):
                parent = model.get_submodule(name.rpartition(".")[0])
                shim = make_shim(name, m, linear, parent)
                originals[name] = m
                set_submodule(model, name, shim)
    except BaseException:
        _restore(model, originals)
        raise
    return originals


def _restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, m in reversed(list(originals.items())):
        set_submodule(model, name, m)


def _dynamic_shapes(inputs: tuple) -> dict:
    """Every dimension of every input may change (batch, sequence, image size) unless the model fixes it."""
    return {"tensors": tuple({i: torch.export.Dim.AUTO for i in range(t.dim())} for t in inputs)}


@contextmanager
def _one_line_errors():
    """torch.onnx's failures (several pages of advice) as one ValueError line naming the cause."""
    try:
        yield
    except (ValueError, TypeError, ImportError):
        raise
    except Exception as e:  # torch.export / onnx conversion errors
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        first = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), type(cause).__name__)
        raise ValueError(f"torch.onnx could not export the model: {type(cause).__name__}: {first[:300]}") from e


@contextmanager
def _quiet_loggers(*names: str):
    """The exporter's log lines below errors (e.g. 'torchvision is not installed. Skipping torchvision::nms') off
    while it runs; the levels come back afterwards."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(model: nn.Module, args: tuple, kwargs: dict, file: Path, opset: int = 21, linear: str = "nbits",
            dynamic: bool = True) -> list[str]:
    """Export the (quantized) model to `file`; the user's model is left exactly as it was. Returns the ONNX
    input names in the order of `args` then `kwargs`."""
    from .onnx_ops import translation_table

    table = translation_table(opset)
    was_training = model.training
    originals = _swap_in_shims(model, linear)
    try:
        model.eval()
        wrapper = _Outputs(model, len(args), tuple(kwargs))
        inputs = (*args, *kwargs.values())
        with warnings.catch_warnings(), torch.no_grad(), _one_line_errors(), redirect_stdout(io.StringIO()), \
                _quiet_loggers("torch.onnx", "torch.export", "torch._export"):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(wrapper, inputs, dynamo=True, opset_version=opset, custom_translation_table=table,
                                     dynamic_shapes=_dynamic_shapes(inputs) if dynamic else None,
                                     input_names=input_names(args, kwargs), verbose=False, optimize=True)
        prog.save(str(file))
    finally:
        _restore(model, originals)
        model.train(was_training)
    import onnx

    proto = onnx.load(str(file), load_external_data=False)
    return [i.name for i in proto.graph.input]


def export_onnx(model: nn.Module, out: "str | os.PathLike", example_inputs: Any, overwrite: bool = False,
                min_cosine: float = 0.999, min_top1: float = 0.99, opset: int = 21, linear: str = "nbits",
                dynamic: bool = True, classifier: bool | None = None, quiet: bool = False) -> Path:
    """Export `model` to `out/model.onnx`, check it with ONNX Runtime against PyTorch on `example_inputs`, and
    write `out/parity.json`. Raises (writing nothing) when `example_inputs` do not run through the model, when the
    cosine falls below `min_cosine` or, for classifier outputs [N, C], when the top-1 agreement falls below
    `min_top1` (`classifier`: None guesses from the first output — [N, C] rows that are not unit-norm
    embeddings —, True/False decides)."""
    _require()
    if example_inputs is None:
        raise ValueError("ONNX export needs example_inputs (a batch as given to the model: a tensor, a tuple, or a "
                         "dict of keyword tensors)")
    if linear not in ("nbits", "qdq"):
        raise ValueError(f"linear must be 'nbits' (MatMulNBits) or 'qdq' (DequantizeLinear + MatMul), got {linear!r}")
    args, kwargs = split_inputs(example_inputs)
    inputs = (*args, *kwargs.values())
    _check_inputs(model, inputs)
    # one cheap forward first: a batch that does not fit the model (shape, dtype) is said plainly, not as
    # torch.export's internal assertion, and before anything is written
    dry_run(model, example_inputs, "example_inputs", "the batch")
    other = other_batch(args, kwargs) if dynamic else None
    if other is not None:
        try:
            with torch.no_grad():
                _Outputs(model, len(args), tuple(kwargs))(*other[0], *other[1].values())
        except Exception:  # a model whose inputs are not one batch (e.g. a fixed table beside the batch)
            other = None
    trace = other if other is not None and inputs[0].shape[0] == 1 else (args, kwargs)
    with atomic_folder(out, overwrite) as tmp:
        try:
            names = to_onnx(model, *trace, tmp / MODEL_FILE, opset, linear, dynamic)
        except ValueError as e:  # (a layer refused by name, or any other error, is raised as it is)
            if not dynamic or not str(e).startswith("torch.onnx could not export") or \
                    not any(1 in t.shape for t in (*trace[0], *trace[1].values())):
                raise
            raise ValueError(f"{e} (the example has a dimension of size 1, which the exporter cannot keep dynamic: "
                             "give an example with at least 2 along every dimension that varies, e.g. 2 tokens, "
                             "or export with dynamic=False / --static)") from None
        report = parity(model, tmp / MODEL_FILE, args, kwargs, names, classifier=classifier)
        if other is not None:  # the dynamic batch, checked: a batch size baked into the graph fails here, not later
            try:
                again = parity(model, tmp / MODEL_FILE, *other, names, repeats=0, classifier=classifier)
            except Exception as e:
                raise ValueError(f"the exported model fails at batch {other_batch_size(other)} (the example's batch "
                                 f"works): {type(e).__name__}: {str(e).splitlines()[0][:200]}; export with "
                                 "dynamic=False (--static) for a fixed batch") from None
            report["other_batch"] = {"batch": other_batch_size(other), "cosine": again["cosine"],
                                     "max_abs_error": again["max_abs_error"]}
            report["cosine"] = min(report["cosine"], again["cosine"])
        report.update({"opset": opset, "linear": linear, "dynamic_shapes": dynamic,
                       "thresholds": {"min_cosine": min_cosine, "min_top1": min_top1}})
        (tmp / PARITY_FILE).write_text(json.dumps(report, indent=1) + "\n")
        if not quiet:
            print(summary(report))
        bad = report["cosine"] < min_cosine or (report.get("top1_agreement") is not None
                                                and report["top1_agreement"] < min_top1)
        if bad:
            doubled = " The example's batch of 1 was traced repeated twice (so that the batch stays dynamic): a " \
                "model that computes differently at batch 1 needs dynamic=False (--static)." if trace is other else ""
            raise ValueError(f"ONNX parity below the threshold, nothing written: {summary(report)} "
                             f"(thresholds: cosine >= {min_cosine}, top-1 >= {min_top1}).{doubled}")
    return Path(out)


def other_batch_size(batch: tuple[tuple, dict]) -> int:
    return (*batch[0], *batch[1].values())[0].shape[0]


def _check_inputs(model: nn.Module, inputs: tuple) -> None:
    """Before any work: example inputs with NaN / Inf (no parity to measure on them), and a quantized model or input
    in fp16 / bf16 (the ONNX nodes of quantized layers compute in fp32: MatMulNBits, MatMulInteger, DequantizeLinear
    with fp32 scales; two float types bound to one node are refused by ONNX Runtime at load)."""
    bad = next((i for i, t in enumerate(inputs) if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise ValueError(f"example_inputs: input {bad} holds NaN or infinite values (parity cannot be measured on them)")
    if not any(isinstance(m, QuantMixin) for m in model.modules()):
        return
    low = next((f"input of dtype {t.dtype}" for t in inputs if t.dtype in (torch.float16, torch.bfloat16)), None)
    low = low or next((f"parameter {n!r} of dtype {p.dtype}" for n, p in model.named_parameters()
                       if p.dtype in (torch.float16, torch.bfloat16)), None)
    if low:
        raise ValueError(f"ONNX export of a quantized model runs its quantized layers in fp32, and this one has an "
                         f"{low}: export it in fp32 (model.float(), which keeps the packed weights, and fp32 example "
                         "inputs)")


def summary(report: dict[str, Any]) -> str:
    top1 = f", top-1 agreement {report['top1_agreement']:.4f}" if report.get("top1_agreement") is not None else ""
    lat = report.get("latency_ms", {})
    return (f"ONNX Runtime vs PyTorch: cosine {report['cosine']:.6f}, max abs error {report['max_abs_error']:.3g}"
            f"{top1}; latency ORT {lat.get('onnxruntime', float('nan')):.2f} ms, PyTorch "
            f"{lat.get('pytorch', float('nan')):.2f} ms")
