"""recover_: pruned weights stay exactly zero and the layers sparse, the loss falls (task loss or matching the
reference), a failure leaves the model as it was."""
import copy

import pytest
import torch

import modelpress as mp
from modelpress.formats.sparse import unpack_mask
from modelpress.train.recover import recover_

from helpers import mlp


def labelled(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = mlp(seed=3)
    xs = [torch.randn(32, 64, generator=g) for _ in range(n)]
    with torch.no_grad():
        return [(x, teacher(x).argmax(-1)) for x in xs]


def test_supervised_recovery_keeps_the_mask():
    model = mlp()
    mp.prune_(model, mp.PruneConfig(pattern="2:4"))
    keep = unpack_mask(model[0].weight_mask, (128, 64))
    stats = recover_(model, labelled(), steps=60, lr=3e-3)
    assert stats["loss"] == "task" and stats["steps"] == 60 and stats["last_loss"] < stats["first_loss"]
    assert isinstance(model[0], mp.QuantLinear) and torch.equal(unpack_mask(model[0].weight_mask, (128, 64)), keep)
    w = model[0].dequantized_weight()
    assert (w[~keep] == 0).all() and not model.training


def test_teacher_matching_and_structured_models():
    ref = mlp()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # something to recover from
    xs = [x for x, _ in labelled()]

    def err():
        with torch.no_grad():
            return sum(float((model(x) - ref(x)).pow(2).mean()) for x in xs)

    e0 = err()
    stats = recover_(model, xs, steps=80, lr=1e-3, teacher=ref)
    assert stats["loss"] == "match_reference" and err() < 0.5 * e0
    with pytest.raises(ValueError, match="teacher"):
        recover_(model, xs, steps=5)


def test_failure_restores_the_model():
    model = mlp()
    mp.prune_(model, 0.5)
    before = copy.deepcopy(model.state_dict())
    bad = [(torch.randn(4, 64), torch.randint(0, 5, (3,)))]  # targets that do not fit
    with pytest.raises(ValueError):
        recover_(model, bad, steps=3)
    assert isinstance(model[0], mp.QuantLinear)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
