import pytest
import torch
from torch import nn

from modelpress.search.hutchinson import hutchinson_trace
from modelpress.search.probe import Probe
from modelpress.search.sensitivity import analyse
from modelpress.search.units import find_units


def _quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 6, generator=g)
    b = torch.randn(4, 4, generator=g)
    c = torch.randn(6, 4, generator=g)
    # f(x, y) = 0.5 x'Ax + 0.5 y'By + x'Cy with symmetric A, B: the Hessian blocks are A, B (and C off-diagonal)
    A, B = a @ a.T, b @ b.T
    x = torch.randn(6, generator=g, requires_grad=True)
    y = torch.randn(4, generator=g, requires_grad=True)
    loss = lambda: 0.5 * x @ A @ x + 0.5 * y @ B @ y + x @ C @ y  # noqa: E731
    C = c
    return loss, [x, y], [float(A.trace()), float(B.trace())]


@pytest.mark.parametrize("method", ["exact", "fd"])
def test_hutchinson_matches_exact_trace_on_a_quadratic(method):
    loss, params, exact = _quadratic()
    est, used = hutchinson_trace(loss, params, samples=800, method=method)
    assert used == method
    for e, t in zip(est, exact):
        assert e == pytest.approx(t, rel=0.1)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    d = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x = torch.randn(4, requires_grad=True)
    est, _ = hutchinson_trace(lambda: 0.5 * (d * x * x).sum(), [x], samples=3, method="exact")
    assert est[0] == pytest.approx(10.0, rel=1e-6)  # v'Dv = tr(D) for every +-1 vector v
    est_fd, _ = hutchinson_trace(lambda: 0.5 * (d * x * x).sum(), [x], samples=3, method="fd")
    assert est_fd[0] == pytest.approx(10.0, rel=1e-3)


def test_hessian_prediction_tracks_measured_costs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        net[2].weight *= 3  # a more sensitive middle layer
    batches = [torch.randn(64, 16) for _ in range(2)]
    probe = Probe(net, batches, kind="kl")
    sens = analyse(net, find_units(net), ["int8", "int4:g32", "int2:g32"], probe, hessian=True, hessian_samples=64)
    pred, meas = sens.costs("hessian"), sens.costs("measured")
    for u in meas:
        for f in ("int4:g32", "int2:g32"):
            assert pred[u][f] == pytest.approx(meas[u][f], rel=0.5), (u, f)
    # each layer: more bits, less cost; blocks absent (no repeated blocks in a Sequential of mixed layers)
    for u in meas:
        assert meas[u]["int8"] < meas[u]["int4:g32"] < meas[u]["int2:g32"]
