"""Wanda and magnitude masks: patterns and counts exact, Wanda's per-row comparison of |W| * ||x||."""
import pytest
import torch

from modelpress.algorithms.magnitude import magnitude_mask
from modelpress.algorithms.wanda import input_norms, wanda_mask
from modelpress.formats.sparse import satisfies


def test_input_norms():
    x = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert torch.allclose(input_norms([x[:1], x[1:]]), torch.tensor([5.0, 1.0]))
    with pytest.raises(ValueError, match="at least one"):
        input_norms([])


def test_wanda_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 1.0])  # the first input is 10x louder
    keep = wanda_mask(w, norms, nm=(2, 4))
    assert keep.tolist() == [[True, False, False, True], [True, True, False, False]]
    assert magnitude_mask(w, nm=(2, 4)).tolist() == [[False, False, True, True], [True, True, False, False]]
    # unstructured: the same count in every row (Wanda compares within output rows)
    assert (wanda_mask(w, norms, sparsity=0.25).sum(1) == 3).all()


def test_counts_and_patterns():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    norms = torch.rand(64, generator=g)
    for fn in (lambda **t: wanda_mask(w, norms, **t), lambda **t: magnitude_mask(w, **t)):
        assert satisfies(fn(nm=(2, 4)), 2, 4) and satisfies(fn(nm=(4, 8)), 4, 8)
        assert int(fn(sparsity=0.5).sum()) == 32 * 32
    assert (magnitude_mask(w, sparsity=0.5, per_row=True).sum(1) == 32).all()
    with pytest.raises(ValueError, match="input columns"):
        wanda_mask(w, norms[:10], sparsity=0.5)
