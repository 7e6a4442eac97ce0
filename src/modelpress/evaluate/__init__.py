"""Evaluation: task metrics, behaviour against the float model, perplexity, zero-shot, latency, size."""
from .harness import lm_eval_scores
from .latency import compare_latency, measure_latency
from .lm import choice_scores, logits_of, multiple_choice_accuracy, next_token_nll, perplexity
from .metrics import (
    accuracy,
    embedding_cosine,
    f1,
    kl_divergence,
    log_loss,
    auc,
    logloss,
    mean_abs_diff,
    neighbour_overlap,
    precision,
    recall,
    roc_auc,
    similarity_spearman,
    spearman,
    sqnr_db,
    top1_agreement,
)
from .size import compression_ratio, model_bytes
from .tasks import ClassificationTask, CTRTask, EmbeddingTask, LanguageModelTask, Task, evaluate_model, evaluate_pair

__all__ = [
    "accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "auc", "logloss", "spearman",
    "kl_divergence", "top1_agreement", "sqnr_db", "mean_abs_diff",
    "embedding_cosine", "neighbour_overlap", "similarity_spearman",
    "logits_of", "next_token_nll", "perplexity", "choice_scores", "multiple_choice_accuracy",
    "lm_eval_scores", "measure_latency", "compare_latency", "model_bytes", "compression_ratio",
    "Task", "ClassificationTask", "CTRTask", "LanguageModelTask", "EmbeddingTask",
    "evaluate_model", "evaluate_pair",
]
