"""Task metrics (via scikit-learn / scipy) and behaviour metrics (reference vs compressed outputs).

All functions take tensors, numpy arrays or lists and return a Python float.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_EXTRA = "pip install modelpress[eval]"


def _sklearn_metrics():
    try:
        from sklearn import metrics
    except ImportError as e:
        raise ImportError(f"this metric needs scikit-learn: {_EXTRA}") from e
    return metrics


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _t(x: Any) -> torch.Tensor:  # float64 tensor on CPU
    x = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return x.double()


# --- task metrics ---------------------------------------------------------------------------


def accuracy(y_true, y_pred) -> float:
    return float(_sklearn_metrics().accuracy_score(_np(y_true), _np(y_pred)))


def precision(y_true, y_pred) -> float:
    """Macro precision; a class never predicted counts as 0."""
    return float(_sklearn_metrics().precision_score(_np(y_true), _np(y_pred), average="macro", zero_division=0))


def recall(y_true, y_pred) -> float:
    return float(_sklearn_metrics().recall_score(_np(y_true), _np(y_pred), average="macro", zero_division=0))


def f1(y_true, y_pred) -> float:
    return float(_sklearn_metrics().f1_score(_np(y_true), _np(y_pred), average="macro", zero_division=0))


def roc_auc(y_true, y_score) -> float:
    """Binary ROC AUC; nan when only one class is present."""
    y = _np(y_true)
    if len(np.unique(y)) < 2:
        return math.nan
    return float(_sklearn_metrics().roc_auc_score(y, _np(y_score)))


def log_loss(y_true, y_prob, labels=None) -> float:
    """Mean negative log-likelihood; y_prob is P(class 1) [N] for binary, or [N, C] (labels default 0..C-1)."""
    y_prob = _np(y_prob)
    if labels is None:
        labels = [0, 1] if y_prob.ndim == 1 else list(range(y_prob.shape[1]))
    return float(_sklearn_metrics().log_loss(_np(y_true), y_prob, labels=labels))


def spearman(a, b) -> float:
    try:
        from scipy.stats import spearmanr
    except ImportError as e:
        raise ImportError(f"spearman needs scipy: {_EXTRA}") from e
    return float(spearmanr(_np(a).ravel(), _np(b).ravel()).statistic)


# --- behaviour metrics (reference first) ----------------------------------------------------


def _kl_rows(ref_logits, out_logits) -> torch.Tensor:  # [..., V] -> [N] KL(P_ref || P_out), nats
    lp = F.log_softmax(_t(ref_logits), dim=-1)
    lq = F.log_softmax(_t(out_logits), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).reshape(-1)


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def kl_divergence(ref_logits, out_logits) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(out)) in nats; logits are [..., V]."""
    return float(_kl_rows(ref_logits, out_logits).mean())


def top1_agreement(ref_logits, out_logits) -> float:
    """Fraction of rows whose argmax over the last dim agrees."""
    r, o = _t(ref_logits), _t(out_logits)
    return float((r.argmax(-1) == o.argmax(-1)).double().mean())


def sqnr_db(ref, out) -> float:
    """10*log10(sum ref^2 / sum (ref - out)^2); inf when identical."""
    r, o = _t(ref), _t(out)
    return _db(float((r**2).sum()), float(((r - o) ** 2).sum()))


def mean_abs_diff(a, b) -> float:
    return float((_t(a) - _t(b)).abs().mean())


def embedding_cosine(ref, out) -> float:
    """Mean cosine similarity between matching rows of [N, D] embeddings."""
    return float(F.cosine_similarity(_t(ref), _t(out), dim=-1).mean())


def _cos_matrix(e: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, N]
    e = F.normalize(_t(e), dim=-1)
    return e @ e.T


def neighbour_overlap(ref, out, k: int = 10) -> float:
    """Mean |kNN_ref(i) ∩ kNN_out(i)| / k over rows, cosine neighbours excluding self; k capped at N-1."""
    n = _t(ref).shape[0]
    k = min(k, n - 1)
    if k < 1:
        return math.nan

    def knn(e):  # [N, k]
        s = _cos_matrix(e)
        s.fill_diagonal_(-math.inf)
        return s.topk(k, dim=1).indices

    a, b = knn(ref), knn(out)
    hits = (a[:, :, None] == b[:, None, :]).any(-1).sum(1)  # [N]
    return float((hits.double() / k).mean())


def similarity_spearman(ref, out) -> float:
    """Spearman correlation between the pairwise cosine similarities (i < j) of two [N, D] embedding sets."""
    n = _t(ref).shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    return spearman(_cos_matrix(ref)[i, j], _cos_matrix(out)[i, j])


auc = roc_auc  # the names the reports use
logloss = log_loss
