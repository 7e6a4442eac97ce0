"""The calibration runner: calling a model on any input kind and observing layer inputs."""
import pytest
import torch
from torch import nn

from modelpress.calibrate import call_model, observe_inputs, run_sequential
from modelpress.quant import Observer


class TwoIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, y=None, scale=1.0):
        out = self.fc(x) * scale
        return out if y is None else out + y


def test_call_model_tensor_tuple_dict():
    torch.manual_seed(0)
    m = TwoIn()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    ref = m.fc(x)
    assert torch.equal(call_model(m, x), ref)
    assert torch.equal(call_model(m, (x, y)), ref + y)
    assert torch.equal(call_model(m, [x, y]), ref + y)
    assert torch.equal(call_model(m, {"x": x, "y": y, "scale": 2.0}), ref * 2.0 + y)


def test_call_model_bad_input():
    with pytest.raises(TypeError, match="tensor, a tuple of tensors or a dict.*got int"):
        call_model(TwoIn(), 3)


def _observe(calib, kind="minmax", progress=None):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return m, observe_inputs(m, {"0": m[0], "2": m[2]}, calib, lambda: Observer(kind), progress)


def test_observe_inputs_ranges():
    xs = [torch.tensor([[-2.0, 0.5, 1.0]]), torch.tensor([[0.0, 3.0, -1.0], [1.0, 1.0, 1.0]])]
    seen = []
    m, obs = _observe(xs, progress=seen.append)
    assert seen == [1, 2]
    lo, hi = obs["0"].range()
    assert (lo.item(), hi.item()) == (-2.0, 3.0)
    with torch.no_grad():
        h = torch.cat([m[1](m[0](x)) for x in xs])
    lo2, hi2 = obs["2"].range()
    assert lo2.item() == h.min().item() == 0.0  # after ReLU
    assert hi2.item() == h.max().item()
    assert not m[0]._forward_pre_hooks and not m[2]._forward_pre_hooks  # hooks removed


def test_observe_inputs_dict_batches():
    m = TwoIn()
    obs = observe_inputs(m, {"fc": m.fc}, [{"x": torch.full((2, 3), 5.0)}, {"x": torch.full((1, 3), -1.0)}],
                         Observer)
    assert [v.item() for v in obs["fc"].range()] == [-1.0, 5.0]


def test_observe_inputs_empty_or_missing():
    with pytest.raises(ValueError, match="empty"):
        _observe([])
    with pytest.raises(ValueError, match="empty"):
        _observe(iter(()))
    with pytest.raises(ValueError, match="calib"):
        _observe(None)


def test_observe_inputs_removes_hooks_on_error():
    m = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(RuntimeError):
        observe_inputs(m, {"0": m[0]}, [torch.randn(2, 5)], Observer)  # wrong width
    assert not m[0]._forward_pre_hooks


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, attention_mask=None):
        return self.fc(x)


def test_run_sequential_refuses_non_finite_inputs_before_processing():
    x, mask = torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.long)
    x[1, 3], mask[1, 3] = float("nan"), 0  # a padded token: not data, accepted
    seen = []
    run_sequential(Tokens(), [{"x": x, "attention_mask": mask}], ["fc"], lambda n, m, xs: seen.append(n))
    assert seen == ["fc"]
    for bad in (float("nan"), float("inf")):
        y = torch.randn(2, 4, 3)
        y[0, 1, 2] = bad
        seen.clear()
        with pytest.raises(ValueError, match=r"layer 'fc': its calibration inputs contain NaN or infinite values "
                                             r"\(calibration batch 1\)"):
            run_sequential(Tokens(), [{"x": x, "attention_mask": mask}, {"x": y, "attention_mask": mask}], ["fc"],
                           lambda n, m, xs: seen.append(n))
        assert seen == []


def test_observe_inputs_names_the_layer_with_nan_inputs():
    with pytest.raises(ValueError, match=r"layer '0': calibration activations contain NaN"):
        _observe([torch.full((2, 3), float("nan"))])
