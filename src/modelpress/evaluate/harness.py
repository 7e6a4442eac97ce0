"""Adapter to EleutherAI's lm-evaluation-harness, for Hugging Face causal LMs (quantized or not).

`lm_eval_scores(model, tokenizer, tasks)` runs harness tasks on the in-memory model (modelpress's quantized
layers are ordinary nn.Modules, so the harness calls them like any other) and returns {task/metric: value}.
The harness fetches its task datasets from the Hugging Face hub unless they are cached locally: offline,
only tasks whose data are already cached run. Install with `pip install lm-eval` (not a modelpress dependency).
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install lm-eval") from None
    return lm_eval, HFLM


def lm_eval_scores(model: nn.Module, tokenizer: Any, tasks: Sequence[str], limit: int | None = None,
                   batch_size: int = 8, num_fewshot: int | None = None) -> dict[str, float]:
    """Scores of `tasks` (harness task names) for a Hugging Face causal LM: {"task/metric": value}."""
    if not hasattr(model, "config") or not hasattr(model, "generate"):
        raise TypeError(f"lm-evaluation-harness needs a Hugging Face causal LM, got {type(model).__name__}")
    if not tasks:
        raise ValueError("give at least one lm-evaluation-harness task name")
    lm_eval, HFLM = _harness()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    scores = {}
    for task, metrics in out["results"].items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not name.endswith("_stderr,none") and name != "alias":
                scores[f"{task}/{name.replace(',none', '')}"] = float(value)
    return scores
