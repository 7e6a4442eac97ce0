"""Parity of an exported ONNX model with its PyTorch model: both run on the same inputs; outputs are compared
(cosine over all output values, max abs error, top-1 agreement when the first output is [N, C] scores) and
each one's median latency is measured, interleaved (A, B, A, B ...) so that load on the machine hits both."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def _torch_outputs(model: nn.Module, args: tuple, kwargs: dict) -> list[np.ndarray]:
    from .onnx import _Outputs

    with torch.no_grad():
        outs = _Outputs(model, len(args), tuple(kwargs))(*args, *kwargs.values())
    return [t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy() for t in outs]


def _feeds(session, names: list[str], args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    values = [*args, *kwargs.values()]
    wanted = {i.name for i in session.get_inputs()}
    feeds = {}
    for name, v in zip(names, values):
        if name in wanted:  # an input the exporter found constant is not an input of the graph
            feeds[name] = v.detach().numpy()
    return feeds


def looks_like_classifier(out: np.ndarray) -> bool:
    """[N, C] float scores that are not unit-norm embedding rows (a sentence embedder's output is not classes)."""
    if out.ndim != 2 or out.shape[1] < 2 or not np.issubdtype(out.dtype, np.floating):
        return False
    return not np.allclose(np.linalg.norm(out.astype(np.float64), axis=1), 1.0, atol=1e-3)


def compare(ref: list[np.ndarray], got: list[np.ndarray], classifier: bool | None = None) -> dict[str, Any]:
    """Agreement of two lists of outputs. `classifier`: the first output is [N, C] class scores (None: guess)."""
    if len(ref) != len(got):
        raise ValueError(f"the ONNX model returns {len(got)} outputs, PyTorch {len(ref)}")
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            raise ValueError(f"output {i}: ONNX shape {b.shape} differs from PyTorch's {a.shape}")
    a = np.concatenate([r.astype(np.float64).ravel() for r in ref])
    b = np.concatenate([g.astype(np.float64).ravel() for g in got])
    if np.isnan(a).any() or np.isnan(b).any():
        who = "PyTorch's" if np.isnan(a).any() else "ONNX Runtime's"
        raise ValueError(f"{who} outputs hold NaN on the example inputs: parity cannot be measured (check the "
                         "model's weights and the inputs)")
    inf = ~np.isfinite(a) | ~np.isfinite(b)  # e.g. logits masked with -inf: the same infinities, the rest compared
    if not np.array_equal(a[inf], b[inf]):
        raise ValueError(f"ONNX Runtime's outputs differ from PyTorch's in {int((a[inf] != b[inf]).sum())} infinite "
                         "value(s)")
    a, b = a[~inf], b[~inf]
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cos = float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
    out = {"cosine": cos, "max_abs_error": float(np.abs(a - b).max()) if a.size else 0.0,
           "outputs": [list(r.shape) for r in ref], "top1_agreement": None}
    first = ref[0]
    if classifier is None:
        classifier = looks_like_classifier(first)
    if classifier:
        if first.ndim != 2:
            raise ValueError(f"classifier=True needs a first output of shape [N, C], got {list(first.shape)}")
        out["top1_agreement"] = float((first.argmax(1) == got[0].argmax(1)).mean())
    return out


def parity(model: nn.Module, file: Path, args: tuple, kwargs: dict, names: list[str], repeats: int = 10,
           classifier: bool | None = None) -> dict[str, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch's, and no spinning
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # workers that would slow PyTorch's turns
    session = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
    feeds = _feeds(session, names, args, kwargs)
    ref = _torch_outputs(model, args, kwargs)
    got = [np.asarray(o, dtype=np.float32) if np.issubdtype(np.asarray(o).dtype, np.floating) else np.asarray(o)
           for o in session.run(None, feeds)]
    report = compare(ref, got, classifier)
    if not repeats:
        return report
    t_ort, t_pt = [], []
    with torch.no_grad():
        session.run(None, feeds)  # warm-up: kernel layouts, allocations
        model(*args, **kwargs)
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, feeds)
            t1 = time.perf_counter()
            model(*args, **kwargs)
            t2 = time.perf_counter()
            t_ort.append(t1 - t0)
            t_pt.append(t2 - t1)
    report["latency_ms"] = {"onnxruntime": 1e3 * statistics.median(t_ort), "pytorch": 1e3 * statistics.median(t_pt),
                            "repeats": repeats, "threads": torch.get_num_threads()}
    report["inputs"] = {k: list(v.shape) for k, v in feeds.items()}
    report["onnxruntime"] = ort.__version__
    return report

