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


class Masked(torch.nn.Module):
    """Two Linears on token inputs [B, T, K] with an attention mask, as a padded transformer batch arrives."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)

    def forward(self, x, attention_mask=None):
        return self.b(torch.relu(self.a(x)))


def direct_keep(w, rows, sparsity=None, nm=None):
    """Wanda by hand: score |W_ij| * sqrt(sum_t x_tj^2), the lowest of each row (or each group of m) removed."""
    score = w.abs() * rows.double().pow(2).sum(0).sqrt().float()
    if nm is None:
        k = round(w.shape[1] * (1 - sparsity))
        return torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.argsort(1, descending=True)[:, :k], True)
    n, m = nm
    g = score.reshape(w.shape[0], -1, m)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.argsort(-1, descending=True)[..., :n], True)
    return keep.reshape(w.shape)


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_wanda_equals_direct_computation(target):
    """prune_(method="wanda") == the paper's rule computed directly: norms over the real (unpadded) tokens only,
    per output row / N:M group, the second layer's inputs taken from the already-pruned first layer."""
    import modelpress as mp
    from modelpress.formats.sparse import unpack_mask

    g = torch.Generator().manual_seed(1)
    calib = []
    for lengths in ([5, 2, 7], [3, 7, 1]):
        x = torch.randn(3, 7, 8, generator=g)
        mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
        x[~mask] = 50.0  # loud padding: it must not move the norms
        calib.append({"x": x, "attention_mask": mask.long()})
    ref = Masked()
    model = mp.prune_(Masked(), mp.PruneConfig(method="wanda", **target), calib=calib)
    sp, nm = target.get("sparsity"), (2, 4) if "pattern" in target else None

    real = torch.cat([c["x"][c["attention_mask"].bool()] for c in calib])
    keep_a = direct_keep(ref.a.weight.detach(), real, sp, nm)
    pruned_a = torch.nn.Linear(8, 12)
    pruned_a.weight.data, pruned_a.bias.data = ref.a.weight.detach() * keep_a, ref.a.bias.detach()
    with torch.no_grad():
        keep_b = direct_keep(ref.b.weight.detach(), torch.relu(pruned_a(real)), sp, nm)
    for name, want in (("a", keep_a), ("b", keep_b)):
        m = model.get_submodule(name)
        assert torch.equal(unpack_mask(m.weight_mask, m.weight_shape), want), name
        assert torch.equal(m.dequantized_weight(), getattr(ref, name).weight.detach() * want)
    # the padded positions are the only thing that differs from an unmasked run: without the mask they count
    loud = mp.prune_(Masked(), mp.PruneConfig(method="wanda", **target),
                     calib=[{"x": c["x"]} for c in calib])
    assert not torch.equal(loud.a.weight_mask, model.a.weight_mask)


def reference_keep_f64(w, x, sparsity=None, nm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept mask, scores) by the paper's rule in float64, one comparison group at a time: S_ij = |W_ij| *
    sqrt(sum_t X_tj^2), the lowest-scored weights of each output row (or of each run of M consecutive inputs of a
    row) removed."""
    score = w.abs() * torch.sqrt((x * x).sum(0))[None, :]
    keep = torch.zeros_like(w, dtype=torch.bool)
    m = nm[1] if nm else w.shape[1]
    kept = nm[0] if nm else round(w.shape[1] * (1 - sparsity))
    for i in range(w.shape[0]):
        for g0 in range(0, w.shape[1], m):
            order = sorted(range(g0, g0 + m), key=lambda j: -float(score[i, j]))
            keep[i, order[:kept]] = True
    return keep, score


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"nm": (2, 4)}, {"nm": (4, 8)}])
def test_wanda_mask_matches_float64_reference(target):
    """wanda_mask(w, input_norms(x)) in float32 == the float64 reference on a small matrix whose input norms
    spread over 3 decades (so the norms, not |W| alone, decide), with every group's kept/removed margin far
    above float32 rounding (the comparison is exact, not a near-tie coin flip)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 32, dtype=torch.float64, generator=g)
    x = torch.randn(40, 32, dtype=torch.float64, generator=g) * torch.logspace(-1.5, 1.5, 32, dtype=torch.float64)
    want, score = reference_keep_f64(w, x, target.get("sparsity"), target.get("nm"))
    m = target["nm"][1] if "nm" in target else 32
    groups = score.reshape(12, -1, m)
    kept = want.reshape(12, -1, m)
    margin = (groups.masked_fill(~kept, float("inf")).amin(-1) / groups.masked_fill(kept, 0).amax(-1)).min()
    assert margin > 1 + 1e-4
    got = wanda_mask(w.float(), input_norms([x[:17].float(), x[17:].float()]), target.get("sparsity"),
                     target.get("nm"))
    assert torch.equal(got, want)
    assert not torch.equal(got, magnitude_mask(w.float(), target.get("sparsity"), target.get("nm"), per_row=True))
