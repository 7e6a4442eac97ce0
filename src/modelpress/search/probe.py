"""Behaviour cost of a perturbed model on held-out calibration batches, measured fast.

`Probe` runs the float model once on the batches and keeps its outputs (the reference) and the outputs of
every repeated block (encoder/decoder layers). A measurement then runs the model with the blocks before the
perturbed layer replaced by modules that return their cached outputs, so a layer in the last block costs
little more than that block. Replay is checked once against a full pass (bit-identical outputs) and turned
off when a model does not allow it (a block whose output is mutated, a model that reads its blocks' state).

Divergences (per sample, averaged): `kl` between softmaxes of logits (classifiers, language models), `binary_kl`
between Bernoullis of click logits, `cosine` (1 - cosine similarity, embeddings), `mse` (squared error over the
reference's mean squared norm, any output). All are zero for the float model and second order in a small
weight perturbation, so the costs of independent layers add up (what the allocation assumes).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import call_model, find_blocks
from ..evaluate.lm import logits_of
from ..select import set_submodule

DIVERGENCES = ("kl", "binary_kl", "cosine", "mse")
OutputFn = Callable[[nn.Module, Any], torch.Tensor]


def default_output(model: nn.Module, inp: Any) -> torch.Tensor:
    return logits_of(call_model(model, inp))


def divergence_for(task: Any) -> str:
    """The divergence that fits an evaluation task's outputs."""
    from ..evaluate.tasks import ClassificationTask, CTRTask, EmbeddingTask, LanguageModelTask

    if isinstance(task, (ClassificationTask, LanguageModelTask)):
        return "kl"
    if isinstance(task, CTRTask):
        return "binary_kl"
    if isinstance(task, EmbeddingTask):
        return "cosine"
    return "mse"


def divergence(kind: str, ref: torch.Tensor, out: torch.Tensor, signal: float | None = None) -> torch.Tensor:
    """Per-sample divergence of `out` from `ref` (differentiable in `out`): [N]. `signal` (mse only) is the
    reference's mean squared norm per sample."""
    ref, out = ref.float(), out.float()
    if kind == "kl":
        r, o = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
        lp = F.log_softmax(r, -1)
        return (lp.exp() * (lp - F.log_softmax(o, -1))).sum(-1)
    if kind == "binary_kl":
        r, o = ref.reshape(-1), out.reshape(-1)
        p = torch.sigmoid(r)
        return p * (F.logsigmoid(r) - F.logsigmoid(o)) + (1 - p) * (F.logsigmoid(-r) - F.logsigmoid(-o))
    if kind == "cosine":
        r, o = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
        return 1 - F.cosine_similarity(r, o, dim=-1, eps=1e-12)
    if kind == "mse":
        r, o = ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1)
        return (r - o).pow(2).sum(-1) / max(signal or float(r.pow(2).sum(-1).mean()), 1e-30)
    raise ValueError(f"unknown divergence {kind!r}; use one of {', '.join(DIVERGENCES)}")


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_clone(v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, Mapping):
        return type(x)({k: _clone(v) for k, v in x.items()}) if type(x) is dict else x
    return x


