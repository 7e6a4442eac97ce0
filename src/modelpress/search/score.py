"""The quality side of a target: which metric the allowed drop is about, and how much a candidate lost.

The metric is the task's headline (accuracy, perplexity, AUC, ...; for embedding tasks, which only compare with
the reference, the embedding cosine, whose reference value is 1). A drop is measured in the metric's bad
direction (a perplexity that rises, an accuracy that falls), absolute or as a fraction of the reference value.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..report import LOWER_IS_BETTER

# behaviour metrics a candidate is compared on when the task has no metric of its own, with the reference value
BEHAVIOUR_REFERENCE = {"embedding_cosine": 1.0, "neighbour_overlap": 1.0, "similarity_spearman": 1.0,
                       "top1_agreement": 1.0, "kl_divergence": 0.0}


def headline(task: Any) -> str:
    """The metric a drop is measured on by default for this task."""
    from ..evaluate.tasks import ClassificationTask, CTRTask, EmbeddingTask, LanguageModelTask

    if isinstance(task, ClassificationTask):
        return "accuracy"
    if isinstance(task, LanguageModelTask):
        return "perplexity"
    if isinstance(task, CTRTask):
        return "auc"
    if isinstance(task, EmbeddingTask):
        return "embedding_cosine"
    return "kl_divergence"


def drop(metric: str, reference: float, value: float, relative: bool = False) -> float:
    """How much worse `value` is than `reference` (positive = worse)."""
    d = value - reference if metric in LOWER_IS_BETTER else reference - value
    return d / abs(reference) if relative and reference else d


class Scorer:
    """Evaluates candidates on the task: the metric's value, its drop from the float reference."""

    def __init__(self, task: Any, reference: nn.Module, metric: str | None = None, relative: bool = False):
        from ..evaluate import evaluate_model

        self.task, self.reference, self.relative = task, reference, relative
        self.metric = metric or headline(task)
        own = evaluate_model(task, reference)
        if self.metric in own:
            self.paired = False
            self.reference_value = own[self.metric]
        elif self.metric in BEHAVIOUR_REFERENCE:
            self.paired = True
            self.reference_value = BEHAVIOUR_REFERENCE[self.metric]
        else:
            raise ValueError(f"metric {self.metric!r} is not reported by {type(task).__name__} (it reports "
                             f"{', '.join(own) or 'only behaviour metrics'}; behaviour metrics: "
                             f"{', '.join(BEHAVIOUR_REFERENCE)})")
        self.lower_is_better = self.metric in LOWER_IS_BETTER

    def value(self, model: nn.Module) -> float:
        from ..evaluate import evaluate_model, evaluate_pair

        if self.paired:
            return evaluate_pair(self.task, self.reference, model)[self.metric]["compressed"]
        return evaluate_model(self.task, model)[self.metric]

    def drop(self, value: float) -> float:
        return drop(self.metric, self.reference_value, value, self.relative)

    def better(self, a: float, b: float) -> bool:
        """Whether metric value `a` is better than `b`."""
        return a < b if self.lower_is_better else a > b
