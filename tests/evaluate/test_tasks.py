import math

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.evaluate import metrics as M
from modelpress.evaluate.tasks import (
    ClassificationTask,
    CTRTask,
    EmbeddingTask,
    LanguageModelTask,
    _call,
    evaluate_model,
    evaluate_pair,
)

LN2, LN3 = math.log(2), math.log(3)


class Table(nn.Module):
    """Returns fixed rows of a table, looked up by the input indices; counts its calls."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float64)
        self.calls, self.inference = 0, []

    def forward(self, idx):
        self.calls += 1
        self.inference.append(torch.is_inference_mode_enabled())
        return self.table[idx]


class KwTable(Table):
    def forward(self, *, idx):  # keyword-only: reached with a dict input
        return super().forward(idx)


def test_call_dispatch():
    seen = []

    class M_(nn.Module):
        def forward(self, *args, **kwargs):
            seen.append((len(args), sorted(kwargs)))

    x = torch.zeros(1)
    _call(M_(), x), _call(M_(), (x, x)), _call(M_(), {"a": x, "b": x})
    assert seen == [(1, []), (2, []), (0, ["a", "b"])]
    with pytest.raises(TypeError):
        _call(M_(), 3)


# --- classification: 3 classes, 6 samples, 2 batches -----------------------------------------
Y = [0, 0, 1, 1, 2, 2]
P = [0, 1, 1, 1, 2, 0]  # the compressed model's predictions


def _rows(classes):  # probs 0.5 on the class, 0.25 elsewhere, as log-probs
    p = np.full((len(classes), 3), 0.25)
    p[np.arange(len(classes)), classes] = 0.5
    return np.log(p)


def _cls_task():
    idx = torch.arange(6)
    return ClassificationTask([(idx[:3], torch.tensor(Y[:3])), (idx[3:], torch.tensor(Y[3:]))])


def test_classification_pair():
    ref, cmp = Table(_rows(Y)), Table(_rows(P))
    progress = []
    res = evaluate_pair(_cls_task(), ref, cmp, progress=lambda d, t: progress.append((d, t)))
    assert progress == [(1, 2), (2, 2)]
    assert ref.calls == 2 and cmp.calls == 2 and all(ref.inference + cmp.inference)  # reference runs once
    acc = res["accuracy"]
    assert acc["reference"] == 1.0 and acc["compressed"] == pytest.approx(4 / 6)
    assert acc["delta"] == pytest.approx(4 / 6 - 1)
    assert res["precision"]["compressed"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert res["recall"]["compressed"] == pytest.approx(2 / 3)
    assert res["f1"]["compressed"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # two rows swap 0.5 and 0.25 between two classes: KL = 0.5 ln2 - 0.25 ln2 each, 0 elsewhere
    assert res["kl_divergence"] == {"reference": None, "compressed": pytest.approx(LN2 / 12), "delta": None}
    assert res["top1_agreement"]["compressed"] == pytest.approx(4 / 6)
    # each row's logits square to 9 ln2^2 (6 rows); each swapped row differs by ln2 at 2 places
    assert res["sqnr_db"]["compressed"] == pytest.approx(10 * math.log10(54 / 4))


def test_classification_evaluate_model():
    assert evaluate_model(_cls_task(), Table(_rows(P)))["accuracy"] == pytest.approx(4 / 6)


# --- CTR: logits [B, 1], dict inputs ----------------------------------------------------------


def test_ctr_pair():
    ref = KwTable([[0.0], [0.0], [LN3], [-LN3]])  # probs .5 .5 .75 .25
    cmp = KwTable([[0.0], [LN3], [LN3], [-LN3]])  # probs .5 .75 .75 .25
    y = torch.tensor([0, 1, 1, 0])
    task = CTRTask([({"idx": torch.tensor([0, 1])}, y[:2]), ({"idx": torch.tensor([2, 3])}, y[2:])])
    res = evaluate_pair(task, ref, cmp)
    # reference: positives {.5, .75} vs negatives {.5, .25}: one tie, three ordered -> 3.5 / 4
    assert res["auc"]["reference"] == pytest.approx(0.875)
    assert res["auc"]["compressed"] == pytest.approx(1.0)
    assert res["logloss"]["reference"] == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)
    assert res["logloss"]["compressed"] == pytest.approx(-(math.log(0.5) + 3 * math.log(0.75)) / 4)
    assert res["sqnr_db"]["compressed"] == pytest.approx(10 * math.log10(2))  # 2 ln3^2 / ln3^2
    assert res["mean_abs_prob_diff"]["compressed"] == pytest.approx(0.25 / 4)


# --- language model: constant next-token distributions, dict input with a mask ----------------


class ConstLM(nn.Module):
    def __init__(self, probs):
        super().__init__()
        self.logp = torch.tensor(probs, dtype=torch.float64).log()

    def forward(self, input_ids, attention_mask=None):  # [B, T] -> [B, T, V]
        return self.logp.expand(*input_ids.shape, -1)


def test_language_model_pair():
    ref, cmp = ConstLM([0.75, 0.25]), ConstLM([0.25, 0.75])
    inp = {"input_ids": torch.tensor([[0, 1, 1], [1, 1, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    task = LanguageModelTask([inp], choices=[([0], [[0], [1]], 1)])
    res = evaluate_pair(task, ref, cmp)
    # 3 predicted positions, all targets are token 1: P_ref = .25, P_cmp = .75
    assert res["perplexity"]["reference"] == pytest.approx(4.0)
    assert res["perplexity"]["compressed"] == pytest.approx(4 / 3)
    assert res["perplexity"]["delta"] == pytest.approx(4 / 3 - 4)
    assert res["choice_accuracy"] == {"reference": 0.0, "compressed": 1.0, "delta": 1.0}
    # KL(.75/.25 || .25/.75) = .75 ln3 + .25 ln(1/3) = 0.5 ln3
    assert res["kl_divergence"]["compressed"] == pytest.approx(0.5 * LN3)
    assert res["top1_agreement"]["compressed"] == 0.0
    sig, noise = math.log(0.75) ** 2 + math.log(0.25) ** 2, 2 * LN3**2
    assert res["sqnr_db"]["compressed"] == pytest.approx(10 * math.log10(sig / noise))


def test_language_model_evaluate_model_tensor_input():
    task = LanguageModelTask([torch.tensor([[0, 1, 1]])])
    assert evaluate_model(task, ConstLM([0.75, 0.25])) == {"perplexity": pytest.approx(4.0)}


def test_language_model_data_without_predicted_positions_is_refused():
    """All padding, or one-token sequences: no score (perplexity NaN, SQNR +inf 'identical' before), and compress
    refuses before quantizing."""
    import modelpress as mp

    allpad = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.zeros(2, 6, dtype=torch.long)}
    one_token = torch.tensor([[1], [0]])
    for data in ([allpad], [one_token], [allpad, one_token]):
        task = LanguageModelTask(data)
        with pytest.raises(ValueError, match="no predicted position"):
            evaluate_model(task, ConstLM([0.75, 0.25]))
        with pytest.raises(ValueError, match="no predicted position"):
            evaluate_pair(task, ConstLM([0.75, 0.25]), ConstLM([0.25, 0.75]))
        lm = nn.Sequential(nn.Embedding(8, 16), nn.Linear(16, 8))
        before = {k: v.clone() for k, v in lm.state_dict().items()}
        with pytest.raises(ValueError, match="eval: the language-model evaluation data has no predicted position"):
            mp.compress(lm, "w8", eval=task)
        assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())
    # one real pair of tokens anywhere is enough
    ok = {"input_ids": torch.tensor([[0, 1, 1]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert evaluate_model(LanguageModelTask([allpad, ok]), ConstLM([0.75, 0.25])) == {"perplexity": pytest.approx(4.0)}


# --- embeddings: tuple inputs -----------------------------------------------------------------


def _angles(deg):
    r = np.radians(deg)
    return np.stack([np.cos(r), np.sin(r)], 1)


def test_embedding_pair():
    ref, cmp = Table(_angles([0, 10, 90, 100])), Table(_angles([0, 10, 90, 200]))
    task = EmbeddingTask([(torch.tensor([0, 1]),), (torch.tensor([2, 3]),)], k=1)
    res = evaluate_pair(task, ref, cmp)
    assert set(res) == {"embedding_cosine", "neighbour_overlap", "similarity_spearman", "sqnr_db"}
    c100 = math.cos(math.radians(100))
    assert res["embedding_cosine"]["compressed"] == pytest.approx((3 + c100) / 4)
    assert res["neighbour_overlap"]["compressed"] == pytest.approx(3 / 4)
    assert res["sqnr_db"]["compressed"] == pytest.approx(10 * math.log10(4 / (2 - 2 * c100)))
    spear = M.similarity_spearman(ref.table, cmp.table)
    assert res["similarity_spearman"] == {"reference": None, "compressed": pytest.approx(spear), "delta": None}
    assert evaluate_model(task, ref) == {}


def test_empty_task_raises():
    with pytest.raises(ValueError, match="no data"):
        evaluate_model(ClassificationTask([]), Table(_rows(Y)))
