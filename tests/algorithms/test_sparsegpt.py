"""SparseGPT against a plain float64 optimal-brain-surgeon reference (explicit inverse Hessian, one column at a
time), masks that satisfy the pattern, lower output error than Wanda and magnitude, earlier masks kept."""
import pytest
import torch

from modelpress.algorithms.gptq import hessian
from modelpress.algorithms.magnitude import magnitude_mask
from modelpress.algorithms.sparsegpt import Config, sparsegpt_prune
from modelpress.algorithms.wanda import input_norms, wanda_mask
from modelpress.formats.sparse import satisfies


def inputs(t=1024, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / k**0.5
    return (torch.randn(t, k, generator=g) @ a) * torch.exp(torch.randn(k, generator=g))


def weight(n=16, k=64, seed=1):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def reference(w, h, damp, sparsity=None, nm=None, block=None):
    """Sequential OBS in float64 with the explicit inverse of the damped Hessian: prune column j (the mask of a
    block / N:M group chosen from w^2 / [H^-1]_jj^2 at each column's elimination), update the columns after it
    by -e_j [H^-1]_j,: / [H^-1]_jj, then eliminate j from the inverse."""
    w = w.double().clone()
    n, k = w.shape
    h = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    keep = torch.ones(n, k, dtype=torch.bool)

    def diag_ahead(hi, j0, j1):  # [H^-1]_jj at the time each column of [j0, j1) is reached
        hi = hi.clone()
        out = []
        for j in range(j0, j1):
            out.append(hi[j, j].sqrt())
            hi = hi - torch.outer(hi[:, j], hi[j, :]) / hi[j, j]
        return torch.stack(out)

    span = nm[1] if nm else block
    for j in range(k):
        if j % span == 0:
            d = diag_ahead(hinv, j, j + span)
            score = w[:, j:j + span] ** 2 / d[None, :] ** 2
            if nm:
                top = score.topk(nm[0], dim=1).indices
                keep[:, j:j + span] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)
            else:
                flat = score.reshape(-1)
                top = flat.topk(round(flat.numel() * (1 - sparsity))).indices
                keep[:, j:j + span] = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, top, True).view_as(score)
        e = torch.where(keep[:, j], 0.0, w[:, j])  # what pruning removes from column j
        w[:, j:] -= torch.outer(e / hinv[j, j], hinv[j, j:])
        w[:, j] = torch.where(keep[:, j], w[:, j], 0.0)
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return w, keep


@pytest.mark.parametrize("target", [dict(nm=(2, 4)), dict(nm=(4, 8)), dict(sparsity=0.5), dict(sparsity=0.7)])
def test_matches_float64_reference(target):
    x, w = inputs(), weight()
    h = hessian([x])
    cfg = Config(damp=0.01, block_size=16)
    got, keep = sparsegpt_prune(w, h, config=cfg, **target)
    ref, ref_keep = reference(w, h, 0.01, block=16, **target)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(got.double(), ref, atol=1e-4, rtol=1e-3), (got.double() - ref).abs().max()
    assert (got[~keep] == 0).all()


def out_err(x, w, q):
    return float((x @ w.T - x @ q.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("target", [dict(nm=(2, 4)), dict(sparsity=0.5)])
def test_beats_wanda_and_magnitude(target):
    x, w = inputs(t=2048, k=128), weight(n=64, k=128)
    got, keep = sparsegpt_prune(w, hessian([x]), **target)
    wanda = w * wanda_mask(w, input_norms([x]), **target)
    mag = w * magnitude_mask(w, **target)
    e_s, e_w, e_m = out_err(x, w, got), out_err(x, w, wanda), out_err(x, w, mag)
    assert e_s < e_w < e_m, (e_s, e_w, e_m)
    assert e_s < 0.5 * e_m
    if "nm" in target:
        assert satisfies(keep, 2, 4)
    else:
        assert keep.float().mean() == pytest.approx(0.5, abs=0.01)


def test_earlier_mask_is_kept_and_conv_shapes():
    x, w = inputs(k=36), weight(n=8, k=36)
    prior = torch.rand(8, 36, generator=torch.Generator().manual_seed(2)) > 0.3
    got, keep = sparsegpt_prune(w, hessian([x]), nm=(2, 4), keep=prior)
    assert not (keep & ~prior).any() and (got[~keep] == 0).all()
    w4 = w.reshape(8, 4, 3, 3)  # a conv weight is seen as [out, in * kh * kw]
    got4, keep4 = sparsegpt_prune(w4, hessian([x]), sparsity=0.5)
    assert got4.shape == keep4.shape == (8, 4, 3, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        sparsegpt_prune(w, hessian([x]), nm=(4, 8))
    with pytest.raises(ValueError, match="Hessian"):
        sparsegpt_prune(w, torch.eye(5), sparsity=0.5)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_padded_tokens_left_out(method):
    """A padded batch with its attention_mask prunes exactly as the same batch's real tokens alone: padded
    positions do not enter the Hessian (or Wanda's norms)."""
    import modelpress as mp

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x, attention_mask=None):
            return self.b(torch.relu(self.a(x)))

    g = torch.Generator().manual_seed(2)
    padded, real = [], []
    for lengths in ([9, 4, 12, 6], [12, 3, 8, 10]):
        x = torch.randn(4, 12, 16, generator=g)
        mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
        x[~mask] = torch.randn(int((~mask).sum()), 16, generator=g) * 30
        padded.append({"x": x, "attention_mask": mask.long()})
        real.append({"x": x[mask].unsqueeze(0)})
    a = mp.prune_(Net(), mp.PruneConfig(method=method, sparsity=0.5), calib=padded)
    b = mp.prune_(Net(), mp.PruneConfig(method=method, sparsity=0.5), calib=real)
    for name in ("a", "b"):
        assert torch.equal(a.get_submodule(name).weight_mask, b.get_submodule(name).weight_mask)
        assert torch.allclose(a.get_submodule(name).dequantized_weight(), b.get_submodule(name).dequantized_weight(),
                              atol=1e-6)
