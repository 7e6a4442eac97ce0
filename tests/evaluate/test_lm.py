import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from modelpress.evaluate import lm

# bigram "model": next-token probabilities depend only on the current token
PROBS = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]], dtype=torch.float64)


class Bigram(nn.Module):
    def __init__(self, hf=False):
        super().__init__()
        self.hf = hf
        self.inference_flags = []

    def forward(self, input_ids, attention_mask=None):  # [B, T] -> [B, T, V]
        self.inference_flags.append(torch.is_inference_mode_enabled())
        logits = PROBS.log()[input_ids] + 5.0  # a shift does not change the softmax
        return SimpleNamespace(logits=logits) if self.hf else logits


class Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


@pytest.mark.parametrize("vocab", [2, 7, 100])
def test_perplexity_uniform_is_vocab(vocab):
    batches = [torch.randint(0, vocab, (2, 5)), torch.randint(0, vocab, (3, 4))]
    assert lm.perplexity(Uniform(vocab), batches) == pytest.approx(vocab, rel=1e-9)


def test_perplexity_bigram_hand_computed():
    model = Bigram()
    # transitions 0->1 (0.7) and 1->2 (0.8): exp(-(ln .7 + ln .8) / 2) = 1 / sqrt(0.56)
    assert lm.perplexity(model, [torch.tensor([[0, 1, 2]])]) == pytest.approx(1 / math.sqrt(0.56))
    assert all(model.inference_flags)


def test_perplexity_pools_positions_across_batches():
    # 0->1 (0.7), 1->2 (0.8) in one batch, 2->0 (0.6) in another: exp of the mean over 3 positions
    got = lm.perplexity(Bigram(), [torch.tensor([[0, 1, 2]]), torch.tensor([[2, 0]])])
    assert got == pytest.approx((0.7 * 0.8 * 0.6) ** (-1 / 3))


def test_perplexity_hf_output_and_dict_mask():
    # the mask drops the last token: only 0->1 (0.7) is predicted in row 0; row 1 has 2->2 (0.2)
    inp = {"input_ids": torch.tensor([[0, 1, 2], [2, 2, 1]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 0]])}
    assert lm.perplexity(Bigram(hf=True), [inp]) == pytest.approx((0.7 * 0.2) ** -0.5)


def test_perplexity_tuple_input():
    assert lm.perplexity(Bigram(), [(torch.tensor([[1, 2]]),)]) == pytest.approx(1 / 0.8)


def test_logits_of():
    t = torch.zeros(1)
    assert lm.logits_of(t) is t
    assert lm.logits_of(SimpleNamespace(logits=t)) is t
    assert lm.logits_of({"logits": t}) is t
    assert lm.logits_of((t, None)) is t
    with pytest.raises(TypeError):
        lm.logits_of(3)


def test_choice_scores_hand_computed():
    s = lm.choice_scores(Bigram(), [0], [[1], [2], [1, 2]])
    expected = [math.log(0.7), math.log(0.1), math.log(0.7) + math.log(0.8)]
    assert s.tolist() == pytest.approx(expected)
    s = lm.choice_scores(Bigram(), [2, 0], [[1, 2]], normalize=True)
    assert s.tolist() == pytest.approx([(math.log(0.7) + math.log(0.8)) / 2])


def test_multiple_choice_accuracy():
    items = [
        ([0], [[2], [1]], 1),  # model prefers 1 after 0 (0.7 vs 0.1): right
        ([1], [[2], [0]], 0),  # prefers 2 after 1 (0.8): right
        ([2], [[1], [0]], 0),  # prefers 0 after 2 (0.6 vs 0.2): wrong
    ]
    assert lm.multiple_choice_accuracy(Bigram(), items) == pytest.approx(2 / 3)


def test_multiple_choice_normalize_changes_the_pick():
    # after 0: [0] scores ln .2 = -1.61; [1, 2, 0, 1, 2, 2] scores ln(.7 .8 .6 .7 .8 .2) = -3.28 in total
    # but -0.55 per token: the total picks the short choice, the per-token mean the long one
    item = ([0], [[0], [1, 2, 0, 1, 2, 2]], 1)
    assert lm.multiple_choice_accuracy(Bigram(), [item]) == 0.0
    assert lm.multiple_choice_accuracy(Bigram(), [item], normalize=True) == 1.0


def test_choice_scores_rejects_empty():
    with pytest.raises(ValueError):
        lm.choice_scores(Bigram(), [], [[1]])
