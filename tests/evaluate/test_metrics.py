import math
import sys

import numpy as np
import pytest
import torch

from modelpress.evaluate import metrics as M

# 3 classes, 6 samples. Predicted-as counts: class 0 at {0, 5}, class 1 at {1, 2, 3}, class 2 at {4}.
Y = [0, 0, 1, 1, 2, 2]
P = [0, 1, 1, 1, 2, 0]


def test_accuracy():
    assert M.accuracy(Y, P) == pytest.approx(4 / 6)


def test_precision_macro():
    # class 0: 1 of 2 predicted correct, class 1: 2 of 3, class 2: 1 of 1
    assert M.precision(Y, P) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_recall_macro():
    # class 0: 1 of 2 found, class 1: 2 of 2, class 2: 1 of 2
    assert M.recall(Y, P) == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_f1_macro():
    f = [2 * p * r / (p + r) for p, r in [(1 / 2, 1 / 2), (2 / 3, 1), (1, 1 / 2)]]  # 0.5, 0.8, 2/3
    assert M.f1(Y, P) == pytest.approx(sum(f) / 3)


def test_precision_zero_division_is_zero():
    # class 1 is never predicted: its precision counts as 0, class 0 has 1/2
    assert M.precision([0, 1], [0, 0]) == pytest.approx(0.25)


def test_metrics_accept_tensors():
    assert M.accuracy(torch.tensor(Y), torch.tensor(P)) == pytest.approx(4 / 6)


def test_roc_auc():
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of 4 pairs ordered correctly
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_roc_auc_single_class_is_nan():
    assert math.isnan(M.roc_auc([1, 1], [0.2, 0.9]))


def test_log_loss_binary():
    assert M.log_loss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)


def test_log_loss_multiclass():
    probs = [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]
    assert M.log_loss([0, 2], probs) == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2)


def test_spearman():
    # rank differences d = [0, 1, 1, 0]: rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert M.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_kl_closed_form():
    p, q = [0.5, 0.5], [0.25, 0.75]
    ref, out = torch.tensor([p]).log(), torch.tensor([q]).log()
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    assert M.kl_divergence(ref, out) == pytest.approx(0.5 * math.log(4 / 3))
    assert M.kl_divergence(ref, ref) == pytest.approx(0.0, abs=1e-12)


def test_kl_is_mean_over_rows_and_shift_invariant():
    ref = torch.tensor([[0.5, 0.5], [0.5, 0.5]]).log()
    out = torch.tensor([[0.25, 0.75], [0.5, 0.5]]).log() + 3.0  # logits, not log-probs
    assert M.kl_divergence(ref, out) == pytest.approx(0.25 * math.log(4 / 3))


def test_top1_agreement():
    ref = [[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]]
    out = [[1.0, 2.0], [0.0, 1.0], [5.0, 0.0]]
    assert M.top1_agreement(ref, out) == pytest.approx(2 / 3)


def test_sqnr():
    assert M.sqnr_db([3.0, 4.0], [3.0, 3.0]) == pytest.approx(10 * math.log10(25 / 1))
    assert M.sqnr_db([3.0, 4.0], [3.0, 4.0]) == math.inf


def test_mean_abs_diff():
    assert M.mean_abs_diff([1.0, 2.0], [0.5, 3.0]) == pytest.approx(0.75)


def test_embedding_cosine():
    ref, out = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 2.0]]
    assert M.embedding_cosine(ref, out) == pytest.approx((1 / math.sqrt(2) + 1) / 2)


def _angles(deg):
    r = np.radians(deg)
    return torch.tensor(np.stack([np.cos(r), np.sin(r)], 1))


def test_neighbour_overlap_k1():
    ref = _angles([0, 10, 90, 100])  # nearest: 0<->1, 2<->3
    out = _angles([0, 10, 90, 200])  # nearest: 0->1, 1->0, 2->1 (miss), 3->2
    assert M.neighbour_overlap(ref, out, k=1) == pytest.approx(3 / 4)


def test_neighbour_overlap_k_capped():
    # k=10 is capped at N-1 = 3: every point's neighbours are all the others
    assert M.neighbour_overlap(_angles([0, 10, 90, 100]), _angles([0, 170, 45, 300])) == pytest.approx(1.0)


def test_similarity_spearman():
    # ref pair sims (01, 02, 12) = (cos30, 0, cos60) -> ranks (3, 1, 2)
    # out pair sims = (cos60, 0, cos30) -> ranks (2, 1, 3); d = (1, 0, -1): rho = 1 - 6*2/(3*8) = 0.5
    assert M.similarity_spearman(_angles([0, 30, 90]), _angles([0, 60, 90])) == pytest.approx(0.5)


def test_missing_sklearn_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"pip install modelpress\[eval\]"):
        M.accuracy([0], [0])


def test_missing_scipy_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(ImportError, match=r"pip install modelpress\[eval\]"):
        M.spearman([1, 2, 3], [1, 2, 3])
