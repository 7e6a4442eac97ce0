"""Language-model metrics: perplexity and zero-shot multiple choice.

A model input is token ids [B, T], a tuple whose first item is the ids, or a dict with
`input_ids` (and optionally `attention_mask`); the model returns logits [B, T, V] or an
object with `.logits` (Hugging Face).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: a Tensor, `.logits`, a dict's "logits", or a tuple's first item."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _run(model: nn.Module, inp: Any) -> torch.Tensor:
    from ..calibrate import call_model as _call

    return logits_of(_call(model, inp))


def ids_and_mask(inp: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], mask [B, T] bool) of a model input; the mask is all True without attention_mask."""
    if isinstance(inp, Mapping):
        ids, mask = inp["input_ids"], inp.get("attention_mask")
    elif isinstance(inp, (tuple, list)):
        ids, mask = inp[0], None
    else:
        ids, mask = inp, None
    ids = torch.as_tensor(ids)
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    return ids, mask


def predicted_positions(mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: position t predicts token t+1, counted when both are real (mask) tokens."""
    return mask[:, :-1] & mask[:, 1:]


def predicted(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N]) at every predicted position (predicted_positions)."""
    valid = predicted_positions(mask).to(logits.device)  # [B, T-1]
    return logits[:, :-1][valid], ids[:, 1:].to(logits.device)[valid]


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position next-token negative log-likelihood [N] (nats) of logits [B, T, V] for ids [B, T]."""
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    lg, tgt = predicted(logits, ids, mask)
    return F.cross_entropy(lg.double(), tgt.long(), reduction="none")


def perplexity(model: nn.Module, batches: Iterable[Any]) -> float:
    """exp(mean next-token NLL over all predicted positions of all batches)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for inp in batches:
            ids, mask = ids_and_mask(inp)
            nll = next_token_nll(_run(model, inp), ids, mask)
            total, count = total + float(nll.sum()), count + nll.numel()
    if count == 0:
        raise ValueError("perplexity: no predicted positions (sequences need at least 2 tokens)")
    return math.exp(total / count)


def choice_scores(model: nn.Module, context, choices: Sequence, normalize: bool = False) -> torch.Tensor:
    """Log-likelihood [n_choices] of each choice's tokens after the context tokens (1-D ids).

    All choices run in one batch, right-padded (a causal model ignores the padding);
    `normalize` divides each score by the choice's token count.
    """
    ctx = torch.as_tensor(context).long().reshape(-1)
    conts = [torch.as_tensor(c).long().reshape(-1) for c in choices]
    if ctx.numel() == 0 or any(c.numel() == 0 for c in conts):
        raise ValueError("choice_scores: the context and every choice need at least one token")
    seqs = [torch.cat([ctx, c]) for c in conts]
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)  # [n, T]
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    with torch.inference_mode():
        logp = F.log_softmax(_run(model, ids).double(), dim=-1).cpu()  # [n, T, V]
    c0 = ctx.numel()
    scores = []
    for i, c in enumerate(conts):
        pos = torch.arange(c0 - 1, c0 - 1 + c.numel())  # positions that predict the choice tokens
        s = logp[i, pos, c].sum()
        scores.append(s / c.numel() if normalize else s)
    return torch.stack(scores)


def multiple_choice_accuracy(model: nn.Module, items: Iterable[tuple], normalize: bool = False) -> float:
    """Fraction of items (context ids, [choice ids, ...], answer index) whose best-scoring choice is the answer."""
    hits = [int(choice_scores(model, ctx, ch, normalize).argmax()) == int(ans) for ctx, ch, ans in items]
    if not hits:
        raise ValueError("multiple_choice_accuracy: no items")
    return sum(hits) / len(hits)
