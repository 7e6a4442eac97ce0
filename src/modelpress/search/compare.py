"""Choosing between an allocated plan and a uniform one on held-out data, with the measurement's noise in view.

An allocated (mixed) plan is predicted by the knapsack to beat the best uniform format that fits the same bytes;
that prediction adds up per-layer costs measured alone. The check measures both plans, applied, on held-out inputs:

- the data: the held-out calibration batches, plus up to `extra` training batches with the rows that are also
  calibration rows left out (the quantization methods saw every calibration batch; the evaluation split is never
  used). Training batches are (input, target) pairs or inputs; only their inputs are used, recognised by having
  the structure of a calibration batch.
- the decision: per held-out sample (the first dimension of a batch: a sequence, an image, a click row) the
  divergence of each plan's outputs from the float model's, and the paired difference between the plans. A
  paired bootstrap over samples gives the share of resampled mean differences in which the more complex plan
  (more distinct formats) is ahead. It replaces the simpler one only when that share reaches `confidence`: a
  difference within the measurement's noise is no evidence that the mix is better, and the uniform plan is the
  simpler one (one format, one kernel path, nothing to tune per layer). `confidence` 0.5 is close to comparing
  the means alone.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

RESAMPLES = 2000  # bootstrap resamples: the share's Monte-Carlo error is at most 0.5 / sqrt(2000) ~ 0.011


def paired_bootstrap(candidate: torch.Tensor, incumbent: torch.Tensor, resamples: int = RESAMPLES,
                     seed: int = 0) -> tuple[float, float]:
    """(mean of candidate - incumbent, share of bootstrap resamples whose mean difference is < 0) for per-sample
    costs (lower is better) of two models on the same samples."""
    d = (candidate.double() - incumbent.double()).reshape(-1)
    if d.numel() == 0:
        raise ValueError("a paired comparison needs at least one sample")
    g = torch.Generator().manual_seed(seed)
    below, chunk = 0, max(1, (1 << 22) // d.numel())  # resamples per chunk: ~4M indices at a time
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        idx = torch.randint(0, d.numel(), (n, d.numel()), generator=g)
        below += int((d[idx].mean(1) < 0).sum())
    return float(d.mean()), below / resamples


def prefer(candidate: torch.Tensor, incumbent: torch.Tensor, confidence: float, resamples: int = RESAMPLES,
           seed: int = 0) -> tuple[bool, float, float]:
    """Whether the candidate replaces the incumbent: its mean cost is lower and the paired bootstrap puts it ahead
    in at least `confidence` of the resamples. (replace, mean difference, share ahead)."""
    diff, share = paired_bootstrap(candidate, incumbent, resamples, seed)
    return diff < 0 and share >= confidence, diff, share


def complexity(formats: Mapping[str, Any]) -> int:
    """How many distinct formats a plan uses (1: uniform)."""
    return len({str(f) for f in formats.values()})


def structure(x: Any) -> Any:
    """A batch's shape of containers: tensors by rank and dtype, dicts by keys, tuples by their items."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dim(), x.dtype)
    if isinstance(x, Mapping):
        return ("dict", tuple(sorted((k, structure(v)) for k, v in x.items())))
    if isinstance(x, (tuple, list)):
        return ("seq", tuple(structure(v) for v in x))
    return ("other", type(x).__name__)


def input_of(batch: Any, like: Any) -> Any | None:
    """The model input of a training batch (the batch itself, or the first item of an (input, target) pair) when
    it has the structure of the calibration batch `like`; else None."""
    want = structure(like)
    if structure(batch) == want:
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and structure(batch[0]) == want:
        return batch[0]
    return None


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    items = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for v in items:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def row_keys(x: Any) -> list[bytes]:
    """One key per sample, for recognising calibration rows: the bytes of the first tensor's row; for tokenized
    inputs (a mapping with input_ids and attention_mask) the row's unpadded ids, so that a sentence padded to
    another length in another batch is still recognised."""
    if isinstance(x, Mapping) and isinstance(x.get("input_ids"), torch.Tensor) \
            and isinstance(x.get("attention_mask"), torch.Tensor) and x["input_ids"].dim() == 2:
        ids, mask = x["input_ids"].detach().cpu(), x["attention_mask"].detach().cpu().bool()
        return [r[m].numpy().tobytes() for r, m in zip(ids, mask)]
    t = _first_tensor(x)
    if t is None or t.dim() == 0:
        return []
    rows = t.detach().cpu().contiguous().reshape(t.shape[0], -1)
    return [r.numpy().tobytes() for r in rows]


def take_rows(x: Any, keep: torch.Tensor, n: int) -> Any:
    """The batch with only the samples where `keep` (a bool [n]) is set: every tensor whose first dimension is n
    is indexed along it; anything else is kept as it is."""
    if isinstance(x, torch.Tensor):
        return x[keep] if x.dim() > 0 and x.shape[0] == n else x
    if isinstance(x, Mapping):
        return type(x)({k: take_rows(v, keep, n) for k, v in x.items()}) if type(x) is dict else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(take_rows(v, keep, n) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(take_rows(v, keep, n) for v in x)
    return x


def comparison_batches(calib: list[Any], heldout: list[Any], train: Any, extra: int) -> tuple[list[Any], int]:
    """(held-out calibration batches + up to `extra` training inputs with their calibration rows left out, how many
    training batches were added)."""
    if not train or extra <= 0 or not calib:
        return list(heldout), 0
    seen: set[bytes] = set()
    for b in calib:
        seen.update(row_keys(b))
    added = []
    for batch in train:
        x = input_of(batch, calib[0])
        keys = row_keys(x) if x is not None else []
        if not keys:
            continue
        keep = torch.tensor([k not in seen for k in keys])
        if not bool(keep.any()):
            continue
        added.append(x if bool(keep.all()) else take_rows(x, keep, len(keys)))
        if len(added) == extra:
            break
    return list(heldout) + added, len(added)