class _Replay(nn.Module):
    """Stands in for a block: returns the block's cached outputs, one per call, in order. Attribute reads it does
    not have go to the block (models that read e.g. `layer.attention_type` while iterating)."""

    def __init__(self, block: nn.Module, outputs: list):
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_outputs", outputs)
        self.calls = 0

    def forward(self, *args, **kwargs):
        out = self._outputs[self.calls]
        self.calls += 1
        return _clone(out)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class Probe:
    """Held-out batches, the float model's outputs on them, and `cost()` of the model as it is now."""

    def __init__(self, model: nn.Module, batches: list[Any], output_fn: OutputFn = default_output,
                 kind: str = "mse", replay: bool = True):
        if kind not in DIVERGENCES:
            raise ValueError(f"unknown divergence {kind!r}; use one of {', '.join(DIVERGENCES)}")
        if not batches:
            raise ValueError("sensitivity analysis needs at least one held-out calibration batch")
        self.model, self.batches, self.output_fn, self.kind = model, list(batches), output_fn, kind
        self.blocks = find_blocks(model) if replay else []
        cached: dict[str, list] = {n: [] for n, _ in self.blocks}
        hooks = [b.register_forward_hook(lambda _m, _a, out, n=n: cached[n].append(_clone(out)))
                 for n, b in self.blocks]
        try:
            with torch.inference_mode():
                self.reference = [output_fn(model, b).detach() for b in self.batches]
        finally:
            for h in hooks:
                h.remove()
        self.samples = sum(self._rows(r) for r in self.reference)
        self.signal = float(sum(r.float().reshape(r.shape[0], -1).pow(2).sum() for r in self.reference)) / max(
            sum(r.shape[0] for r in self.reference), 1)
        if any(len(v) != len(self.batches) for v in cached.values()):
            self.blocks = []  # a block ran more or less than once per batch: no replay
        self._cached = cached
        self.replay_ok = bool(self.blocks) and self._check_replay()

    def _rows(self, r: torch.Tensor) -> int:
        if self.kind in ("kl", "cosine"):
            return r.numel() // r.shape[-1]
        return r.shape[0] if self.kind == "mse" else r.numel()

    def _check_replay(self) -> bool:
        try:
            with torch.inference_mode(), self.replaying(len(self.blocks)):
                outs = [self.output_fn(self.model, b) for b in self.batches]
        except Exception:
            return False
        return all(torch.equal(o, r) for o, r in zip(outs, self.reference))

    def replaying(self, n_blocks: int):
        """Context manager: the first `n_blocks` blocks return their cached float outputs."""
        probe = self

        class _Ctx:
            def __enter__(self):
                self.swapped = []
                for name, block in probe.blocks[:n_blocks]:
                    set_submodule(probe.model, name, _Replay(block, probe._cached[name]))
                    self.swapped.append((name, block))

            def __exit__(self, *exc):
                for name, block in self.swapped:
                    set_submodule(probe.model, name, block)

        return _Ctx()

    def skippable(self, layer_order: dict[str, int], block_spans: list[tuple[int, int]], name: str) -> int:
        """How many leading blocks can be replayed when only layer `name` changes (its first call's position in
        the execution order against each block's span of calls)."""
        if not self.replay_ok or name not in layer_order:
            return 0
        first = layer_order[name]
        return sum(1 for start, end in block_spans if end < first)

    def cost(self, skip_blocks: int = 0, model: nn.Module | None = None) -> float:
        """Mean divergence of the model's current outputs (or of another `model`'s, e.g. a quantized copy) from
        the reference over the held-out batches."""
        total = 0.0
        skip = skip_blocks if self.replay_ok and model is None else 0
        with torch.inference_mode(), self.replaying(skip):
            for b, ref in zip(self.batches, self.reference):
                out = self.output_fn(model if model is not None else self.model, b)
                total += float(divergence(self.kind, ref, out, self.signal).double().sum())
        return total / max(self.samples, 1)

    def per_sample(self, model: nn.Module | None = None) -> torch.Tensor:
        """Divergence of each held-out sample (a batch's first dimension: a sequence, an image, a row), averaged
        over its positions: [samples], for paired comparisons of two models on the same inputs."""
        out = []
        with torch.inference_mode():
            for b, ref in zip(self.batches, self.reference):
                o = self.output_fn(model if model is not None else self.model, b)
                out.append(divergence(self.kind, ref, o, self.signal).double().reshape(ref.shape[0], -1).mean(1))
        return torch.cat(out)

    def loss(self, i: int) -> torch.Tensor:
        """Batch i's summed divergence over all samples (a differentiable scalar, for Hessian estimates)."""
        out = self.output_fn(self.model, self.batches[i])
        return divergence(self.kind, self.reference[i], out, self.signal).sum() / max(self.samples, 1)

    def execution_order(self, names: list[str]) -> tuple[dict[str, int], list[tuple[int, int]]]:
        """(first call index of each named module, [(first, last) call index of each block]) in one pass."""
        order: dict[str, int] = {}
        spans: dict[str, list[int]] = {n: [] for n, _ in self.blocks}
        counter = [0]

        def first_call(n):
            def hook(*_):  # returns None: a pre-hook's return value would replace the module's inputs
                counter[0] += 1
                order.setdefault(n, counter[0])
            return hook

        def span(n):
            def hook(*_):
                counter[0] += 1
                spans[n].append(counter[0])
            return hook

        hooks = [self.model.get_submodule(n).register_forward_pre_hook(first_call(n)) for n in names]
        for n, b in self.blocks:
            hooks.append(b.register_forward_pre_hook(span(n)))
            hooks.append(b.register_forward_hook(span(n)))
        try:
            with torch.inference_mode():
                self.output_fn(self.model, self.batches[0])
        finally:
            for h in hooks:
                h.remove()
        return order, [(min(s), max(s)) if s else (0, 1 << 60) for s in spans.values()]
