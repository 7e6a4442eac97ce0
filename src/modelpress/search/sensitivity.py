"""Sensitivity analysis: the behaviour cost of quantizing each weight alone to each candidate format.

For every unit (a layer, or the layers sharing a tied weight) and format, the unit's weights are replaced by
their quantize-dequantize values (what the quantized layer computes with), the held-out calibration batches
run through the model (`Probe`: float outputs cached, blocks before the layer replayed), the divergence from
the float outputs is recorded and the weights are restored. Blocks (encoder/decoder layers) get the same
measurement with all their units quantized together. The Hessian-trace estimate (hutchinson.py) gives the
cheap alternative: cost ~ 0.5 * tr(H)/n * ||Q(W) - W||^2, in the same units.

`Sensitivity` holds the table (costs, exact bytes, weight errors) and saves / loads it as JSON.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..formats import quantize_tensor
from .probe import Probe
from .units import Unit, options_for, unit_weights

Progress = Callable[[str, int, int], None]


@dataclass
class Sensitivity:
    divergence: str  # what the costs measure (probe.DIVERGENCES)
    formats: list[str]
    layers: dict[str, dict[str, float]]  # unit -> format -> measured cost (the unit quantized alone)
    nbytes: dict[str, dict[str, int]]  # unit -> format (and "float") -> stored bytes
    error: dict[str, dict[str, float]]  # unit -> format -> ||Q(W) - W||^2
    params: dict[str, int]  # unit -> quantized parameters
    members: dict[str, list[str]] = field(default_factory=dict)  # unit -> layers sharing its weight
    blocks: dict[str, dict[str, float]] = field(default_factory=dict)  # block -> format -> cost (all its units)
    hessian: dict[str, float] = field(default_factory=dict)  # unit -> tr(H)/n (mean Hessian diagonal)
    seconds: float = 0.0
    batches: int = 0  # held-out calibration batches measured on
    replay: bool = False  # whether the blocks before a layer were replayed from cache
    estimated: dict[str, list[str]] = field(default_factory=dict)  # unit -> formats whose `layers` cost is the
    # Hessian estimate: the time budget ran out before they were measured

    def costs(self, source: str = "measured") -> dict[str, dict[str, float]]:
        """unit -> format -> predicted cost: `measured`, or `hessian` (0.5 tr(H)/n ||Q(W) - W||^2)."""
        if source == "measured":
            missing = [u for u in self.error if u not in self.layers]
            if missing:
                raise ValueError(f"no measured costs for {missing[:3]}: run the analysis with measure=True")
            return {u: {f: max(c, 0.0) for f, c in fs.items()} for u, fs in self.layers.items()}
        if source == "hessian":
            if not self.hessian:
                raise ValueError("no Hessian traces: run the analysis with hessian=True")
            return {u: {f: 0.5 * self.hessian[u] * e for f, e in fs.items()} for u, fs in self.error.items()}
        raise ValueError(f"unknown cost source {source!r}; use 'measured' or 'hessian'")

    def ranking(self, fmt: str | None = None) -> list[str]:
        """Units from most to least sensitive (cost at `fmt`, default the narrowest format measured on all)."""
        costs = self.layers or self.costs("hessian")
        fmt = fmt or min(self.formats, key=lambda f: sum(b.get(f, 1 << 62) for b in self.nbytes.values()))
        return sorted(costs, key=lambda u: -costs[u].get(fmt, math.inf))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sensitivity":
        return cls(**d)

    def save(self, path: "str | os.PathLike") -> None:
        from ..report import _atomic_write
        from pathlib import Path

        _atomic_write(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "Sensitivity":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path} is not a sensitivity table written by modelpress ({type(e).__name__}: "
                             f"{' '.join(str(e).split())})") from None

    def check(self, units: list[Unit], formats: list[str], divergence: str, source: str = "measured") -> None:
        """ValueError unless this table covers exactly these weights (same bytes per format, so it was measured on
        the same model) with every candidate format, in the same divergence and with `source` costs."""
        problems = []
        if self.divergence != divergence:
            problems.append(f"it measures {self.divergence}, this task needs {divergence}")
        names = {u.name for u in units}
        if set(self.nbytes) != names:
            odd = sorted(set(self.nbytes) ^ names)
            problems.append(f"its layers differ from the model's ({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''})")
        else:
            for u in units:
                want = {"float": u.float_bytes, **{f: u.nbytes(f) for f in options_for(u, formats)}}
                have = self.nbytes[u.name]
                if any(have.get(f) != b for f, b in want.items()):
                    missing = [f for f in want if f not in have]
                    problems.append(f"{u.name}: " + (f"format(s) {', '.join(missing)} not analysed" if missing
                                                     else "other shapes or bytes than this model's"))
                    break
        if source == "measured" and set(self.layers) != names and not problems:
            problems.append("it has no measured costs for some layers")
        if source == "hessian" and not self.hessian:
            problems.append("it has no Hessian traces")
        if problems:
            raise ValueError("the sensitivity table does not fit this model: " + "; ".join(problems))

    def table(self, limit: int = 60):
        """A rich Table: one row per unit, one column per format (measured cost), and the Hessian trace."""
        from rich.table import Table

        t = Table(title=f"sensitivity · {self.divergence} on {self.batches} held-out batch(es) · {self.seconds:.0f} s")
        t.add_column("layer")
        t.add_column("params", justify="right")
        for f in self.formats:
            t.add_column(f, justify="right")
        if self.hessian:
            t.add_column("tr(H)/n", justify="right")
        for u in list(self.error)[:limit]:
            row = [u, f"{self.params[u]:,}"] + [_g(self.layers.get(u, {}).get(f)) for f in self.formats]
            t.add_row(*row, *([_g(self.hessian.get(u))] if self.hessian else []))
        for b, fs in self.blocks.items():
            t.add_row(f"[bold]{b}[/bold] (block)", "", *[_g(fs.get(f)) for f in self.formats],
                      *([""] if self.hessian else []))
        return t


def _g(v) -> str:
    return "—" if v is None else f"{v:.3g}"


@contextmanager
def substituted(model: nn.Module, values: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
    """The units' weights hold `values` (unit -> matrix name -> tensor in the format's view) inside the block;
    the float tensors come back afterwards, whatever happens. Tied users see the change (same Parameter)."""
    saved = []
    try:
        for name, mats in values.items():
            m = model.get_submodule(name)
            for key, v in mats.items():
                param = getattr(m, key)
                new = v.t() if param.shape != v.shape else v  # a transformers Conv1D holds [in, out]
                saved.append((param, param.data))
                param.data = new.to(param.dtype)
        yield
    finally:
        for param, data in reversed(saved):
            param.data = data


def fake_quantized(model: nn.Module, unit: Unit, fmt: str) -> tuple[dict[str, torch.Tensor], float]:
    """(the unit's weights after quantize-dequantize in `fmt`, squared error summed over its matrices)."""
    out, err = {}, 0.0
    for key, w in unit_weights(model, unit).items():
        w = w.detach()
        q = quantize_tensor(w, fmt).dequantize(torch.float32)
        err += float((q - w.float()).double().pow(2).sum())
        out[key] = q
    return out, err


def analyse(model: nn.Module, units: list[Unit], formats: list[str], probe: Probe, measure: bool = True,
            blocks: bool = True, hessian: bool = False, hessian_samples: int = 8,
            progress: Progress | None = None, deadline: float | None = None) -> Sensitivity:
    """The sensitivity table of `units` over `formats` (each unit gets the formats smaller than its float bytes).
    `deadline` (time.monotonic()) stops the measurements early: units not measured get Hessian-predicted costs
    when `hessian`, else the analysis raises TimeoutError."""
    t0 = time.perf_counter()
    opts = {u.name: options_for(u, formats) for u in units}
    sens = Sensitivity(divergence=probe.kind, formats=[str(f) for f in formats], layers={},
                       nbytes={u.name: {"float": u.float_bytes, **{f: u.nbytes(f) for f in opts[u.name]}} for u in units},
                       error={u.name: {} for u in units}, params={u.name: u.params for u in units},
                       members={u.name: list(u.members) for u in units}, batches=len(probe.batches),
                       replay=probe.replay_ok)
    was_training = model.training
    model.eval()
    try:
        if hessian:
            from .hutchinson import layer_traces

            sens.hessian = layer_traces(model, units, probe, samples=hessian_samples, progress=progress)
        order, spans = probe.execution_order([u.name for u in units])
        total = sum(len(v) for v in opts.values())
        done = 0
        for u in units:
            skip = probe.skippable(order, spans, u.name)
            for f in opts[u.name]:
                values, err = fake_quantized(model, u, f)
                sens.error[u.name][f] = err
                if measure and (deadline is None or time.monotonic() < deadline):
                    with substituted(model, {u.name: values}):
                        sens.layers.setdefault(u.name, {})[f] = probe.cost(skip)
                done += 1
                if progress:
                    progress("sensitivity", done, total)
        if measure and any(len(sens.layers.get(u.name, {})) < len(opts[u.name]) for u in units):
            if not sens.hessian:
                raise TimeoutError("the time budget ran out during the sensitivity analysis; give more time, fewer "
                                   "formats, or use the Hessian estimate (cost='hessian')")
            pred = sens.costs("hessian")
            for u in units:
                for f in opts[u.name]:
                    if f not in sens.layers.setdefault(u.name, {}):
                        sens.layers[u.name][f] = pred[u.name][f]
                        sens.estimated.setdefault(u.name, []).append(f)
        if measure and blocks and probe.blocks and (deadline is None or time.monotonic() < deadline):
            sens.blocks = _block_costs(model, units, formats, probe, progress)
    finally:
        model.train(was_training)
    sens.seconds = time.perf_counter() - t0
    return sens


def _block_costs(model, units, formats, probe: Probe, progress) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    names = [n for n, _ in probe.blocks]
    for i, b in enumerate(names):
        inside = [u for u in units if u.block == b]
        if not inside:
            continue
        out[b] = {}
        for f in formats:
            f = str(f)
            if not all(f in options_for(u, [f]) for u in inside):
                continue
            values = {u.name: fake_quantized(model, u, f)[0] for u in inside}
            with substituted(model, values):
                out[b][f] = probe.cost(i if probe.replay_ok else 0)
        if progress:
            progress("block sensitivity", i + 1, len(names))
    return out
