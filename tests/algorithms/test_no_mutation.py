"""Every method leaves the user's float layers untouched: on success (the layers are swapped, never edited: a
reference kept to a float layer still holds its weights) and on failure at any layer (the model is exactly as
it was: same module objects, same tensors, same training flags). Transforms roll back on failure too."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
import modelpress.algorithms.adaround as adaround
import modelpress.algorithms.equalize as eq
from modelpress.quant import QuantMixin

METHODS = {"rtn": "rtn", "gptq": "gptq", "awq": "awq", "smoothquant": "smoothquant", "hqq": "hqq",
           "adaround": adaround.Config(iters=5, n_samples=16)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 10, bias=False)  # AdaRound's bias correction would create a bias here
        self.drop = nn.Dropout(0.5)

    def forward(self, x):  # [B, 2, 4, 4]
        h = F.relu(self.bn(self.conv(x))).mean(1).flatten(1)  # [B, 16]
        h = torch.cat([h, h], 1)
        return self.fc2(self.drop(F.relu(self.fc1(h))))


def net():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2)
    return m


CALIB = [torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]


def state(model):
    """Everything that could change: module objects by name, tensors (cloned), training flags."""
    return ({n: m for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()})


def assert_same(model, before):
    mods, tensors, flags = before
    assert {n: m for n, m in model.named_modules()} == mods
    now = model.state_dict()
    assert now.keys() == tensors.keys() and all(torch.equal(now[k], v) for k, v in tensors.items())
    assert {n: m.training for n, m in model.named_modules()} == flags


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("train", [False, True])
def test_success_swaps_layers_and_never_edits_them(method, train):
    model = net().train(train)
    before = state(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    mp.quantize_(model, mp.QuantConfig(weights="int4", activations="int8:static"), calib=CALIB,
                 method=METHODS[method])
    for n, m in layers.items():  # the float layers the user may still hold are exactly as they were
        assert isinstance(getattr(model, n), QuantMixin)
        assert torch.equal(m.weight, before[1][f"{n}.weight"])
        assert (m.bias is None) == (f"{n}.bias" not in before[1])
        if m.bias is not None:
            assert torch.equal(m.bias, before[1][f"{n}.bias"])
    assert torch.equal(model.bn.running_mean, before[1]["bn.running_mean"])  # calibration ran in eval mode
    assert model.bn.num_batches_tracked == before[1]["bn.num_batches_tracked"]
    assert {n: m.training for n, m in model.named_modules()} == before[2]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_failure_at_any_layer_leaves_the_model_exactly_as_it_was(method, fail_at):
    model = net().train()
    before = state(model)

    def progress(stage, done, total):
        if stage == "quantize" and done == fail_at:
            raise KeyboardInterrupt  # an interrupt after `fail_at` layers were swapped

    with pytest.raises(KeyboardInterrupt):
        mp.quantize_(model, mp.QuantConfig(weights="int4", activations="int8:static"), calib=CALIB,
                     method=METHODS[method], progress=progress)
    assert_same(model, before)


def test_fold_bn_rolls_back(monkeypatch):
    model = net()
    before = state(model)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nn.Module, "set_submodule", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mp.fold_bn_(model)
    monkeypatch.undo()
    assert_same(model, before)
    assert not mp.recipe.structure.recorded(model)


def test_equalize_rolls_back(monkeypatch):
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.c(F.relu(self.b(F.relu(self.a(x)))))

    torch.manual_seed(0)
    model = Chain()
    before = state(model)
    calls = [0]
    real = eq.equalize_pair_

    def flaky(first, second):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(first, second)

    monkeypatch.setattr(eq, "equalize_pair_", flaky)
    with pytest.raises(KeyboardInterrupt):
        mp.equalize_(model)
    assert calls[0] == 3
    assert_same(model, before)


def test_quantize_twice_keeps_the_first_result_on_failure():
    model = net()
    mp.quantize_(model, mp.QuantConfig(weights="int8", include=["fc1"]))
    before = state(model)
    with pytest.raises(ValueError, match="hqq works on integer formats"):
        mp.quantize_(model, mp.QuantConfig(weights="fp8_e4m3"), method="hqq")
    assert_same(model, before)
    copy.deepcopy(model)(CALIB[0])
